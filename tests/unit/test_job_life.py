"""A SLURM job's life, the pieces that need no cluster (issue 38): the time limit a segment needs,
the signals after a run ended, where a requeued job's latest run starts in its log, and the tag
that finds a pending submission of the same run. On the cluster: tests/slurm/test_job_life.py."""

from __future__ import annotations

import os
import signal
import time

import pytest

from distft import preemption
from distft.launchers.slurm import SEGMENT_LINE, SEGMENT_START, failing_ranks, run_tag, segment_start
from distft.preemption import MIN_SEGMENT_S, StopSignal, record_startup, segment_problem, startup_s
from distft.preflight import preflight


def test_a_time_limit_that_cannot_hold_the_signal_delay_and_start_up_is_refused_naming_both_keys():
    """`python -m distft.plan +experiment=tiny_full launcher=slurm launcher.time_min=1
    launcher.signal_delay_s=30`: 30 s between the start and the signal is less than start-up
    takes; every segment would stop before its first step. One message, both keys, the fix."""
    _, errors = preflight(["+experiment=tiny_full", "launcher=slurm", "launcher.time_min=1",
                           "launcher.signal_delay_s=30"])
    assert errors == [
        "launcher.time_min=1 (60 s) leaves 30 s before the stop signal that launcher.signal_delay_s=30 sends, less "
        "than start-up and a first step take (allow at least 60 s): every job segment would stop before its first "
        "step and requeue without progress; raise launcher.time_min to at least 2 or lower launcher.signal_delay_s"]
    _, errors = preflight(["+experiment=tiny_full", "launcher=slurm", "launcher.time_min=2"])  # 120 s, signal at 120
    assert len(errors) == 1 and "leaves 0 s" in errors[0] and "at least 3" in errors[0]
    for fits in (["launcher.time_min=2", "launcher.signal_delay_s=60"], ["launcher.time_min=3"]):
        assert preflight(["+experiment=tiny_full", "launcher=slurm", *fits])[1] == []


def test_a_measured_start_up_raises_what_a_segment_needs(tmp_path):
    """The first step of each process records its start-up in the run directory (the longest
    seen); the check before a submission holds the time limit against it."""
    run_dir = str(tmp_path)
    assert startup_s(run_dir) == 0.0 and segment_problem(3, 120) is None
    preemption_started = preemption.STARTED
    try:
        preemption.STARTED = time.time() - 1000  # as if this process had started 1000 s ago
        record_startup(run_dir)
        measured = startup_s(run_dir)
        preemption.STARTED = time.time() - 100  # a quicker one later does not lower it
        record_startup(run_dir)
    finally:
        preemption.STARTED = preemption_started
    assert 1000 <= measured < 1100 and startup_s(run_dir) == measured
    problem = segment_problem(3, 120, measured)
    assert problem and f"measured {measured:.0f} s in this run directory" in problem
    assert f"raise launcher.time_min to at least {-(-(120 + measured) // 60):.0f} " in problem
    assert segment_problem(60, 120, measured) is None
    # Untrusted: malformed, negative, a link or a FIFO is no measurement, never a hang.
    for content in ('{"startup_s": "x"}', '{"startup_s": -5}', "[1, 2]", "not json"):
        (tmp_path / "startup.json").write_text(content)
        assert startup_s(run_dir) == 0.0
    os.remove(tmp_path / "startup.json")
    (tmp_path / "elsewhere.json").write_text('{"startup_s": 5000}')
    os.symlink(tmp_path / "elsewhere.json", tmp_path / "startup.json")
    assert startup_s(run_dir) == 0.0
    os.remove(tmp_path / "startup.json")
    os.mkfifo(tmp_path / "startup.json")
    assert startup_s(run_dir) == 0.0
    assert MIN_SEGMENT_S == 60


