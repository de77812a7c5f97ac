"""A stop signal in every phase of a run ends it in the right state (distft/preemption.py). The
signal is real: the run sends it to itself as it enters the phase (faults.signal_at), here in
one process for the in-process phases, and in a fresh process for start-up (before Hydra
composes anything), where a default handler would kill it.

- during the final save or evaluation: the final checkpoint is already saved, the run stops
  (exit 4 outside SLURM); the rerun takes no step, only evaluates, and its summary reports the
  last step's loss (it said NaN);
- while loading and during start-up: stopped before the first step, nothing to save;
- after the summary: nothing to do, the run ends complete.

The tests that start a process: tests/cli/test_signal_phases.py."""

from __future__ import annotations

import math
import os

import pytest

from distft.errors import Preempted
from distft.preflight import preflight
from tests.distributed.helpers import step_metrics

FAST = ["+experiment=tiny_lora", "train.max_steps=4", "train.log_every=1", "eval.num_samples=2",
        "eval.max_new_tokens=2", "train.eval_max_batches=1", "data.max_seq_len=128", "train.global_batch_size=8",
        "checkpoint.save_every=0"]


def train_with(monkeypatch, run_dir, fault: str | None):
    from distft.train import train

    if fault:
        monkeypatch.setenv("DISTFT_FAULTS", fault)
    else:
        monkeypatch.delenv("DISTFT_FAULTS", raising=False)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    cfg, errors = preflight([*FAST, f"run.dir={run_dir}"])
    assert errors == []
    return train(cfg)


def test_a_signal_during_the_final_evaluation_keeps_the_final_checkpoint_and_the_rerun_only_evaluates(
        monkeypatch, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Preempted) as stopped:
        train_with(monkeypatch, run, "signal_at:final:USR2")
    assert stopped.value.exit_code == 4 and not stopped.value.requeued
    assert str(stopped.value).startswith(f"stopped during the final evaluation, after step 4 by SIGUSR2, checkpoint "
                                         f"of step 4: {run}/checkpoints/step_000004;")
    assert (run / "checkpoints" / "step_000004" / "COMMITTED").exists() and not (run / "summary.json").exists()
    losses = step_metrics(str(run))
    summary = train_with(monkeypatch, run, None)
    assert summary["resumed_from"] == f"{run}/checkpoints/step_000004" and summary["steps"] == 4
    assert summary["final_checkpoint"] == summary["resumed_from"]  # not saved again
    assert step_metrics(str(run)) == losses  # no step taken by the rerun
    assert math.isfinite(summary["final_train_loss"]) and summary["final_train_loss"] == pytest.approx(losses[-1])
    assert summary["eval_before"]["loss"] > summary["eval_after"]["loss"]  # the base's evaluation was kept


@pytest.mark.parametrize("phase, completes", [("loading", False), ("finished", True)])
def test_a_signal_while_loading_or_after_the_summary(monkeypatch, tmp_path, phase, completes):
    run = tmp_path / "run"
    if completes:
        summary = train_with(monkeypatch, run, f"signal_at:{phase}:USR2")
        assert summary["steps"] == 4 and (run / "summary.json").exists()
        return
    with pytest.raises(Preempted) as stopped:
        train_with(monkeypatch, run, f"signal_at:{phase}:USR2")
    assert str(stopped.value).startswith("stopped before its first step by SIGUSR2, nothing trained yet, nothing to "
                                         "save;")
    assert not (run / "checkpoints").exists() and not os.path.exists(run / "metrics.jsonl")
