"""Fixtures every test directory shares."""

from __future__ import annotations

import os
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # Under xdist every worker (and the runs it starts, which inherit this) computes on one
    # thread: with 2 workers on 2 cores, torch's default of one thread per core left OpenMP
    # threads spinning against the other worker's ranks (measured: tests 4-8x slower, 2-core
    # CPU time up by a tenth). Ranks that torchrun starts get one thread each anyway.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session")
def trainings(tmp_path_factory):
    """Every whole run the collected test modules declared (tests/distributed/helpers.py,
    declare_run), run once per session in at most three launches. Under xdist the workers share
    them through a directory beside their own temporary ones: the first to need them runs them
    (the others wait on the lock), so they run once even where the grouping below did not hold."""
    import json

    from filelock import FileLock

    from tests.distributed.helpers import Trainings, run_declared

    base = tmp_path_factory.getbasetemp()
    root = base.parent / "shared-runs" if os.environ.get("PYTEST_XDIST_WORKER") else base / "runs"
    root.mkdir(exist_ok=True)
    with FileLock(str(root) + ".lock"):
        done = root / "results.json"
        if not done.exists():
            with open(done.with_suffix(".tmp"), "w") as f:
                json.dump(run_declared(root).results, f)
            os.replace(done.with_suffix(".tmp"), done)
        with open(done) as f:
            return Trainings(root, json.load(f))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on pytest-xdist workers (`--dist loadgroup`), which keep each
    xdist_group on one worker: a module's tests stay together (its module-scoped fixtures, such
    as one engine matrix launch, run once), and every test that reads the shared runs
    (`trainings`) goes to one worker, where the session fixture runs them once."""
    for item in items:
        group = "trainings" if "trainings" in getattr(item, "fixturenames", ()) else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))

