"""The SLURM launcher's pieces that need no cluster: time limits, sweep sizing, failure
reports, the sweep summary, and the stop signal in a plain (non-SLURM) run.

The tests that start a process: tests/cli/test_slurm_launcher.py."""

from __future__ import annotations

import os
import signal

import pytest

from distft.launchers.slurm import failing_ranks, parse_time_min, sweep_launcher_overrides
from distft.preflight import preflight


@pytest.mark.parametrize("value, minutes", [
    ("30", 30), ("1:00:00", 60), ("00:10:00", 10), ("2-00:00:00", 2880), ("1-12:30:00", 2190), ("00:01:30", 2),
    ("UNLIMITED", None), ("INFINITE", None),
])
def test_slurm_time_limits_parse_to_minutes(value, minutes):
    assert parse_time_min(value) == minutes


def test_launcher_slurm_sizes_the_world_from_nodes_and_gpus():
    cfg, errors = preflight(["launcher=slurm", "launcher.nodes=4", "launcher.gpus_per_node=8", "launcher.time_min=60",
                             "parallel=fsdp", "train.global_batch_size=128", "train.micro_batch_size=4"])
    assert errors == []
    assert (cfg.launcher.nnodes, cfg.launcher.nproc_per_node, cfg.launcher.tasks_per_node) == (4, 8, 8)
    cfg, _ = preflight(["launcher=slurm", "launcher.nodes=2", "launcher.time_min=60", "parallel=ddp"])
    assert (cfg.launcher.nnodes, cfg.launcher.nproc_per_node) == (2, 1)  # CPU nodes: one rank each


def test_a_secret_on_a_slurm_command_line_is_refused():
    _, errors = preflight(["launcher=slurm", "launcher.time_min=60", "+launcher.env.WANDB_API_KEY=abc"])
    assert errors == ["launcher.env.WANDB_API_KEY is set, and launcher=slurm writes the whole command line into the "
                      "job folder; pass it through the environment instead (WANDB_API_KEY for tracking.wandb.api_key; "
                      "jobs inherit it)"]


def test_sweep_points_are_sized_like_a_single_run():
    argv = ["-m", "launcher=slurm", "launcher.nodes=2", "launcher.time_min=30", "launcher.partition=gpu",
            "launcher.max_requeues=5", "parallel=ddp", "hydra/launcher=submitit_slurm", "hydra.launcher.cpus_per_task=6"]
    cfg, errors = preflight(argv)
    assert errors == []
    overrides = sweep_launcher_overrides(cfg, argv)
    assert "hydra.launcher.nodes=2" in overrides and "hydra.launcher.tasks_per_node=1" in overrides
    assert "hydra.launcher.timeout_min=30" in overrides and "hydra.launcher.partition='gpu'" in overrides
    assert "hydra.launcher.max_num_timeout=5" in overrides and "hydra.launcher.signal_delay_s=120" in overrides
    assert "+hydra.launcher.additional_parameters.requeue=true" in overrides
    assert "hydra.launcher.setup=['export SLURM_KILL_BAD_EXIT=1']" in overrides
    assert not any(o.startswith("hydra.launcher.cpus_per_task") for o in overrides)  # the user's own wins
    assert sweep_launcher_overrides(cfg, ["-m", "train.lr=1e-3,2e-3"]) == []  # Hydra's basic launcher: untouched


def test_the_failing_rank_is_the_first_srun_names(tmp_path):
    (tmp_path / "7_0_log.out").write_text(
        "step 1\nRuntimeError: Connection closed by peer\n"
        "srun: error: n2: task 1: Exited with exit code 1\nsrun: error: n1: task 0: Exited with exit code 1\n")
    (tmp_path / "7_1_log.out").write_text("Traceback...\nValueError: bad batch at step 3\n")
    report = failing_ranks(str(tmp_path / "7_0_log.out"))
    assert report.startswith("rank 1 on n2 failed first (Exited with exit code 1: ValueError: bad batch at step 3)")
    assert failing_ranks(str(tmp_path / "missing.out")) == ""


def test_a_fifo_planted_as_a_job_log_is_not_waited_for(tmp_path, capsys):
    """Job logs live in the run directory, which is untrusted (issue 34): a named pipe planted as
    the rank's log is reported and skipped; before, the follower's open() waited for a writer."""
    import signal

    log = tmp_path / "9_0_log.out"
    os.mkfifo(log)
    signal.alarm(30)  # a hang fails the test instead of the suite
    try:
        assert failing_ranks(str(log)) == ""
    finally:
        signal.alarm(0)
    assert f"distft: cannot read the job log ({log} is a named pipe (FIFO), not a regular file)" in capsys.readouterr().err


def test_requeues_are_bounded_by_max_requeues(monkeypatch):
    """A job SLURM already requeued launcher.max_requeues times is not requeued again: it stops
    with its checkpoint and says how to go on (exit code 4 from the entry point)."""
    from distft.preemption import StopSignal

    cfg, _ = preflight(["launcher=slurm", "launcher.time_min=60", "launcher.max_requeues=2"])
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    stop = StopSignal(cfg, "cpu")
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested()
        outcome = stop.stop(9, "/runs/x/checkpoints/step_000009", is_main=True)
    finally:
        stop.close()
    assert not outcome.requeued
    assert str(outcome) == ("stopped at step 9 by SIGUSR2, checkpoint of step 9: /runs/x/checkpoints/step_000009; the "
                            "job was requeued 2 times already (launcher.max_requeues=2); rerun the same command to resume")


def test_a_requeue_is_reported_with_its_cause_and_an_earlier_run_is_not_blamed(tmp_path):
    """launcher.wait's lines: the cause of a requeue from the log of the run that ended (srun's
    node failure, distft's own stop line, else the controller's Reason); and the rank that failed
    first is looked for only in the job's last run (an earlier run's stopped ranks are not it)."""
    from distft.launchers.slurm import requeue_cause

    assert requeue_cause("step 3\nsrun: error: Node failure on n2\nsrun: error: n1: task 0: Killed\n") == \
        "node failure on n2"
    assert requeue_cause("distft: stopped at step 5, checkpoint of step 5: /r/checkpoints/step_000005; job 12 "
                         "requeued (1/3)\n") == "stopped at step 5 by the stop signal, checkpoint saved"
    assert requeue_cause("step 1\n", "BeginTime") == "requeued by the job itself (scontrol requeue)"
    earlier = "srun: error: n1: task 0: Terminated\n"
    (tmp_path / "8_0_log.out").write_text(earlier + "resuming from ...\nstep 9\nsummary: /r/summary.json\n")
    assert failing_ranks(str(tmp_path / "8_0_log.out")).startswith("rank 0 on n1 failed first (Terminated")
    assert failing_ranks(str(tmp_path / "8_0_log.out"), since=len(earlier)) == ""
