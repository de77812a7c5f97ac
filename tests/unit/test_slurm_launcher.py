"""The SLURM launcher's pieces that need no cluster: time limits, sweep sizing, failure
reports, the sweep summary, and the stop signal in a plain (non-SLURM) run.

The tests that start a process: tests/cli/test_slurm_launcher.py."""

from __future__ import annotations

import os
import signal

import pytest

from distft.launchers.slurm import (
    SEGMENT_LINE,
    SEGMENT_START,
    _hydra_value,
    failing_ranks,
    parse_time_min,
    sbatch_flags,
    sweep_launcher_overrides,
)
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
    assert f"hydra.launcher.setup=['export SLURM_KILL_BAD_EXIT=1',{_hydra_value(SEGMENT_LINE)}]" in overrides
    assert not any(o.startswith("hydra.launcher.cpus_per_task") for o in overrides)  # the user's own wins
    assert sweep_launcher_overrides(cfg, ["-m", "train.lr=1e-3,2e-3"]) == []  # Hydra's basic launcher: untouched


def _sweep_sbatch_script(argv: list[str], folder) -> str:
    """The batch script of a sweep point: the command line composed by Hydra with the overrides
    distft adds, its hydra.launcher handed to submitit as hydra-submitit-launcher does (its
    AutoExecutor renames name/timeout_min/mem_gb/tasks_per_node to SlurmExecutor's keys)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _get_default_parameters, _make_sbatch_string

    from distft.config import conf_dir, register_configs

    cfg, errors = preflight(["-m", *argv])
    assert errors == []
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        composed = compose("config", overrides=[*argv, *sweep_launcher_overrides(cfg, ["-m", *argv])],
                           return_hydra_config=True)
    renamed = SlurmExecutor._equivalence_dict()
    params = {renamed.get(k, k): v for k, v in OmegaConf.to_container(composed.hydra.launcher).items()
              if renamed.get(k, k) in _get_default_parameters() and v is not None}
    if "mem" in params:
        params["mem"] = _convert_mem(params["mem"])
    return _make_sbatch_string(command="true", folder=str(folder), **params)


def test_a_sweep_point_asks_for_the_memory_a_single_run_asks_for(tmp_path):
    """launcher.mem_gb=0.5: a single run asks --mem=512M; hydra-submitit-launcher's mem_gb is an
    int, and int(0.5) was 0: the point asked for no memory at all. Its batch script now holds the
    single run's --mem; submitit_local rounds a fraction of a GB up; a hydra.launcher memory key
    the user set wins."""
    argv = ["+experiment=tiny_lora", "launcher=slurm", "launcher.nodes=2", "parallel=ddp", "launcher.time_min=30",
            "launcher.mem_gb=0.5", "hydra/launcher=submitit_slurm"]
    cfg, _ = preflight(["-m", *argv])
    single = [flag for flag in sbatch_flags(cfg, "debug") if flag.startswith("--mem=")]
    assert single == ["--mem=512M"]
    overrides = sweep_launcher_overrides(cfg, ["-m", *argv])
    assert "+hydra.launcher.additional_parameters.mem='512M'" in overrides
    assert not any(o.startswith("hydra.launcher.mem_gb") for o in overrides)
    script = _sweep_sbatch_script(argv, tmp_path).splitlines()
    assert [line for line in script if line.startswith("#SBATCH --mem")] == ["#SBATCH --mem=512M"]
    # The user's own memory request stays the only one.
    mine = ["-m", *argv, "hydra.launcher.mem_gb=4"]
    assert not any("mem" in o for o in sweep_launcher_overrides(cfg, mine))
    for mem_gb, whole in (("0.5", "1"), ("1.5", "2"), ("3", "3")):
        local = ["-m", "launcher=slurm", "launcher.time_min=30", f"launcher.mem_gb={mem_gb}",
                 "hydra/launcher=submitit_local"]
        cfg, errors = preflight(local)
        assert errors == []
        overrides = sweep_launcher_overrides(cfg, local)
        assert f"hydra.launcher.mem_gb={whole}" in overrides and not any("additional" in o for o in overrides)


def test_sweep_jobs_are_named_after_the_experiment_unless_the_user_named_them(tmp_path):
    """Hydra's default job name is `cli` for every sweep; squeue now shows distft-<experiment>,
    as for a single run (launcher.job_name when set); a hydra.launcher.name given wins. Each
    point's rank 0 appends its number (distft/evaluation/sweep.py name_point_job)."""
    argv = ["+experiment=tiny_lora", "launcher=slurm", "launcher.time_min=30", "hydra/launcher=submitit_slurm"]
    script = _sweep_sbatch_script(argv, tmp_path).splitlines()
    assert "#SBATCH --job-name=distft-tiny_lora" in script
    cfg, _ = preflight(["-m", *argv, "launcher.job_name=nightly"])
    assert "hydra.launcher.name='nightly'" in sweep_launcher_overrides(cfg, ["-m", *argv, "launcher.job_name=nightly"])
    given = ["-m", *argv, "hydra.launcher.name=mine"]
    cfg, _ = preflight(given)
    assert not any(o.startswith("hydra.launcher.name") for o in sweep_launcher_overrides(cfg, given))
    # Each run of the job starts its log with a line that marks where that run begins (a requeue
    # appends to the same log): the setup's echo, and slurm/train.sbatch's own line.
    assert SEGMENT_LINE in script
    assert SEGMENT_START.match(b"distft: job 13 (restart 1) on n[1-2]")
    assert SEGMENT_START.match(b"distft: job 13 (restart 0) on n[1-2]: 2 node(s) x 1 rank(s)")


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
                            "job was requeued 2 times already (launcher.max_requeues=2, which counts every restart: the stop signal's "
                            "requeues and SLURM's after a node failure alike); rerun the same command to resume")


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



