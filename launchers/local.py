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
        # Ranks inherit this process's environment, which is where the entry point put any secret
        # given on the command line (distft.cli.secrets_to_environment): `argv` has none, so
        # no rank's command line (visible to every user in `ps`) carries one.
        elastic_launch(config, entrypoint=sys.executable)("-m", "distft", *argv)
    except ChildFailedError as err:
        print(f"distft: {describe_failure(err.failures)}", file=sys.stderr)
        return 1
    return 0


@dataclasses.dataclass
class LocalGPUs:
    """What a local run on GPUs gets: memory per rank (GiB; the smallest GPU the ranks use,
    divided among ranks that share one), bf16 support, and how many GPUs there are."""

    memory_gb: float
    bf16: bool
    count: int
    shared_by: int = 1  # ranks per GPU: train.device=cuda:N, or more ranks than GPUs


def local_gpus(device: str, ranks: int) -> Optional[LocalGPUs]:
    """The GPUs `ranks` local ranks on `train.device` would use (dist.pick_device's placement:
    rank r on GPU r mod count, or every rank on cuda:N); None when the run is on the CPU. Reads
    device properties only: no CUDA context is created in the launcher (bf16 from the compute
    capability, as torch.cuda.is_bf16_supported would probe with a tensor on older GPUs)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if device.startswith("cuda:"):
        used, shared_by = [int(device.split(":")[1])], ranks
    else:
        used, shared_by = list(range(min(ranks, count))), -(-ranks // count)
    props = [torch.cuda.get_device_properties(i) for i in used]
    return LocalGPUs(memory_gb=min(p.total_memory for p in props) / 2**30 / shared_by,
                     bf16=all(p.major >= 8 for p in props), count=count, shared_by=shared_by)


def plan_refusal(cfg: Config, gpus: Optional[LocalGPUs] = None, argv: Optional[list[str]] = None) -> Optional[str]:
    """The planner before a local job starts, against the GPUs it would run on (`gpus`: read from
    this machine when not given). The cluster profile's size is what a submission elsewhere is
    checked against; the GPUs here are what this run gets. A job that cannot fit is not started
    (unless plan.override=true) rather than failing with out-of-memory after the model has
    loaded. Nothing is checked on the CPU, and a planner that fails warns and lets the run start
    (it would then fail with the run's own message, if at all)."""
    from distft.plan import refusal

    try:
        gpus = gpus or local_gpus(cfg.train.device, cfg.launcher.nproc_per_node)
        if not gpus:
            return None

        def on_these_gpus(cfg: Config) -> Config:
            model = cfg.model
            if model.dtype == "auto":  # as distft.model.resolve_dtype will on these GPUs
                model = dataclasses.replace(model, dtype="bfloat16" if gpus.bf16 else "float32")
            train = cfg.train
            if train.precision == "auto":  # as distft.engines.autocast_dtype will on these GPUs
                train = dataclasses.replace(train, precision="bf16" if gpus.bf16 else "fp32")
            cluster = dataclasses.replace(cfg.cluster, gpu_memory_gb=gpus.memory_gb, gpus_per_node=gpus.count)
            return dataclasses.replace(cfg, model=model, train=train, cluster=cluster)

        where = f"this machine's GPUs ({gpus.memory_gb:.1f} GiB each" + (
            f" of {gpus.shared_by} ranks sharing one)" if gpus.shared_by > 1 else ")")
        return refusal(on_these_gpus(cfg), "not started", where=where, argv=argv, adjust=on_these_gpus)
    except Exception as err:  # noqa: BLE001 - an estimate must not stop a run
        log.warning("distft: the plan before starting failed (%s: %s); starting without it", type(err).__name__, err)
        return None


def describe_failure(failures: dict) -> str:
    """One line naming the rank(s) that died first. The agent stops the survivors with SIGTERM,
    so those are the consequence, not the cause (its timestamps have one-second resolution)."""
    causes = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    parts = []
    for rank, failure in sorted(causes.items()):
        how = f"signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        parts.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed with {how}")
    return "; ".join(parts) + "; the job's other ranks were stopped"
