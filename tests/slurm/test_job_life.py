"""A job's life on the real SLURM cluster, its hard cases (issue 38): a finished run ends
COMPLETED whatever signal lands while its ranks exit; a job that cannot progress stops instead of
requeueing; the requeue budget spent ends in the documented exit code; a second submission of a
pending run is refused; the sbatch template finds the project's Python.

Each drives its case on demand: signals sent in a loop, faults that hold a rank at a known
instant (distft/faults.py), time limits set per job."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.distributed.helpers import REPO, summary_of
from tests.slurm.test_slurm import ON_SLURM, RUN, TINY, distft, env, job_field, submitted_job_id, wait_for_state

pytestmark = pytest.mark.slurm
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
ONE_NODE = ["+experiment=tiny_full", "train.max_steps=4", *TINY, "launcher=slurm", "launcher.nodes=1"]


def test_a_finished_run_ends_completed_whatever_signal_comes_while_its_ranks_exit(slurm_cluster, tmp_path):
    """From the moment summary.json exists until the job has ended, the stop signal is sent to
    every rank every 20 ms (a time limit landing during teardown): the job still ends COMPLETED
    0:0. Before, CPython's finalization reset distft's handlers to the default action and the
    signal killed a finished rank: FAILED 140, and the follower blamed its peer."""
    run = tmp_path / "run"
    proc = distft(*[a for a in RUN if not a.startswith("train.max_steps=")], "train.max_steps=4", *ON_SLURM,
                  f"run.dir={run}")
    job = submitted_job_id(proc)
    deadline, sent = time.time() + 300, 0
    while not (run / "summary.json").exists():
        assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING"), job_field(job, "JobState")
        time.sleep(0.02)
    while job_field(job, "JobState") not in ENDED:
        subprocess.run(["scancel", "--signal=USR2", job], capture_output=True)
        sent += 1
        time.sleep(0.02)
        assert time.time() < deadline
    log = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert (job_field(job, "JobState"), job_field(job, "ExitCode")) == ("COMPLETED", "0:0"), log[-3000:]
    assert sent >= 3 and job_field(job, "Restarts") == "0"
    assert summary_of(str(run))["steps"] == 4 and "Exiting after successful completion" in log


def test_a_segment_its_time_limit_stops_before_the_first_step_is_not_requeued(slurm_cluster, tmp_path):
    """launcher.time_min=3 with the signal 60 s before the end (the check before submitting lets
    it through: 120 s) but a start-up that takes longer (a fault holds loading until the signal
    comes): the time limit's signal lands before the first step. The job is not requeued (it
    would stop the same way each time until its budget is spent) and ends FAILED 2 with the
    cause and the fix; before, it requeued 3 times, trained nothing, and said "rerun the same
    command"."""
    run = tmp_path / "run"
    proc = distft(*ONE_NODE, "launcher.time_min=3", "launcher.signal_delay_s=60", f"run.dir={run}",
                  "launcher.wait=true", timeout=420, DISTFT_FAULTS="sleep_at:loading:400")
    job = submitted_job_id(proc)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (job_field(job, "JobState"), job_field(job, "ExitCode"), job_field(job, "Restarts")) == ("FAILED", "2:0", "0")
    assert re.search(r"distft: stopped before its first step: the stop signal came \d+ s after this job segment "
                     r"started, \d+ s before its end, before a first step: launcher.time_min=3 leaves too little after "
                     r"launcher.signal_delay_s=60 for start-up; not requeued", proc.stdout), proc.stdout[-3000:]
    assert "requeued" not in proc.stdout.split("not requeued")[0] and not (run / "checkpoints").exists()


def test_the_sbatch_template_finds_the_projects_python_and_refuses_a_job_its_signal_would_stop_at_once(
        slurm_cluster, tmp_path):
    """`sbatch --time=2 slurm/train.sbatch` keeps the template's `--signal=USR2@120`: the signal
    is due as the job starts. Submitted from the project folder with plain `python` not knowing
    distft (no DISTFT_PYTHON, no venv on PATH), the template finds .venv/bin/python there; the
    rank sees the job's end too near, says so and exits 2 at once: FAILED 2:0, not requeued.
    From another folder it says which Python to set instead of failing with ModuleNotFoundError."""
    bare = {k: v for k, v in env().items() if k not in ("DISTFT_PYTHON", "VIRTUAL_ENV")}
    bare["PATH"] = "/usr/bin:/bin"
    log = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--parsable", "--time=2", f"--output={log}",
                           os.path.join(REPO, "slurm", "train.sbatch"), *RUN, f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=60, env=bare)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    assert wait_for_state(job, ENDED, timeout=240) == "FAILED", log.read_text()[-3000:]
    text = log.read_text()
    assert job_field(job, "ExitCode") == "2:0" and job_field(job, "Restarts") == "0", text[-3000:]
    assert re.search(rf"distft: job {job} ends in \d+ s \(time limit 00:02:00\) and its stop signal comes "
                     r"launcher.signal_delay_s=120 s before that", text), text[-3000:]
    assert "ModuleNotFoundError" not in text and not (tmp_path / "run" / "checkpoints").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(["sbatch", "--parsable", "--time=10", f"--output={elsewhere / 'job.out'}",
                           os.path.join(REPO, "slurm", "train.sbatch"), *RUN], capture_output=True, text=True,
                          cwd=str(elsewhere), timeout=60, env=bare)
    job = proc.stdout.strip().split(";")[0]
    assert wait_for_state(job, ENDED, timeout=120) == "FAILED"
    text = (elsewhere / "job.out").read_text()
    assert job_field(job, "ExitCode") == "2:0" and "distft: no Python with distft found" in text, text
    assert f"{elsewhere}/.venv/bin/python" in text and "set DISTFT_PYTHON=/path/to/.venv/bin/python" in text