@pytest.mark.parametrize("step, checkpoint, when, cause", [
    (5, "/r/checkpoints/step_000005", "", "stopped at step 5 by the stop signal, checkpoint saved"),
    (0, None, "before its first step", "stopped before its first step by the stop signal, nothing to save"),
    (7, "/r/checkpoints/step_000007", "before its first step after step 7",
     "stopped before its first step after step 7 by the stop signal, nothing new to save"),
    (16, "/r/checkpoints/step_000016", "during the final evaluation, after step 16",
     "stopped during the final evaluation after step 16 by the stop signal, final checkpoint kept"),
])
def test_a_requeue_says_checkpoint_saved_only_when_one_was(monkeypatch, step, checkpoint, when, cause):
    """The requeue cause read from a job's log says "checkpoint saved" only for a stop at a step:
    a stop before the first step saved nothing (resumed: nothing new), one during the final
    evaluation kept the final checkpoint saved before it. The lines are distft's own: the one
    every rank ends with (`distft: <Preempted>`, from StopSignal.stop with train._stop's `when`)
    and rank 0's line before `scontrol requeue`, in the same words."""
    from distft.launchers.slurm import requeue_cause
    from distft.preemption import StopSignal

    cfg, _ = preflight(["launcher=slurm", "launcher.time_min=60"])
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    stop = StopSignal(cfg, "cpu")
    try:
        outcome = stop.stop(step, checkpoint, is_main=False, when=when)  # rank 0 alone asks scontrol
    finally:
        stop.close()
    assert outcome.requeued
    every_rank = f"distft: {outcome}"
    assert every_rank.endswith("; job 12 requeued (1/3)")
    rank0 = every_rank.replace("; job 12 requeued (1/3)", "; requeueing job 12 (1/3)")
    for line in (every_rank, rank0):
        assert requeue_cause(f"step {step}\n{line}\nsrun: error: n1: task 0: Terminated\n") == cause

