"""Sweep points on the real 2-node cluster (tests/slurm/conftest.py): what a point that lost a rank
to SIGKILL (the OOM killer) reports, and what squeue calls each point's job.

The cluster and the helpers are tests/slurm/test_slurm.py's: the tiny model with FSDP, one rank
per node over the bridge between n1 and n2, OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess

import pytest

from tests.slurm.test_slurm import ON_SLURM, TINY, distft, job_field

pytestmark = pytest.mark.slurm


def test_a_killed_rank_is_named_by_srun_not_by_its_peers_lost_connection(slurm_cluster, tmp_path):
    """Two 2-rank points (launcher.nodes=2) whose rank 0 is SIGKILLed before step 2
    (DISTFT_FAULTS=kill_at_step:2:0). Rank 0 can record nothing; rank 1, in step 2's collective,
    records gloo's lost connection ("Connection reset by peer", marked lost_peer). Each point's
    failure, printed and in the summary, is srun's first line in the job's log (`srun: error:
    <node>: task 0: Killed`), not the peer's lost connection. squeue names each point's array
    task `distft-tiny_lora-<job num>`, not Hydra's `cli`."""
    sweep = tmp_path / "multirun"
    proc = distft("-m", "+experiment=tiny_lora", "train.max_steps=4", *TINY, "train.lr=1e-3,2e-3",
                  "hydra/launcher=submitit_slurm", *ON_SLURM, f"run.root={tmp_path}", f"hydra.sweep.dir={sweep}",
                  timeout=540, DISTFT_FAULTS="kill_at_step:2:0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = re.findall(r"^distft: sweep point (\d) \(train\.lr=[^)]*\) failed: (.*) \(job (\d+_\d+), logs (\S+)\)$",
                      proc.stderr, flags=re.M)
    assert sorted(num for num, *_ in said) == ["0", "1"], proc.stderr[-3000:]
    # The peer's lost connection was there to be outranked (else this test checks nothing new).
    peers = [json.loads(path.read_text()) for path in sweep.glob("*/failed.rank1.json")]
    assert any(record["lost_peer"] for record in peers), (peers, proc.stderr[-3000:])
    for num, error, job, logs in said:
        assert re.fullmatch(rf"job {job} \S+ \(exit code [^)]*\): rank 0 on n\d failed first \(Killed.*", error), error
        assert "by peer" not in error, error
        assert job_field(job, "JobName") == f"distft-tiny_lora-{num}"
        # Each run of the job marks its start in the log (where srun's lines of the latest run begin).
        with open(os.path.join(logs, f"{job}_0_log.out")) as f:
            log = f.read()
        assert re.search(r"^distft: job \d+ \(restart 0\) on n\[1-2\]$", log, flags=re.M), log[-3000:]
    array = said[0][2].split("_")[0]
    listed = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%j", f"--jobs={array}"],
                            capture_output=True, text=True, check=True).stdout
    names = dict(line.strip().split("|", 1) for line in listed.splitlines() if line.strip())
    assert {job: names.get(job) for _, _, job, _ in said} == {job: f"distft-tiny_lora-{num}" for num, _, job, _ in said}
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    jobs = {num: job for num, _, job, _ in said}
    for row in rows:
        assert row["status"].startswith(f"failed: job {jobs[row['job']]} ") and "failed first (Killed" in \
            row["status"] and "by peer" not in row["status"], row["status"]
