"""Process-level settings each rank makes for itself (distft/dist.py).

The tests that start a process: tests/cli/test_dist.py."""

from __future__ import annotations

import os

import pytest
import torch

from distft import dist


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_local_ranks_share_the_cores(monkeypatch, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(dist, "busy_cores", lambda: 0.0)  # an idle machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.share_cpu_threads(torch.device("cpu"))[0] == 4 == torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than cores: one thread each, never 0
    assert dist.share_cpu_threads(torch.device("cpu"))[0] == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")  # SLURM's compressed per-node form
    assert dist.share_cpu_threads(torch.device("cpu"))[0] == 2


def test_the_users_thread_setting_wins(monkeypatch, threads):
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.share_cpu_threads(torch.device("cpu")) == (3, "OMP_NUM_THREADS=3 from the environment")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert dist.share_cpu_threads(torch.device("meta"))[0] == 3  # not a CPU rank: untouched


def test_busy_cores_are_left_to_the_processes_that_hold_them():
    """The thread policy (bench/RESULTS.md, "CPU threads"): the cores other processes leave free
    (busy cores sampled at start), shared by this machine's ranks, at least one thread."""
    assert dist.cpu_threads(cores=2, local_ranks=1, busy=0.1) == 2  # an idle 2-core machine: both
    assert dist.cpu_threads(cores=2, local_ranks=1, busy=1.0) == 1  # one busy loop: the other core
    assert dist.cpu_threads(cores=2, local_ranks=1, busy=5.4) == 1  # overloaded: still one
    assert dist.cpu_threads(cores=2, local_ranks=2, busy=0.0) == 1
    assert dist.cpu_threads(cores=16, local_ranks=2, busy=4.2) == 6
    assert dist.cpu_threads(cores=16, local_ranks=1, busy=0.0) == 16


def test_the_choice_reads_the_load(monkeypatch, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(dist, "busy_cores", lambda: 1.2)
    assert dist.share_cpu_threads(torch.device("cpu")) == (1, "2 cores, 1.2 busy with other work; "
                                                              "OMP_NUM_THREADS=N sets it")
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(dist, "busy_cores", lambda: 0.2)
    assert dist.share_cpu_threads(torch.device("cpu"))[0] == 2 == torch.get_num_threads()
