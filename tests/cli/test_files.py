"""distft.files against a lock held by another local user (issue 34): a real second process.

The in-process tests: tests/unit/test_files.py."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time

import pytest

from distft import files


@pytest.fixture
def shared_dir():
    """A run directory another user can reach (pytest's own temporary root is private to root)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="distft-shared-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_lock_held_by_another_user_delays_an_append_but_never_hangs_it(shared_dir, monkeypatch):
    """Anyone who can open a file read-only can flock it forever (a second local user: `nobody`,
    through util-linux's flock(1), when the test runs as root). The append waits
    APPEND_LOCK_WAIT_S, then goes ahead unlocked with a warning; its line is whole."""
    path = os.path.join(shared_dir, "metrics.jsonl")
    files.append_line(path, '{"step": 1}')
    command = ["flock", "--exclusive", path, "-c", "echo held; sleep 60"]
    if os.geteuid() == 0:
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with open(path) as mine:  # the lock is really held: this process cannot take it
            with pytest.raises(BlockingIOError):
                fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr(files, "APPEND_LOCK_WAIT_S", 0.5)
        started = time.monotonic()
        files.append_line(path, '{"step": 2}')
        waited = time.monotonic() - started
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert 0.5 <= waited < 5
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2]

