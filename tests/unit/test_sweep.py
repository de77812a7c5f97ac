"""The sweep summary's bookkeeping, without a cluster: a failed point's first error (a rank's own,
not a peer's lost connection; the launcher's when no rank could write one), `incomplete` only
for a point still running, and a reused sweep directory summarized for its latest sweep alone.
Ending a sweep without sacct and recording these for real: tests/slurm (the failing sweep)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

from distft.evaluation.sweep import (
    collect,
    error_line,
    first_failure,
    latest_sweep,
    lost_peer,
    record_failure,
    start_sweep,
    summarize,
    sweep_id,
    write_point,
)
from distft.preflight import preflight
from tests.distributed.helpers import REPO


def _point(tmp_path, sweep, job: int, lr: str, loss=None) -> str:
    run = tmp_path / f"run-{lr}"
    cfg, errors = preflight([f"run.dir={run}", f"train.lr={lr}"])
    assert errors == []
    point_dir = os.path.join(sweep, str(job))
    write_point(point_dir, cfg, [f"train.lr={lr}"], job, sweep_id(sweep))
    if loss is not None:
        os.makedirs(run, exist_ok=True)
        (run / "summary.json").write_text(json.dumps({"eval_after": {"loss": loss}, "steps": 2}))
    return point_dir


def test_a_failed_point_shows_its_first_error_and_incomplete_means_still_running(tmp_path):
    sweep = str(tmp_path / "sweep")
    start_sweep(sweep)
    _point(tmp_path, sweep, 0, "0.001", loss=2.5)
    ranks = _point(tmp_path, sweep, 1, "0.002")
    # Rank 0 noticed first that rank 1 went away; rank 1's own error is the cause.
    record_failure(ranks, "rank0", "DistBackendError: Connection closed by peer", rank=0, host="n1", lost=True)
    time.sleep(0.01)
    record_failure(ranks, "rank1", "RuntimeError: bad | batch", rank=1, host="n2")
    killed = _point(tmp_path, sweep, 2, "0.003")
    record_failure(killed, "job", "job 7_2 FAILED (exit code 137:0): rank 0 on n1 failed first (Killed)")
    _point(tmp_path, sweep, 3, "0.004")  # running: nothing recorded yet
    assert first_failure(ranks)["rank"] == 1
    _, rows = collect(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [
        (0, "complete"), (1, "failed: RuntimeError: bad | batch"),
        (2, "failed: job 7_2 FAILED (exit code 137:0): rank 0 on n1 failed first (Killed)"), (3, "incomplete")]
    paths = summarize(sweep)
    markdown = open(paths["md"]).read()
    assert "4 points, 1 complete, 2 failed; best eval loss first." in markdown
    assert "| 1 | 0.002 | failed: RuntimeError: bad \\| batch | - |" in markdown  # the table keeps its columns
    with open(paths["csv"]) as f:
        assert [r["status"] for r in csv.DictReader(f)][1] == "failed: RuntimeError: bad | batch"
    # A point started again (a reused directory) starts with no failure of its predecessor's.
    _point(tmp_path, sweep, 1, "0.002")
    assert first_failure(ranks) is None


def test_errors_read_as_one_line_and_lost_peers_are_told_apart():
    assert error_line(ValueError("bad batch\nsecond line")) == "ValueError: bad batch"
    assert error_line(KeyError()) == "KeyError"
    assert lost_peer(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:123"))
    assert not lost_peer(RuntimeError("injected fault (DISTFT_FAULTS): rank 1 fails at step 1"))
    import torch.distributed

    assert lost_peer(torch.distributed.DistBackendError("NCCL error: remote process exited"))


def test_a_reused_sweep_directory_summarizes_only_its_latest_sweep(tmp_path):
    sweep = str(tmp_path / "multirun" / "mine")
    first = start_sweep(sweep)
    for job, lr in enumerate(["0.001", "0.002", "0.003"]):
        _point(tmp_path, sweep, job, lr, loss=1.0 + job)
    second = start_sweep(sweep)
    assert second != first and sweep_id(sweep) == second
    _point(tmp_path, sweep, 0, "0.01", loss=5.0)  # the second sweep: one point, worse than all of the first's
    _point(tmp_path, sweep, 1, "0.02", loss=6.0)
    _, rows = collect(sweep)
    assert [(r["job"], r["train.lr"]) for r in rows] == [(0, "0.01"), (1, "0.02")]
    markdown = open(summarize(sweep)["md"]).read()
    assert "2 points, 2 complete" in markdown and "0.003" not in markdown
    # `python -m distft.sweep <multirun>`: the newest sweep directory in it.
    older = str(tmp_path / "multirun" / "older")
    start_sweep(older)
    os.utime(os.path.join(older, "sweep.json"), (1, 1))
    assert latest_sweep(str(tmp_path / "multirun")) == sweep
    again = subprocess.run([sys.executable, "-m", "distft.sweep", str(tmp_path / "multirun")], capture_output=True,
                           text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert f"the newest sweep in {tmp_path / 'multirun'}: {sweep}" in again.stderr and "| 0 | 0.01 | complete" in \
        again.stdout


def test_a_point_whose_run_directory_is_in_use_fails_alone_and_the_others_run(tmp_path):
    """Issue 34: with Hydra's basic launcher (the default for -m) every point runs in the sweep's
    process, and a point that met another run holding its run directory exited, which ended the
    whole sweep: the points after it never ran, no summary. Now that point is recorded failed,
    naming the holder, the other points run to completion, the summary says which failed and
    why, and the sweep exits 1 at the end, its last line naming the failed point."""
    import socket

    from distft.config import run_dir
    from distft.runlock import acquire

    shared = [f"run.root={tmp_path / 'runs'}", "tracking.wandb.mode=disabled", "tracking.progress_bar=false",
              "train.max_steps=2", "eval.num_samples=2", "eval.max_new_tokens=2", "train.eval_max_batches=1",
              "data.synthetic.num_examples=300"]
    busy, free = (run_dir(preflight([*shared, f"train.lr={lr}"])[0]) for lr in ("0.001", "0.002"))
    sweep = tmp_path / "sweep"
    with acquire(busy):  # this process is the other run
        proc = subprocess.run([sys.executable, "-m", "distft", "-m", *shared, "train.lr=0.001,0.002",
                               f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(free, "summary.json")) and not os.path.exists(os.path.join(busy, "summary.json"))
    in_use = f"RunInUse: run directory {busy} is in use by another run of this config: pid {os.getpid()} on " \
             f"{socket.gethostname()}, since "
    assert first_failure(str(sweep / "0"))["error"].startswith(in_use)
    _, rows = collect(str(sweep))
    assert [row["status"][: len("failed: ") + len(in_use)] for row in rows] == ["failed: " + in_use, "complete"]
    markdown = (sweep / "summary.md").read_text()
    assert "2 points, 1 complete, 1 failed; best eval loss first." in markdown and f"failed: {in_use}" in markdown
    with open(sweep / "summary.csv") as f:
        assert [r["status"].startswith("failed: " + in_use) for r in csv.DictReader(f)] == [True, False]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("distft: sweep point")]
    assert len(said) == 1 and said[0].startswith(f"distft: sweep point 0 (train.lr=0.001) failed: {in_use}"), said
    assert said[0].endswith(f"; 1 of 2 points failed: see {sweep / 'summary.md'}")
