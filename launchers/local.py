"""Local multi-process launch through torch's elastic agent (what `torchrun` runs).

`python -m distft launcher.nproc_per_node=N parallel=ddp` re-runs the same command line as N
rank processes. The agent sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR for each, watches them,
and when one dies it stops the others and reports which rank failed: the job ends with a non-zero
exit and leaves no orphan behind, instead of the survivors waiting in a collective until the
timeout. With `launcher.nnodes` > 1 the same command runs on every node and the agents meet at
`launcher.rdzv_endpoint` (c10d rendezvous, no SLURM needed).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import uuid
from typing import Optional

from distft.config import Config, config_hash

log = logging.getLogger("distft")


def launch(cfg: Config, argv: list[str]) -> int:
    """Run `python -m distft <argv>` as `launcher.nproc_per_node` local ranks; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launcher = cfg.launcher
    standalone = launcher.nnodes == 1
    config = LaunchConfig(
        min_nodes=launcher.nnodes,
        max_nodes=launcher.nnodes,
        nproc_per_node=launcher.nproc_per_node,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if standalone else launcher.rdzv_endpoint,
        rdzv_configs={"timeout": cfg.parallel.timeout_s},
        # A unique id for a single node; every node of a multi-node job must share one.
        run_id=str(uuid.uuid4()) if standalone else f"distft-{cfg.run.experiment}-{config_hash(cfg)}",
        max_restarts=0,  # restarting in place is the SLURM requeue's job, with resume
        monitor_interval=launcher.monitor_interval_s,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "distft", *argv)
    except ChildFailedError as err:
        print(f"distft: {describe_failure(err.failures)}", file=sys.stderr)
        return 1
    return 0


def local_gpus(device: str) -> Optional[tuple[float, bool]]:
    """(GiB, bf16) of the GPU(s) a local run on `train.device` would use: the smallest when ranks
    spread over several, and whether they compute in bf16 (model.dtype=auto picks it then). None
    when the run is on the CPU."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    indices = [int(device.split(":")[1])] if device.startswith("cuda:") else list(range(torch.cuda.device_count()))
    return min(torch.cuda.get_device_properties(i).total_memory for i in indices) / 2**30, torch.cuda.is_bf16_supported()


def plan_refusal(cfg: Config, gpus: Optional[tuple[float, bool]] = None) -> Optional[str]:
    """The planner before a local job starts, against the GPUs it would run on (`gpus`: GiB each
    and bf16 support, read from this machine when not given). The cluster profile's size is what
    a submission elsewhere is checked against; the GPUs here are what this run gets. A job that
    cannot fit is not started (unless plan.override=true) rather than failing with out-of-memory
    after the model has loaded. Nothing is checked on the CPU."""
    from distft.plan import refusal

    gpus = gpus or local_gpus(cfg.train.device)
    if not gpus:
        return None
    memory_gb, bf16 = gpus
    model = cfg.model
    if model.dtype == "auto":  # as distft.model.resolve_dtype will on these GPUs
        model = dataclasses.replace(model, dtype="bfloat16" if bf16 else "float32")
    cluster = dataclasses.replace(cfg.cluster, gpu_memory_gb=memory_gb,
                                  gpus_per_node=max(cfg.cluster.gpus_per_node, cfg.launcher.nproc_per_node))
    here = dataclasses.replace(cfg, model=model, cluster=cluster)
    return refusal(here, "not started", where=f"this machine's GPUs ({memory_gb:.1f} GiB each)")


def describe_failure(failures: dict) -> str:
    """One line naming the rank(s) that died first. The agent stops the survivors with SIGTERM,
    so those are the consequence, not the cause (its timestamps have one-second resolution)."""
    causes = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    parts = []
    for rank, failure in sorted(causes.items()):
        how = f"signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        parts.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed with {how}")
    return "; ".join(parts) + "; the job's other ranks were stopped"