def test_after_a_run_ended_the_stop_signals_are_ignored_until_another_run_starts():
    """ignore_late_signals (called once every rank finished, or stopped with its checkpoint):
    the stop signal and SIGTERM then do nothing, which CPython keeps through its finalization
    (a Python handler it would reset to the default action, which kills). The next run in the
    same process gets its handlers back."""
    cfg, _ = preflight(["launcher=slurm", "launcher.time_min=60"])
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        preemption.ignore_late_signals()  # a test, like a notebook, goes on after its run: nothing changes
        assert all(signal.getsignal(s) is not signal.SIG_IGN for s in saved)
        preemption.ignore_late_signals(leaving=True)  # a rank process, or the entry point's exit
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in saved)
        os.kill(os.getpid(), signal.SIGUSR2)  # nothing happens, nothing is recorded
        os.kill(os.getpid(), signal.SIGTERM)
        assert not preemption.received()
        stop = StopSignal(cfg, "cpu")
        try:
            assert signal.getsignal(signal.SIGUSR2) is preemption._record
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested()
        finally:
            stop.close()
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_the_failing_rank_is_looked_for_in_the_latest_run_the_log_marks(tmp_path):
    """A job log appended across requeues: each run starts with the batch script's
    SEGMENT_LINE. The rank blamed is the first srun names after the last mark, even when the
    follower's own offset (its count of restarts, which can lag) points into an earlier run."""
    assert SEGMENT_LINE.startswith("echo ") and SEGMENT_START.pattern.startswith(b"^distft: job")
    first = ("distft: job 41 (restart 0) on n[1-2]\nstep 1/16\n"
             "srun: error: n2: task 1: Killed\nsrun: error: n1: task 0: Terminated\n")
    second = ("distft: job 41 (restart 1) on n[1-2]\nresuming from /r/checkpoints/step_000004\nstep 5/16\n"
              "srun: error: n1: task 0: Exited with exit code 4\nsrun: error: n2: task 1: Exited with exit code 4\n")
    log = tmp_path / "41_0_log.out"
    log.write_text(first + second)
    start = segment_start(str(log), known=10)  # the follower saw the requeue while the first run's lines still came
    assert start == len(first.encode())
    assert failing_ranks(str(log), since=start).startswith("rank 0 on n1 failed first (Exited with exit code 4")
    assert failing_ranks(str(log), since=10).startswith("rank 1 on n2 failed first (Killed")  # what it said before
    (tmp_path / "42_0_log.out").write_text("step 1\nsrun: error: n2: task 1: Killed\n")  # no mark: what it knew
    assert segment_start(str(tmp_path / "42_0_log.out"), known=7) == 7


def test_a_submission_is_tagged_with_its_run_directory(tmp_path):
    """The job comment a pending submission is found by: one per run directory, whatever its
    characters, short enough for SLURM's field."""
    tag = run_tag(str(tmp_path / "run"))
    assert tag == run_tag(str(tmp_path / "run" / ".." / "run")) != run_tag(str(tmp_path / "other"))
    assert tag.startswith("distft-run:") and len(tag) == len("distft-run:") + 16
    assert run_tag(str(tmp_path / "a run; with $chars")).replace("distft-run:", "").isalnum()


@pytest.mark.parametrize("phase", ["start-up", "final"])
def test_a_signal_after_the_run_finished_is_not_taken_for_the_next_runs_start(phase, capfd):
    """StopSignal.close keeps the finished phase for the rest of the process: a late signal
    says "after the run finished", not "during start-up: stopping before the first step"."""
    cfg, _ = preflight([])
    stop = StopSignal(cfg, "cpu")
    preemption.set_phase(phase)
    if phase == "final":
        preemption.set_phase("finished")
    stop.close()
    os.kill(os.getpid(), signal.SIGUSR2)
    err = capfd.readouterr().err
    if phase == "final":
        assert "received SIGUSR2 after the run finished: nothing to do" in err and not preemption.received()
    else:
        assert "during start-up" in err and preemption.received()
    preemption.reset()


def test_a_segment_without_progress_is_ended_only_when_its_time_limit_stopped_it():
    """The decision behind SegmentTooShort (on the cluster: tests/slurm/test_job_life.py):
    within launcher.signal_delay_s (plus SLURM's 60 s early slack) of the job's end, a segment
    that trained nothing, or answered no prompt of the final evaluation, is ended with the cause
    and the fix; earlier, the signal is a preemption's and the job requeues."""
    from distft.errors import SegmentTooShort, exit_code
    from distft.preemption import TIME_LIMIT_SLACK_S, no_progress_refusal

    cfg, _ = preflight(["launcher=slurm", "launcher.time_min=3", "launcher.signal_delay_s=60"])
    start = no_progress_refusal(cfg, "stopped before its first step", None, left=55.0, limit="00:03:00", since=125.0)
    assert isinstance(start, SegmentTooShort) and exit_code(start) == 2
    assert str(start) == (
        "stopped before its first step: the stop signal came 125 s after this job segment started, 55 s before its "
        "end, before a first step: launcher.time_min=3 leaves too little after launcher.signal_delay_s=60 for "
        "start-up; not requeued (every segment would stop the same way). Raise the time limit or lower "
        "launcher.signal_delay_s, then rerun the same command")
    final = no_progress_refusal(cfg, "stopped during the final evaluation, after step 40", "/r/checkpoints/step_000040",
                                left=60 + TIME_LIMIT_SLACK_S, limit="00:03:00", since=100.0)
    assert str(final) == (
        "stopped during the final evaluation, after step 40: the time limit's stop signal came before this job "
        "segment answered one more prompt; the final evaluation does not fit in launcher.time_min=3: lower "
        "eval.num_samples, raise launcher.time_min, or run python -m distft.evaluate /r/checkpoints/step_000040; "
        "not requeued (the final checkpoint is kept)")
    assert no_progress_refusal(cfg, "stopped before its first step", None, left=60 + TIME_LIMIT_SLACK_S + 1,
                               limit="00:03:00", since=20.0) is None  # a preemption: requeued
    sbatch, _ = preflight(["launcher=slurm", "launcher.time_min=null"])  # the template's job: its own limit
    assert "the job's time limit (00:02:00) leaves too little after launcher.signal_delay_s=120" in str(
        no_progress_refusal(sbatch, "stopped before its first step", None, left=100.0, limit="00:02:00", since=20.0))
