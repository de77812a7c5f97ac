"""DDP on 2 real gloo ranks on the CPU.

The launcher itself is tested as a user meets it (a dead rank, two nodes meeting at a
rendezvous); the equivalence runs are whole trainings in the session's shared launches
(helpers.engine_run), each rank running `distft.train.train` as the launcher's rank processes do.

Equivalence is the backbone: the same seed and global batch must give the same losses on one
process and on 2 DDP ranks. Tolerance: relative 1e-5 on each of the first 10 step losses (fp32).
The two runs see the same rows in the same optimizer steps and differ only in the order of float
sums (the gradient all-reduce, the token-count all-reduce); measured drift after 10 Adam steps is
~1e-7 relative, so 1e-5 leaves a 100x margin while any real error (a rank seeing other data,
gradients averaged instead of summed, a wrong token weighting) moves the loss by >1e-3.
LoRA runs with technique.dropout=0: dropout masks come from each rank's own RNG stream, so with
dropout the two layouts are equally valid but not bit-comparable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.distributed.helpers import (
    COMMON,
    REPO,
    TECHNIQUES,
    check_matrix_cell,
    engine_run,
    launch_matrix,
    step_metrics,
)

for _technique in ("full", "lora"):
    engine_run(_technique, "single"), engine_run(_technique, "ddp")


@pytest.mark.parametrize("technique", ["full", "lora"])
def test_ddp_on_two_ranks_matches_one_process(trainings, technique):
    single_dir, _ = trainings.finished(engine_run(technique, "single"))
    ddp_dir, _ = trainings.finished(engine_run(technique, "ddp"))
    a, b = step_metrics(single_dir), step_metrics(ddp_dir)
    assert len(a) == len(b) == 10
    assert b[-1] < b[0] * 0.95  # it learns
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert y == pytest.approx(x, rel=1e-5), f"step {step}: single {x} vs ddp {y}"
    summary = json.load(open(os.path.join(ddp_dir, "summary.json")))
    assert (summary["parallel"], summary["world_size"], summary["engine"]) == ("ddp", 2, "DDPEngine")
    assert json.load(open(os.path.join(single_dir, "summary.json")))["engine"] == "single process"  # no DDP wrapper
    # Both ranks logged, each with its rank; only rank 0 wrote the run directory's files.
    logs = trainings[engine_run(technique, "ddp")]["logs"]
    assert "[rank0]" in logs[0] and "[rank1]" in logs[1] and "[rank0]" not in logs[1]
    assert summary["eval_after"]["loss"] == pytest.approx(
        json.load(open(os.path.join(single_dir, "summary.json")))["eval_after"]["loss"], rel=1e-5)


def test_the_run_directory_names_the_layout():
    """The same experiment on one process and on 2 DDP ranks gets two run directories under run.root."""
    from distft.config import run_dir
    from distft.preflight import preflight

    single, errors = preflight(["+experiment=tiny_full", "run.root=/runs", *COMMON])
    ddp, more = preflight(["+experiment=tiny_full", "run.root=/runs", "parallel=ddp", "launcher.nproc_per_node=2",
                           *COMMON])
    assert errors == more == []
    assert run_dir(single) != run_dir(ddp) and run_dir(single).startswith("/runs/tiny_full/")


def test_a_dead_rank_ends_the_whole_job_with_no_orphans(tmp_path):
    """SIGKILL rank 1 mid-run: the launcher stops rank 0, exits non-zero naming rank 1, and no
    process of the job is left."""
    args = [sys.executable, "-m", "distft", "+experiment=tiny_full", f"run.root={tmp_path}", "parallel=ddp",
            "launcher.nproc_per_node=2", "train.max_steps=100000", "train.log_every=1", "parallel.timeout_s=60",
            "eval.num_samples=2", "eval.max_new_tokens=2"]
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    launcher = psutil.Process(job.pid)
    try:
        deadline = time.time() + 240
        ranks: dict[str, psutil.Process] = {}
        while time.time() < deadline and job.poll() is None:
            for child in launcher.children(recursive=True):
                try:
                    rank = child.environ().get("RANK")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if rank is not None and child.cmdline()[-1:] != [] and "distft" in " ".join(child.cmdline()):
                    ranks.setdefault(rank, child)
            metrics = list(tmp_path.glob("tiny_full/*/metrics.jsonl"))
            if len(ranks) == 2 and metrics and '"loss"' in metrics[0].read_text():
                break
            time.sleep(0.5)
        assert set(ranks) == {"0", "1"}, f"did not find both ranks training: {ranks}"
        family = [launcher, *launcher.children(recursive=True)]
        killed_at = time.time()
        ranks["1"].send_signal(signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
        elapsed = time.time() - killed_at
    finally:
        if job.poll() is None:
            for proc in [launcher, *launcher.children(recursive=True)]:
                proc.kill()
    assert job.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after the rank died"
    assert "rank 1" in stderr and "failed" in stderr, stderr[-2000:]
    time.sleep(1)
    alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"processes left behind: {alive}"


def test_two_nodes_without_slurm_meet_at_the_rendezvous_and_match_one_process(trainings, tmp_path):
    """launcher.nnodes=2: the same command on two 'nodes' (two agents on this machine, one rank
    each) rendezvous at launcher.rdzv_endpoint and train as one 2-rank job."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "distft", "+experiment=tiny_full", f"run.root={tmp_path}", "parallel=ddp",
            "launcher.nnodes=2", "launcher.nproc_per_node=1", f"launcher.rdzv_endpoint=127.0.0.1:{port}", *COMMON]
    # Both "nodes" share this machine's cores: one thread each, as two real nodes would not contend
    # (each rank sees LOCAL_WORLD_SIZE=1 and would take every core: measured steps of 0.4-7 s).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    run_dirs = [line[len("run_dir: "):] for out, _ in outputs for line in out.splitlines() if line.startswith("run_dir: ")]
    assert len(run_dirs) == 1  # global rank 0 only, on whichever node it landed
    summary = json.load(open(os.path.join(run_dirs[0], "summary.json")))
    assert summary["world_size"] == 2
    single, _ = trainings.finished(engine_run("full", "single"))
    expected, got = step_metrics(single), step_metrics(run_dirs[0])
    assert len(expected) == len(got) == 10
    for x, y in zip(expected, got):
        assert y == pytest.approx(x, rel=1e-5)


def test_every_technique_trains_on_ddp(tmp_path):
    """The DDP column of the engine matrix: every technique trains on 2 ranks with a falling
    held-out loss, evaluates and generates alike on both, and what a checkpoint saves (DDP's
    replicated weights, adapters extracted as save_checkpoint does) reloads on one process to the
    same loss and tokens. No technique is refused under DDP."""
    matrix = launch_matrix(tmp_path, ["ddp"])
    for technique in TECHNIQUES:
        check_matrix_cell(matrix[f"ddp/{technique}"], f"ddp/{technique}", gathered=False)
