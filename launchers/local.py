"""Local multi-process launch through torch's elastic agent (what `torchrun` runs).

`python -m distft launcher.nproc_per_node=N parallel=ddp` re-runs the same command line as N
rank processes. The agent sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR for each, watches them,
and when one dies it stops the others and reports which rank failed: the job ends with a non-zero
exit and leaves no orphan behind, instead of the survivors waiting in a collective until the
timeout. With `launcher.nnodes` > 1 the same command runs on every node and the agents meet at
`launcher.rdzv_endpoint` (c10d rendezvous, no SLURM needed).
"""

from __future__ import annotations

import logging
import signal
import sys
import uuid

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


def describe_failure(failures: dict) -> str:
    """One line naming the rank(s) that died first. The agent stops the survivors with SIGTERM,
    so those are the consequence, not the cause (its timestamps have one-second resolution)."""
    causes = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    parts = []
    for rank, failure in sorted(causes.items()):
        how = f"signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        parts.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed with {how}")
    return "; ".join(parts) + "; the job's other ranks were stopped"
