"""When a run directory's lock is stale (distft/runlock.py): judged against real processes, real
lock files and their real heartbeat (mtime), with no SLURM controller to ask (scontrol not on
PATH, as on a login node whose controller does not answer); the SLURM cases with a controller
are tests/slurm's."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from distft import runlock
from distft.errors import RunInUse


@pytest.fixture
def no_controller(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no scontrol: the controller cannot be asked
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def _lock_of(holder: runlock.Holder, run_dir, age_s: float = 0.0) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, runlock.LOCK)
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(holder), f)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_jobs_lock_without_an_answering_controller_is_judged_by_its_heartbeat_not_its_pid(no_controller, tmp_path):
    """A SLURM job's holder whose pid is not a process here (a compute node, a PID namespace):
    with a fresh heartbeat the lock is live and a start is refused naming the job; only a
    heartbeat older than STALE_AFTER_S makes it stale. Before, the pid check took a live job's
    lock whenever scontrol timed out under load, and a second submission was not refused."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a pid that was, and is no more
    holder = runlock.Holder(pid=pid, host=socket.gethostname(), job="4242", started=time.time() - 60)
    fresh = _lock_of(holder, tmp_path / "fresh", age_s=20)
    assert runlock.stale_reason(holder, fresh) is None
    refusal = runlock.check(str(tmp_path / "fresh"))
    assert refusal is not None and f"pid {pid} on {socket.gethostname()} (SLURM job 4242)" in refusal
    assert "scancel 4242" in refusal
    with pytest.raises(RunInUse):
        runlock.acquire(str(tmp_path / "fresh")).release()
    old = _lock_of(holder, tmp_path / "old", age_s=runlock.STALE_AFTER_S + 60)
    assert runlock.stale_reason(holder, old) == (f"its holder ({holder.describe()}) has not refreshed it for "
                                                 f"{runlock.STALE_AFTER_S + 60:.0f} s (it does every 30 s)")
    assert runlock.check(str(tmp_path / "old")) is None
    taken = runlock.acquire(str(tmp_path / "old"))
    try:
        assert runlock.read_holder(old).pid == os.getpid()
    finally:
        taken.release()


def test_a_lock_of_this_host_outside_slurm_is_judged_by_its_process(no_controller, tmp_path):
    """No job: a live holder (a real sleeping process, its start time recorded) keeps the lock;
    once it is dead the lock is stale, and so it is when its pid names another process now
    (another start time), whatever the heartbeat."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = runlock.Holder(pid=sleeper.pid, host=socket.gethostname(), job=None, started=time.time(),
                               pid_start=runlock._process_start(sleeper.pid), boot_id=runlock._boot_id())
        path = _lock_of(alive, tmp_path / "alive", age_s=runlock.STALE_AFTER_S + 60)
        assert runlock.stale_reason(alive, path) is None
        assert f"stop it (kill {sleeper.pid} on {socket.gethostname()})" in runlock.check(str(tmp_path / "alive"))
        reused = dataclasses.replace(alive, pid_start=alive.pid_start - 1)
        assert runlock.stale_reason(reused, path) == (f"its holder ({reused.describe()}) is no longer running (pid "
                                                      f"{sleeper.pid} is another process now)")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert runlock.stale_reason(alive, path) == f"its holder ({alive.describe()}) is no longer running"
    assert runlock.check(str(tmp_path / "alive")) is None
