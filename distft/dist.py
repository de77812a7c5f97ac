"""Who am I in the job: rank and world size from torchrun, submitit or SLURM; the process group.

Only this module and engines/ touch torch.distributed. Single-process runs never initialise a
process group, so every helper here also works without one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Rank/world from the launcher's environment (torchrun and submitit export RANK and
    WORLD_SIZE; plain srun only sets SLURM_*)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init(info: DistInfo, backend: str, timeout_s: int, device: torch.device) -> None:
    """Join the process group when there are several ranks (env:// from the launcher). A group
    the caller already made is used as it is.

    `timeout_s` bounds every collective: a rank stuck behind a dead peer errors out instead of
    hanging forever (the launcher usually stops it first).
    """
    if info.world_size <= 1 or torch.distributed.is_initialized():
        return
    import datetime

    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        backend=backend, rank=info.rank, world_size=info.world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )


def share_cpu_threads(device: torch.device) -> int:
    """Give the ranks on one machine a fair share of its cores each; returns this rank's threads.

    Every rank would otherwise start one compute thread per core: N ranks on N cores then run N*N
    spinning threads, and a step that takes 0.05 s stalls for seconds (measured: 10 s stalls with 2
    ranks on 2 cores). torchrun sets OMP_NUM_THREADS=1 for the same reason; an OMP_NUM_THREADS
    the user set always wins. Only CPU ranks are touched (GPU ranks barely compute on the host).
    """
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    if local > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local))
    return torch.get_num_threads()


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (`[obj]` without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (`device`: where the backend
    reduces, the CUDA device under NCCL)."""
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], device=device)).item() > 0)


def pick_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", info.local_rank % max(1, torch.cuda.device_count()))
    return torch.device(name)
