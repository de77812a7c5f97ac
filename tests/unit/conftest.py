"""tests/unit runs in process. The tiers mirror the package: unit/ in this process, cli/ the tests
that start a process (a command, a launcher's ranks, a tokenizing pool, a shell), distributed/
two gloo ranks, slurm/ the real cluster. The guard below keeps unit/ true to that: while a
tests/unit module runs (its module-scoped fixtures included), starting a process fails with the
test's name for it, however it is started: subprocess (run, check_output, Popen, os.popen,
asyncio), os.fork / forkpty / posix_spawn / system (os.spawn* fork; posix's own, which a pickle
reaches directly, too), or a multiprocessing / multiprocess (datasets') process, pool or helper
process. A test that starts one, even where the process is not its point (a library asking
`scontrol`, `git`, a compiler), belongs in tests/cli/ (tests/unit/test_tiers.py checks the guard)."""

from __future__ import annotations

import functools
import multiprocessing.process
import multiprocessing.util
import os
import posix
import subprocess
from collections.abc import Callable, Iterator

import pytest

try:  # datasets' multiprocessing (dill-pickling copy of the standard one)
    import multiprocess.process
    import multiprocess.util
except ImportError:  # pragma: no cover - an optional dependency's own dependency
    multiprocess = None


class StartsAProcess(BaseException):
    """A tests/unit test started a process. A BaseException, as pytest's own outcomes are: an
    `except OSError` or `except Exception` in the code under test (runlock asking `scontrol`
    whether a job lives, say) does not hide it."""


def _argv(args, kwargs, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


# (owners, attribute, what the start is called in the refusal, from the call's arguments). The
# replacement stands in for the original wherever it is looked up by name: one object for os's
# and posix's attribute, with the original's name, module and signature (functools.wraps), so
# that a pickle of `os.system` or a check of its signature (tests/payloads.py, test_overrides.py)
# sees what it saw before; only calling it differs.
_STARTS: list[tuple[tuple[object, ...], str, Callable[..., str]]] = [
    ((subprocess.Popen,), "__init__", lambda a, k: f"subprocess {_argv(a, k, 1, 'args')!r}"),
    ((os, posix), "system", lambda a, k: f"os.system({_argv(a, k, 0, 'command')!r})"),
    ((os, posix), "fork", lambda a, k: "os.fork()"),
    ((os, posix), "forkpty", lambda a, k: "os.forkpty()"),
    ((os, posix), "posix_spawn", lambda a, k: f"os.posix_spawn {_argv(a, k, 1, 'argv')!r}"),
    ((os, posix), "posix_spawnp", lambda a, k: f"os.posix_spawnp {_argv(a, k, 1, 'argv')!r}"),
]
for _mp in (multiprocessing, multiprocess):
    if _mp is not None:
        _STARTS += [
            ((_mp.process.BaseProcess,), "start",
             lambda a, k, mp=_mp.__name__: f"{mp} process {a[0].name} running {a[0]._target!r}"),
            ((_mp.util,), "spawnv_passfds",  # the forkserver, the resource tracker
             lambda a, k, mp=_mp.__name__: f"{mp} helper process {_argv(a, k, 1, 'args')!r}"),
        ]


def refusal(what: str) -> str:
    return f"tests/unit runs in process: this test starts a process ({what}); it belongs in tests/cli/"


@pytest.fixture(scope="module", autouse=True)
def in_process() -> Iterator[list[str]]:
    """For the whole tests/unit module, from before its own module-scoped fixtures to after them,
    every way to start a process raises StartsAProcess instead; yields the refused starts, in order."""
    refused: list[str] = []

    def refusing(original: Callable, describe: Callable[..., str]) -> Callable[..., None]:
        @functools.wraps(original)
        def refuse(*args, **kwargs) -> None:
            refused.append(describe(args, kwargs))
            raise StartsAProcess(refusal(refused[-1]))
        return refuse

    with pytest.MonkeyPatch.context() as patch:
        for owners, name, describe in _STARTS:
            replacement = refusing(getattr(owners[0], name), describe)
            for owner in owners:
                patch.setattr(owner, name, replacement)
        yield refused


_REFUSAL_SHOWN = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(StartsAProcess):
        item.stash[_REFUSAL_SHOWN] = True
    return report


@pytest.fixture(autouse=True)
def _no_start_went_unseen(in_process: list[str], request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test whose process start was refused out of sight (caught by a bare `except`, or
    raised in a thread of its own, which pytest only warns about)."""
    before = len(in_process)
    yield
    if len(in_process) > before and not request.node.stash.get(_REFUSAL_SHOWN, False):
        pytest.fail(refusal(in_process[before]), pytrace=False)
