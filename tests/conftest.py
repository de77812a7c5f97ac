"""Fixtures every test directory shares."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trainings(tmp_path_factory):
    """Every whole run the collected test modules declared (tests/distributed/helpers.py,
    declare_run), run once per session in at most three launches."""
    from tests.distributed.helpers import run_declared

    return run_declared(tmp_path_factory.mktemp("runs"))


def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on pytest-xdist workers (`--dist loadgroup`), which keep each
    xdist_group on one worker: a module's tests stay together (its module-scoped fixtures, such
    as one engine matrix launch, run once), and every test that reads the shared runs
    (`trainings`) goes to one worker, where the session fixture runs them once."""
    for item in items:
        group = "trainings" if "trainings" in getattr(item, "fixturenames", ()) else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
