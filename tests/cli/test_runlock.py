"""When a run directory's lock is stale (distft/runlock.py), judged against real processes: a dead
pid, a live process of this host, a live holder's heartbeat.

The in-process tests: tests/unit/test_runlock.py."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from distft import runlock
from distft.errors import RunInUse
from tests.unit import test_runlock as unit
from tests.unit.test_runlock import _lock_of

no_controller = unit.no_controller  # tests/unit/test_runlock.py's fixture


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


def test_a_lock_of_this_host_outside_slurm_is_judged_by_its_process_and_heartbeat(no_controller, tmp_path):
    """No job: a live holder (a real sleeping process, its start time recorded) with a fresh
    heartbeat keeps the lock, and so does a stopped one (SIGSTOP: it cannot beat) whatever its
    heartbeat; a running one whose heartbeat is older than STALE_AFTER_S holds nothing (a holder
    beats every HEARTBEAT_S). Once it is dead the lock is stale, and so it is when its pid names
    another process now (another start time), whatever the heartbeat."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = runlock.Holder(pid=sleeper.pid, host=socket.gethostname(), job=None, started=time.time(),
                               pid_start=runlock._process_start(sleeper.pid), boot_id=runlock._boot_id())
        path = _lock_of(alive, tmp_path / "alive", age_s=runlock.STALE_AFTER_S - 60)
        assert runlock.stale_reason(alive, path) is None
        assert f"stop it (kill {sleeper.pid} on {socket.gethostname()})" in runlock.check(str(tmp_path / "alive"))
        _lock_of(alive, tmp_path / "alive", age_s=runlock.STALE_AFTER_S + 60)
        assert runlock.stale_reason(alive, path) == (
            f"its holder ({alive.describe()}) has not refreshed it for {runlock.STALE_AFTER_S + 60:.0f} s (it does "
            f"every 30 s): pid {sleeper.pid} is running but does not hold it")
        assert runlock.check(str(tmp_path / "alive")) is None
        os.kill(sleeper.pid, signal.SIGSTOP)
        try:
            for _ in range(100):  # the kernel marks it stopped a moment later
                if runlock._process_stat(sleeper.pid)[0] == "T":
                    break
                time.sleep(0.01)
            assert runlock.stale_reason(alive, path) is None
        finally:
            os.kill(sleeper.pid, signal.SIGCONT)
        reused = dataclasses.replace(alive, pid_start=alive.pid_start - 1)
        assert runlock.stale_reason(reused, path) == (f"its holder ({reused.describe()}) is no longer running (pid "
                                                      f"{sleeper.pid} is another process now)")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert runlock.stale_reason(alive, path) == f"its holder ({alive.describe()}) is no longer running"
    assert runlock.check(str(tmp_path / "alive")) is None


@pytest.mark.timeout(60)
def test_a_live_holder_keeps_its_lock_by_its_heartbeat(no_controller, tmp_path):
    """A real holder in another process (RunLock's heartbeat every 0.1 s here): its lock aged
    past STALE_AFTER_S is touched again within a beat, and a second start is refused."""
    holder_script = (
        "import sys, time\n"
        "from distft import runlock\n"
        "runlock.HEARTBEAT_S = 0.1\n"
        "lock = runlock.acquire(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", holder_script, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        path = str(run_dir / runlock.LOCK)
        then = time.time() - runlock.STALE_AFTER_S - 60
        os.utime(path, (then, then))
        time.sleep(0.5)
        assert time.time() - os.lstat(path).st_mtime < 5  # beaten again
        holder = runlock.read_holder(path)
        assert holder.pid == proc.pid and runlock.stale_reason(holder, path) is None
        with pytest.raises(RunInUse, match=f"pid {proc.pid} on {socket.gethostname()}"):
            runlock.acquire(str(run_dir))
    finally:
        proc.kill()
        proc.wait()

