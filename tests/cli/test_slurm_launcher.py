"""The SLURM launcher's pieces that need no cluster, through processes: the sweep summary command,
the stop signal in a plain (non-SLURM) run that checkpoints and resumes exactly, and a sweep on
submitit's local executor with multi-rank points.

The in-process tests: tests/unit/test_slurm_launcher.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

from distft.evaluation.sweep import summarize, write_point
from distft.preflight import preflight
from tests.distributed.helpers import REPO, run_dir_of, step_metrics, summary_of


def _fake_run(tmp_path, job: int, overrides: list[str], eval_loss, steps: int = 4):
    cfg, errors = preflight([f"run.dir={tmp_path / f'run{job}'}", *overrides])
    assert errors == []
    write_point(str(tmp_path / "sweep" / str(job)), cfg, overrides, job)
    if eval_loss is not None:
        os.makedirs(tmp_path / f"run{job}")
        (tmp_path / f"run{job}" / "summary.json").write_text(json.dumps({
            "eval_after": {"loss": eval_loss, "perplexity": 2.0, "exact_match": 0.5, "f1": 0.6, "rouge_l": 0.7},
            "eval_before": {"loss": 5.0}, "final_train_loss": eval_loss + 0.1, "steps": steps, "world_size": 2,
            "tokens_per_s": 100.0, "requeues": 0}))


def test_the_sweep_summary_lists_every_point_and_marks_unfinished_ones(tmp_path):
    _fake_run(tmp_path, 0, ["train.lr=0.001", "technique.r=4"], 3.25)
    _fake_run(tmp_path, 1, ["train.lr=0.003", "technique.r=4"], 2.5)
    _fake_run(tmp_path, 2, ["train.lr=0.001", "technique.r=8"], None)  # failed or still running
    paths = summarize(str(tmp_path / "sweep"))
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["train.lr"], r["technique.r"], r["status"], r["eval_loss"]) for r in rows] == [
        ("0", "0.001", "4", "complete", "3.25"), ("1", "0.003", "4", "complete", "2.5"),
        ("2", "0.001", "8", "incomplete", "")]
    table = open(paths["md"]).read().splitlines()
    assert table[2] == "3 points, 2 complete; best eval loss first. Run directories in summary.csv."
    assert table[4] == "| job | technique.r | train.lr | status | eval_loss | eval_loss_base | exact_match | f1 | " \
                       "rouge_l | final_train_loss | steps | requeues |"
    assert table[6].startswith("| 1 | 4 | 0.003 | complete | 2.5000 | 5.0000 | 0.5000 |")  # best first
    assert table[8].startswith("| 2 | 8 | 0.001 | incomplete | - |")
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([sys.executable, "-m", "distft.sweep", str(tmp_path / "nothing")], capture_output=True,
                             text=True, cwd=REPO)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_a_signalled_run_outside_slurm_checkpoints_and_resumes_exactly(tmp_path):
    """SIGUSR2 to a plain single-process run with no periodic checkpoint: it stops at the next
    step boundary with that step's checkpoint and exit code 4 (nothing to requeue); the same
    command resumes and ends where an uninterrupted run ends, each step logged once."""
    STEPS = 12
    # 12 steps of 8 x 128 tokens: where the run stops and resumes does not depend on the steps' size.
    args = [sys.executable, "-m", "distft", "+experiment=tiny_lora", f"train.max_steps={STEPS}", "train.log_every=1",
            "eval.num_samples=2", "eval.max_new_tokens=2", "train.eval_max_batches=1", "eval.compare_base=false",
            "checkpoint.save_every=0", "data.max_seq_len=128", "train.global_batch_size=8"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    reference = subprocess.run([*args, f"run.dir={tmp_path / 'a'}"], capture_output=True, text=True, cwd=REPO, env=env)
    assert reference.returncode == 0, reference.stderr[-2000:]
    run = tmp_path / "b"
    proc = subprocess.Popen([*args, f"run.dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=env)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-2000:]
    assert "not a SLURM job, nothing to requeue; rerun the same command to resume" in err
    stopped = len(step_metrics(str(run)))
    assert 3 <= stopped < STEPS and (run / "checkpoints" / f"step_{stopped:06d}" / "COMMITTED").exists()
    resumed = subprocess.run([*args, f"run.dir={run}"], capture_output=True, text=True, cwd=REPO, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert run_dir_of(resumed) == str(run)
    with open(run / "metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r] == list(range(1, STEPS + 1))
    assert step_metrics(str(run)) == step_metrics(str(tmp_path / "a"))
    assert summary_of(str(run))["resumed_from"].endswith(f"step_{stopped:06d}")


def test_a_sweep_on_submitit_local_runs_multi_rank_points(tmp_path):
    """`-m ... hydra/launcher=submitit_local` with 2 ranks per point: each point is its own
    2-rank job (rendezvous from submitit's environment), with its own run directory, and the
    summary is written when the sweep ends."""
    sweep = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "-m", "distft", "-m", "+experiment=tiny_lora", "train.lr=1e-3,3e-3",
         "hydra/launcher=submitit_local", "parallel=ddp", "launcher.nproc_per_node=2", "train.max_steps=3",
         "eval.num_samples=2", "eval.max_new_tokens=2", "train.eval_max_batches=1", "data.max_seq_len=128",
         f"run.root={tmp_path}", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["train.lr"] for r in rows] == ["0.001", "0.003"] and len({r["run_dir"] for r in rows}) == 2
    for row in rows:
        summary = summary_of(row["run_dir"])
        assert summary["world_size"] == 2 and summary["steps"] == 3
        assert float(row["eval_loss"]) == summary["eval_after"]["loss"]

