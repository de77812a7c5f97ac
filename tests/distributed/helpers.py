"""What the distributed tests share: running the CLI as a user would, reading a run's files, and
the engine matrix (one launch of matrix_worker.py per test module, its cells checked alike)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TECHNIQUES = ("full", "lora", "dora", "qlora", "prefix", "prompt")
COMMON = ["train.max_steps=10", "train.log_every=1", "eval.num_samples=4", "eval.max_new_tokens=4"]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def run_dir_of(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("run_dir: ")]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return lines[0][len("run_dir: "):]


def step_metrics(run_dir: str, key: str = "loss") -> list[float]:
    """`key` of every training step logged in metrics.jsonl (evaluation lines have no loss)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r[key] for r in map(json.loads, f) if "loss" in r]


def summary_of(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def launch_matrix(out_dir, presets, overrides=()) -> dict:
    """Every technique on every preset in one 2-rank launch of matrix_worker.py."""
    out = os.path.join(str(out_dir), "matrix.json")
    worker = os.path.join(REPO, "tests", "distributed", "matrix_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, out,
         *presets, "--", "train.max_steps=5", *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def check_matrix_cell(cell: dict, where: str, gathered: bool) -> None:
    """A matrix cell that validation accepted trained, evaluated in lockstep, and saves the trained model."""
    assert "rejected" not in cell, (where, cell.get("rejected"))
    losses = cell["losses"]
    assert len(losses) == 5 and all(map(_finite, losses + cell["grad_norms"])), (where, cell)
    # Falls beyond noise: the held-out loss on the same fixed batches before and after (no
    # batch-to-batch noise; the smallest measured fall, prompt tuning, is 4%), and the train loss.
    eval_loss = cell["eval_loss"][0]
    assert eval_loss < cell["eval_loss_before"] * 0.98, (where, cell["eval_loss_before"], eval_loss)
    assert losses[-1] < losses[0] * 0.98, (where, losses)
    # Evaluation and generation ran on both ranks in lockstep, to the same results.
    assert cell["eval_loss"][1] == eval_loss, where
    assert cell["tokens"][0] == cell["tokens"][1], (where, cell["tokens"])
    assert all(len(row) == 4 for row in cell["tokens"][0]), where
    # What a checkpoint would save is the trained model: a fresh one-process model loaded from
    # it scores the same loss (fp32, same batches: measured bit-identical) and generates the same.
    assert cell["gathered"] is gathered, where
    assert cell["state_keys_match"] and cell["weights_nonempty"], where
    assert cell["reloaded_eval_loss"] == pytest.approx(eval_loss, rel=1e-6), where
    assert cell["reloaded_tokens"] == cell["tokens"][0], where


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")
