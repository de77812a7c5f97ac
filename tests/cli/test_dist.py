"""Process-level settings each rank makes for itself (distft/dist.py), against a real busy process.

The in-process tests: tests/unit/test_dist.py."""

from __future__ import annotations

import os

from distft import dist


def test_busy_cores_sees_a_process_computing_now_and_forgets_one_that_ended():
    """A busy loop beside this process counts as about one busy core while it runs, and nothing
    once it has ended (the 1-minute load average would still count most of it).

    The reading is of the whole machine, so it can only show the loop where a core is free: under
    xdist another worker's run can fill both cores of a 2-core machine (CI read 2.0 during, 1.84
    after). So `make test` runs this first (tests/conftest.py QUIET_FIRST), while the other worker
    starts its first group on at most one core, and the test waits, up to 3 minutes, for a window
    that starts with most of a core free and keeps the other load steady, and asserts on it. A
    busy_cores that followed the load average, or read nothing, fails in every window alike."""
    import subprocess
    import sys
    import time

    cores = len(os.sched_getaffinity(0))
    deadline = time.monotonic() + 180
    windows = []
    while True:
        before = dist.busy_cores(interval=0.5)
        if before <= cores - 0.8 or time.monotonic() > deadline:
            loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                time.sleep(0.5)
                during = dist.busy_cores(interval=1.0)
            finally:
                loop.kill()
                loop.wait()
            after = dist.busy_cores(interval=1.0)
            windows.append((before, during, after))
            if during >= after + 0.6 or time.monotonic() > deadline:
                break
        time.sleep(1.0)  # let the other load move on
    assert during >= after + 0.6, windows

