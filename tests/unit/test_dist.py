"""Process-level settings each rank makes for itself (distft/dist.py)."""

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
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.share_cpu_threads(torch.device("cpu")) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than cores: one thread each, never 0
    assert dist.share_cpu_threads(torch.device("cpu")) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")  # SLURM's compressed per-node form
    assert dist.share_cpu_threads(torch.device("cpu")) == 2


def test_the_users_thread_setting_wins(monkeypatch, threads):
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert dist.share_cpu_threads(torch.device("cpu")) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert dist.share_cpu_threads(torch.device("meta")) == 3  # not a CPU rank: untouched
