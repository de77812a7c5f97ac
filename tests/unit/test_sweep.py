"""The sweep summary's bookkeeping, without a cluster: a failed point's first error (a rank's own,
not a peer's lost connection; the launcher's when no rank could write one), `incomplete` only
for a point still running, and a reused sweep directory summarized for its latest sweep alone.
Ending a sweep without sacct and recording these for real: tests/slurm (the failing sweep; a killed
rank: tests/slurm/test_sweep_points.py).

The tests that start a process: tests/cli/test_sweep.py."""

from __future__ import annotations

import csv
import json
import os
import time

from distft.evaluation.sweep import (
    collect,
    error_line,
    first_failure,
    lost_peer,
    name_point_job,
    point_job_name,
    record_failure,
    start_sweep,
    summarize,
    sweep_id,
    write_point,
)
from distft.launchers.sweep_watch import record_job_failure
from distft.preflight import preflight


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


# A 2-rank point's job log (<array>_<task>_0_log.out: the batch script's and rank 0's output, srun's
# errors) after a requeue: in its first run srun named task 1 (stopped for the requeue); in its
# latest, rank 0 was SIGKILLed (the OOM killer) and srun stopped rank 1 after it.
EARLIER_RUN = ("distft: job 13 (restart 0) on n[1-2]\n"
               "submitit INFO (2025-01-01 10:00:00,000) - Starting with JobEnvironment(job_id=12_0, hostname=n1, "
               "local_rank=0(1), node=0(2), global_rank=0(2))\n"
               "step 1/8 | loss 4.1\nsrun: error: n2: task 1: Killed\n")
KILLED_RUN = ("distft: job 13 (restart 1) on n[1-2]\n"
              "submitit INFO (2025-01-01 10:01:00,000) - Starting with JobEnvironment(job_id=12_0, hostname=n1, "
              "local_rank=0(1), node=0(2), global_rank=0(2))\n"
              "resuming from /r/checkpoints/step_000001\nstep 2/8 | loss 3.9\n"
              "srun: error: n1: task 0: Killed\n"
              "srun: launch/slurm: _step_signal: Terminating StepId=13.0\n"
              "slurmstepd: error: *** STEP 13.0 ON n1 CANCELLED AT 2025-01-01T10:01:09 ***\n"
              "srun: error: n2: task 1: Exited with exit code 1\n")
PEER = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer [10.0.0.1]:7331"


def test_a_killed_rank_named_by_srun_outranks_its_peers_lost_connection(tmp_path):
    """Rank 0 SIGKILLed can record nothing; rank 1 records gloo's "Connection reset by peer"
    (lost_peer). The point's failure is srun's first line of the job's latest run (task 0 Killed),
    not the peer's lost connection, nor the task srun named in the run before the requeue. A
    lost peer stands only where srun said nothing; a rank's own error wins over srun's word."""
    sweep = str(tmp_path / "sweep")
    start_sweep(sweep)
    logs = tmp_path / "submitit"
    logs.mkdir()
    (logs / "12_0_1_log.out").write_text(f"step 2/8\n{PEER}\n")  # rank 1's own log: not the cause
    killed = _point(tmp_path, sweep, 0, "0.001")
    record_failure(killed, "rank1", PEER, rank=1, host="n2", lost=True)
    (logs / "12_0_0_log.out").write_text(EARLIER_RUN + KILLED_RUN)
    failure = record_job_failure(killed, "12_0", "FAILED", "0:9", str(logs / "12_0_0_log.out"))
    expected = ("job 12_0 FAILED (exit code 0:9): rank 0 on n1 failed first (Killed); 1 other task line(s) "
                "followed as srun stopped the step")
    assert failure["error"] == expected and failure["rank"] is None

    quiet = _point(tmp_path, sweep, 1, "0.002")  # srun named no task in the latest run: the lost peer stands
    record_failure(quiet, "rank1", PEER, rank=1, host="n2", lost=True)
    (logs / "14_0_0_log.out").write_text(EARLIER_RUN + "distft: job 15 (restart 1) on n[1-2]\nstep 2/8\n")
    assert record_job_failure(quiet, "14_0", "FAILED", "1:0", str(logs / "14_0_0_log.out"))["error"] == PEER

    own = _point(tmp_path, sweep, 2, "0.003")  # a rank that said why: its error, whatever srun saw after it
    record_failure(own, "rank0", "ValueError: bad batch at step 2", rank=0, host="n1")
    record_failure(own, "rank1", PEER, rank=1, host="n2", lost=True)
    (logs / "16_0_0_log.out").write_text(KILLED_RUN)
    assert record_job_failure(own, "16_0", "FAILED", "1:0", str(logs / "16_0_0_log.out"))["error"] == \
        "ValueError: bad batch at step 2"

    _, rows = collect(sweep)
    assert [r["status"] for r in rows] == [f"failed: {expected}", f"failed: {PEER}",
                                           "failed: ValueError: bad batch at step 2"]


