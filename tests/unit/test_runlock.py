"""When a run directory's lock is stale (distft/runlock.py): judged against real processes, real
lock files and their real heartbeat (mtime), with no SLURM controller to ask (scontrol not on
PATH, as on a login node whose controller does not answer); the SLURM cases with a controller
are tests/slurm's.

The tests that start a process: tests/cli/test_runlock.py."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

import pytest

from distft import runlock


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
