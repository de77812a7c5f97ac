"""When a run directory's lock is stale (distft/runlock.py): judged against real processes, real
lock files and their real heartbeat (mtime), with no SLURM controller to ask (scontrol not on
PATH, as on a login node whose controller does not answer); the SLURM cases with a controller
are tests/slurm's."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
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


def test_a_lock_naming_a_live_process_that_holds_nothing_is_taken_over(no_controller, tmp_path, caplog):
    """pid 1 (alive for as long as the machine, its start time right) in a lock whose heartbeat
    stopped long ago: taken over at once with a warning saying why, instead of blocking every
    start (a data cache's waiters for data.cache_wait_s, 2 h)."""
    planted = runlock.Holder(pid=1, host=socket.gethostname(), job=None, started=time.time() - 3600,
                             pid_start=runlock._process_start(1), boot_id=runlock._boot_id())
    path = _lock_of(planted, tmp_path / "run", age_s=3600)
    with caplog.at_level("WARNING", logger="distft"):
        lock = runlock.acquire(str(tmp_path / "run"))
    try:
        assert runlock.read_holder(path).pid == os.getpid()
        assert [r.getMessage() for r in caplog.records] == [
            f"run directory {tmp_path / 'run'}: taking over its lock, its holder ({planted.describe()}) has not "
            f"refreshed it for 3600 s (it does every 30 s): pid 1 is running but does not hold it"]
    finally:
        lock.release()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("planted", ["fifo", "link"])
def test_a_lock_that_is_not_a_file_is_taken_over_without_blocking_or_following(no_controller, tmp_path, planted):
    """A FIFO where the lock goes would block its reader forever; a link (here to a real lock
    file of a live holder elsewhere, fresh) is never followed: either is taken over at once and
    the link's target is left as it was."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / runlock.LOCK
    elsewhere = _lock_of(runlock.me(), tmp_path / "elsewhere")
    before = open(elsewhere).read()
    if planted == "fifo":
        os.mkfifo(path)
    else:
        os.symlink(elsewhere, path)
    lock = runlock.acquire(str(run_dir))
    try:
        assert os.path.isfile(path) and not os.path.islink(path) and runlock.read_holder(str(path)) == lock.holder
        assert open(elsewhere).read() == before
    finally:
        lock.release()
