"""tests/unit runs in process: its conftest.py refuses every way a test could start a process
(the tests that start one are tests/cli's)."""

from __future__ import annotations

import inspect
import multiprocessing
import os
import pickle
import posix
import subprocess

import pytest

from tests.unit.conftest import StartsAProcess


def test_starting_a_process_in_a_unit_test_raises_the_guards_error(in_process):
    with pytest.raises(StartsAProcess, match=r"tests/unit runs in process: this test starts a process "
                                             r"\(subprocess \['true'\]\); it belongs in tests/cli/"):
        subprocess.run(["true"])
    assert in_process == ["subprocess ['true']"]
    in_process.clear()  # seen here, where it was the point (else the test fails at its end)


@pytest.mark.parametrize("start", [
    lambda: subprocess.check_output(["true"]),
    lambda: os.system("true"),
    lambda: posix.system("true"),
    lambda: os.fork(),
    lambda: os.posix_spawnp("true", ["true"], os.environ),
    lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
], ids=["check_output", "os.system", "posix.system", "os.fork", "os.posix_spawnp", "multiprocessing"])
def test_every_way_to_start_one_is_refused(start, in_process):
    with pytest.raises(StartsAProcess, match="it belongs in tests/cli/"):
        start()
    in_process.clear()  # seen here, where it was the point


def test_the_guard_changes_only_what_calling_a_start_does():
    """A pickle of os.system and a check of its signature (the payloads, the augment validation)
    see the same function the process outside the guard has."""
    assert pickle.loads(pickle.dumps(os.system)) is os.system is posix.system
    assert pickle.dumps(os.system, protocol=4) == b"\x80\x04\x95\x14\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94."
    assert str(inspect.signature(os.system)) == "(command)"