def test_a_sweep_points_job_is_named_after_the_sweep_and_its_number(monkeypatch):
    """squeue tells the points apart: `<sweep job name>-<job num>` (distft-tiny_lora-3), cut to fit
    squeue's narrow name column with the number kept. Outside a submitit array task (a single
    run, a sweep on Hydra's basic launcher inside someone's own array job) nothing is renamed and
    no scontrol is started (tests/unit refuses processes)."""
    assert point_job_name("distft-tiny_lora", 3) == "distft-tiny_lora-3"
    long = point_job_name("distft-" + "x" * 60, 12)
    assert len(long) == 39 and long.startswith("distft-xxx") and long.endswith("x-12")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SUBMITIT_FOLDER", "/tmp/submitit")
    assert name_point_job("distft-tiny_lora", 3) is None
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.delenv("SUBMITIT_FOLDER")
    assert name_point_job("distft-tiny_lora", 3) is None
    monkeypatch.setenv("SUBMITIT_FOLDER", "/tmp/submitit")
    assert name_point_job(None, 3) is None  # Hydra's basic launcher: no job name



def test_the_sweep_plots_legend_covers_no_bar():
    """summary.png: the legend sits above the bars, whatever their heights (here all equal and
    tall, where the default placement drew it over the middle bars)."""
    from distft.evaluation.sweep import plot_figure

    rows = [{"job": i, "train.lr": lr, "eval_loss": 2.0, "eval_loss_base": 2.0} for i, lr in enumerate((1e-4, 3e-4, 1e-3))]
    fig = plot_figure(["train.lr"], rows)
    fig.canvas.draw()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    bars = [patch.get_window_extent() for patch in ax.patches]
    assert len(bars) == 6 and not any(legend.overlaps(bar) for bar in bars)
    assert all(legend.y0 > bar.y1 for bar in bars)


def test_a_sweep_of_preference_runs_lists_their_preference_figures(tmp_path):
    """Points of objective=dpo runs (a sweep of objective.beta, say) get the held-out preference
    accuracy, reward accuracy and reward margin as columns; an SFT sweep's summary has none of them."""
    sweep = str(tmp_path / "sweep")
    start_sweep(sweep)
    _point(tmp_path, sweep, 0, "0.001", loss=2.5)
    _point(tmp_path, sweep, 1, "0.002", loss=2.0)
    sft = summarize(sweep)
    with open(sft["csv"]) as f:
        assert "preference_accuracy" not in next(csv.reader(f))
    summary = tmp_path / "run-0.002" / "summary.json"
    summary.write_text(json.dumps({"eval_after": {"loss": 2.0, "preference_accuracy": 0.95, "reward_accuracy": 0.9,
                                                  "reward_margin": 1.25}, "steps": 2}))
    paths = summarize(sweep)
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["preference_accuracy"] for r in rows] == ["", "0.95"] and rows[1]["reward_margin"] == "1.25"
    markdown = open(paths["md"]).read()
    assert "| preference_accuracy | reward_accuracy | reward_margin |" in markdown
    assert "| 0.9500 | 0.9000 | 1.2500 |" in markdown
