"""The SLURM launcher's pieces that need no cluster: time limits, sweep sizing, failure
reports, the sweep summary, and the stop signal in a plain (non-SLURM) run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distft.evaluation.sweep import summarize, write_point
from distft.launchers.slurm import failing_ranks, parse_time_min, sweep_launcher_overrides
from distft.preflight import preflight
from tests.distributed.helpers import REPO, run_dir_of, step_metrics, summary_of


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