def test_spending_the_requeue_budget_ends_in_exit_code_4_on_every_node(slurm_cluster, tmp_path):
    """launcher.max_requeues=0 and the stop signal mid-run on 2 nodes: both ranks checkpoint and
    stop; rank 1 is held a few seconds after the last collective (a rank slow to leave), so rank
    0 exits 4 first and srun's --kill-on-bad-exit SIGTERMs rank 1. The job ends FAILED 4:0, the
    documented code (before: 143, rank 1 killed before it could exit 4), and the follower's last
    line names this run's first rank, not an earlier run's."""
    run = tmp_path / "run"
    waiter = subprocess.Popen([sys.executable, "-m", "distft", *RUN, *ON_SLURM, f"run.dir={run}",
                               "launcher.max_requeues=0", "launcher.wait=true"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=REPO,
                              env=env(DISTFT_FAULTS="wait_for_signal:3,sleep_at:exit:4:1"))
    lines = []
    for line in waiter.stdout:
        lines.append(line)
        job = re.search(r"submitted job (\d+)", "".join(lines))
        if job and re.search(r"step 2/", line):
            subprocess.run(["scancel", "--signal=USR2", job.group(1)], check=True)
            break
    rest, _ = waiter.communicate(timeout=300)
    out = "".join(lines) + rest
    job = job.group(1)
    assert waiter.returncode == 1, out[-3000:]
    assert (job_field(job, "JobState"), job_field(job, "ExitCode")) == ("FAILED", "4:0"), out[-3000:]
    assert "the job was requeued 0 times already (launcher.max_requeues=0, which counts every restart" in out
    assert re.search(rf"distft: job {job} FAILED \(exit code 4:0\); rank \d on n\d failed first \(Exited with exit "
                     r"code 4", out), out[-2000:]
    assert (run / "checkpoints" / "step_000003").is_dir()


def test_a_second_submission_of_a_pending_run_is_refused(slurm_cluster, tmp_path):
    """A job waiting in the queue holds no run-directory lock yet: the same command again used to
    queue a second job that failed once it started. Refused before anything is queued, naming
    the pending job; another run directory is not affected. (First: a time limit too short for
    the start-up this run directory measured is refused before submitting.)"""
    run = tmp_path / "run"
    later = ["+launcher.sbatch_extra.begin=now+3600"]  # pending for an hour
    # An earlier job of this run measured a 900 s start-up: 10 min minus the signal's 120 s cannot hold it.
    run.mkdir()
    (run / "startup.json").write_text('{"startup_s": 900}')
    slow = distft(*ONE_NODE, "launcher.time_min=10", f"run.dir={run}", *later)
    assert slow.returncode == 2 and "submitted job" not in slow.stdout, slow.stdout + slow.stderr
    assert "launcher.time_min=10 (600 s) leaves 480 s before the stop signal that launcher.signal_delay_s=120 sends, " \
           "less than start-up and a first step take (measured 900 s in this run directory)" in slow.stderr
    (run / "startup.json").unlink()
    first = distft(*ONE_NODE, "launcher.time_min=10", f"run.dir={run}", *later)
    job = submitted_job_id(first)
    try:
        assert job_field(job, "JobState") == "PENDING"
        again = distft(*ONE_NODE, "launcher.time_min=10", f"run.dir={run}", *later)
        assert again.returncode == 2 and "submitted job" not in again.stdout, again.stdout + again.stderr
        assert f"distft: not submitted, nothing queued: job {job} (PENDING) was submitted for the same run directory " \
               f"{run} and has not ended" in again.stderr and f"scancel {job}" in again.stderr
        other = distft(*ONE_NODE, "launcher.time_min=10", f"run.dir={tmp_path / 'other'}", *later)
        subprocess.run(["scancel", submitted_job_id(other)], check=True)
    finally:
        subprocess.run(["scancel", job], check=True)
