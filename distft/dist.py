"""Who am I in the job: rank and world size from torchrun, submitit or SLURM; the process group.

Only this module and engines/ touch torch.distributed. Single-process runs never initialise a
process group, so every helper here also works without one.
"""

from __future__ import annotations

import math
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


def cpu_threads(cores: int, local_ranks: int, busy: float) -> int:
    """The compute threads of one CPU rank: the cores that other processes leave free (`busy`:
    their load, in cores), shared evenly by the ranks on this machine, and at least 1.

    Never more threads than free cores: torch's default, one per core, spins at every parallel
    region's barrier, and one thread waiting for a core another process holds stalls every matrix
    product. Measured on 2 cores (bench/RESULTS.md, "CPU threads"): on free cores 2 threads were
    1.45x (the default job) and 1.6x (a SmolLM2 LoRA step) faster than 1; with any other process
    computing, 2-22x slower, evaluation most. N ranks on N cores with a thread per core each
    stalled for seconds a step (torchrun sets OMP_NUM_THREADS=1 for the same reason)."""
    free = int(math.floor(cores - busy + 0.5))
    return max(1, min(cores, free) // max(1, local_ranks))


def share_cpu_threads(device: torch.device) -> tuple[int, str]:
    """Set this CPU rank's torch threads by `cpu_threads`: (threads, why, for the log line).

    The cores are the ones this process may run on; the load of the others is what they compute
    now (`busy_cores`: a quarter-second sample of /proc/stat, while this process waits), not the
    1-minute load average, which still counts a job that ended a minute ago (a run started right
    after another took 1 thread for nothing, 1.45-1.6x slower). A load that starts later is not
    seen: OMP_NUM_THREADS=1 is the setting for a machine known to be shared. An OMP_NUM_THREADS
    the user set always wins. Only CPU ranks are touched (GPU ranks barely compute on the host)."""
    if device.type != "cpu":
        return torch.get_num_threads(), "a GPU rank: its host threads are left as they are"
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} from the environment"
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores()
    torch.set_num_threads(cpu_threads(cores, local, busy))
    ranks = f", shared by {local} ranks" if local > 1 else ""
    return torch.get_num_threads(), (f"{cores} cores, {busy:.1f} busy with other work{ranks}; "
                                     "OMP_NUM_THREADS=N sets it")


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's first line."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # guest time is inside user already


def busy_cores(interval: float = 0.25) -> float:
    """How many cores other processes keep busy right now: the machine's busy share over
    `interval` seconds (this process sleeps through it) times its cores; the 1-minute load
    average where /proc/stat cannot be read."""
    import time

    try:
        busy0, total0 = _cpu_times()
        time.sleep(interval)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform: the cores count as free
            return 0.0
    share = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    return round(share * (os.cpu_count() or 1), 2)


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
