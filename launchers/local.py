"""Local multi-process launch: `launcher.nproc_per_node` rank processes of the same command line.

`python -m distft launcher.nproc_per_node=N parallel=ddp` re-runs the same command line as N
rank processes on this machine (`launch_ranks`). The launcher is what a shell, a person or a
scheduler sees as the job, so it behaves like one process:
- the ranks are in its process group (what Ctrl-C, `kill -- -PGID` and job control reach) and die
  with it (a parent-death signal: `kill -9` of the launcher alone leaves no rank training on);
- a signal sent to the launcher alone (`kill -USR2 <pid>`, the documented stop; SIGINT, SIGTERM,
  SIGHUP) is forwarded to every rank; one the terminal already sent to the whole group (Ctrl-C) is
  not sent twice (told apart by the sender, `siginfo.si_code`);
- when a rank fails, the others are stopped (SIGTERM: their prompt exit, distft/preemption.py)
  and one line names the rank that failed first and how; no survivor waits in a collective;
- its exit code is the ranks' own when they agree (0, 2 bad input, 3 non-finite, 4 stopped by the
  signal, 130 Ctrl-C), else 1; when one rank ends with such a code and its peers do not follow
  within STOP_GRACE_S (rank 0 alone met a full disk), they are stopped and the job's code is that
  rank's.

With `launcher.nnodes` > 1 the same command runs on every node and torch's elastic agent
(what `torchrun` runs) meets the other nodes at `launcher.rdzv_endpoint` (c10d rendezvous, no
SLURM needed); its ranks get the same parent-death signal, and the stop signal is added to the
signals the agent forwards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Optional

from distft.config import Config, config_hash
from distft.preemption import LAUNCHER_PID, signal_number

log = logging.getLogger("distft")

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
SI_KERNEL = 0x80  # siginfo.si_code of a signal the kernel sent: the terminal's Ctrl-C to the whole group
ORDERLY_EXITS = (0, 2, 3, 4, 130)  # what a rank returns on its own (distft/commands/train.py), failures aside
STOP_GRACE_S = 10.0  # after SIGTERM, how long the survivors of a failed rank get before SIGKILL


def launch(cfg: Config, argv: list[str]) -> int:
    """Run `python -m distft <argv>` as `launcher.nproc_per_node` local ranks; returns the exit code."""
    if cfg.launcher.nnodes > 1:
        return _launch_elastic(cfg, argv)
    return launch_ranks(cfg.launcher.nproc_per_node, [sys.executable, "-m", "distft", *argv],
                        monitor_interval_s=cfg.launcher.monitor_interval_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(nproc: int, command: list[str], monitor_interval_s: float = 0.5, env: Optional[dict] = None,
                 stop_grace_s: float = STOP_GRACE_S) -> int:
    """Start `command` as `nproc` ranks of one process group (env:// rendezvous on this machine),
    watch them, forward signals, and return the job's exit code (module docstring)."""
    base = dict(os.environ if env is None else env)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", TORCHELASTIC_RUN_ID=str(uuid.uuid4()),
                **{LAUNCHER_PID: str(os.getpid())})
    # Blocked here, handled below by sigtimedwait; inherited blocked by the ranks, which unblock
    # them once their handlers are in (preemption.install): none is lost while a rank starts.
    # SIGCHLD too: sigtimedwait wakes the moment a rank ends, so the rank that failed first is the
    # one named, not a survivor that failed a collective with it within the same polling interval.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, (*FORWARDED, signal.SIGCHLD))
    ranks: list[subprocess.Popen] = []
    try:
        for rank in range(nproc):
            ranks.append(subprocess.Popen(command, env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        return _watch(ranks, monitor_interval_s, stop_grace_s)
    finally:
        for proc in ranks:  # only after an error in the launcher itself: never leave a rank behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def _watch(ranks: list[subprocess.Popen], interval: float, grace: float = STOP_GRACE_S) -> int:
    pids = {proc.pid for proc in ranks}
    first: Optional[tuple[int, int]] = None  # (rank, returncode) of the first rank to end non-zero
    stopping_since: Optional[float] = None  # when the survivors were sent SIGTERM
    waiting_since: Optional[float] = None  # when a rank ended with an orderly non-zero code first
    while True:
        codes = [proc.poll() for proc in ranks]
        ended = [(rank, code) for rank, code in enumerate(codes) if code]
        if ended and first is None:
            # Seen in the same wake-up: a rank a signal killed (SIGKILL, the OOM killer) is the
            # cause, and one that exited with an error most likely lost its peer in a collective;
            # an orderly exit (2, 3, 4, 130) comes after both.
            first = min(ended, key=lambda e: (e[1] >= 0, e[1] in ORDERLY_EXITS, e[0]))
        if all(code is not None for code in codes):
            break
        now = time.time()
        if first is not None and first[1] in ORDERLY_EXITS and stopping_since is None:
            # Its peers normally end the same way at once (every rank stops, or refuses, together);
            # one that does not (rank 0 alone met a full disk) would wait in its next collective.
            waiting_since = waiting_since or now
            if now - waiting_since > grace:
                stopping_since = now
                _signal_all(ranks, signal.SIGTERM)
        elif first is not None and stopping_since is None:  # a failure: stop the others now
            stopping_since = now
            _signal_all(ranks, signal.SIGTERM)
        if stopping_since is not None and now - stopping_since > grace:
            _signal_all(ranks, signal.SIGKILL)
        info = signal.sigtimedwait((*FORWARDED, signal.SIGCHLD), interval)
        if info is None or info.si_signo == signal.SIGCHLD:
            continue  # a rank ended (polled at once) or the interval passed
        if info.si_code != SI_KERNEL and info.si_pid not in pids:
            _signal_all(ranks, info.si_signo)  # sent to the launcher alone: every rank gets it
    codes = [proc.returncode for proc in ranks]
    if len(set(codes)) == 1:
        return codes[0]
    if first is None:  # cannot be: the codes differ, so one is non-zero
        first = next((r, c) for r, c in enumerate(codes) if c)
    print(f"distft: {describe_failure(ranks, *first)}", file=sys.stderr, flush=True)
    # An orderly code first (2 bad input, 3 non-finite, 4 stopped, 130 Ctrl-C) is the job's: what
    # its peers did after it (a lost collective) is a consequence.
    return first[1] if first[1] in ORDERLY_EXITS else 1


def _signal_all(ranks: list[subprocess.Popen], signum: int) -> None:
    for proc in ranks:
        if proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass


def describe_failure(ranks: list[subprocess.Popen], rank: int, code: int) -> str:
    """One line naming the rank that ended first (a failure, or an orderly exit its peers did
    not follow); the others were stopped after it."""
    others = len(ranks) - 1
    after = f"; the job's other rank{'s' if others > 1 else ''} were stopped" if others else ""
    if code in ORDERLY_EXITS:
        return f"rank {rank} (pid {ranks[rank].pid}) ended first, with exit code {code} (its message is above){after}"
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return f"rank {rank} (pid {ranks[rank].pid}) failed first, with {how}{after}"


def _launch_elastic(cfg: Config, argv: list[str]) -> int:
    """Several nodes without SLURM: torch's elastic agent meets the other nodes' agents at
    launcher.rdzv_endpoint and starts this node's ranks."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launcher = cfg.launcher
    config = LaunchConfig(
        min_nodes=launcher.nnodes,
        max_nodes=launcher.nnodes,
        nproc_per_node=launcher.nproc_per_node,
        rdzv_backend="c10d",
        rdzv_endpoint=launcher.rdzv_endpoint,
        rdzv_configs={"timeout": cfg.parallel.timeout_s},
        run_id=f"distft-{cfg.run.experiment}-{config_hash(cfg)}",  # every node of the job shares it
        max_restarts=0,  # restarting in place is the SLURM requeue's job, with resume
        monitor_interval=launcher.monitor_interval_s,
        start_method="spawn",
    )
    stop = signal.Signals(signal_number(launcher.signal)).name
    handled = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    if stop not in handled.split(","):
        os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = f"{handled},{stop}"  # forwarded to the ranks
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        # Ranks inherit this process's environment, which is where the entry point put any secret
        # given on the command line (distft.commands.train.secrets_to_environment): `argv` has none, so
        # no rank's command line (visible to every user in `ps`) carries one.
        elastic_launch(config, entrypoint=sys.executable)("-m", "distft", *argv)
    except ChildFailedError as err:
        print(f"distft: {describe_elastic_failure(err.failures)}", file=sys.stderr)
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
    from distft.plan import refusal  # lazy: torch (the planner's meta build); this module stays torch-free

    try:
        gpus = gpus or local_gpus(cfg.train.device, cfg.launcher.nproc_per_node)
        if not gpus:
            return None

        def on_these_gpus(cfg: Config) -> Config:
            model = cfg.model
            if model.dtype == "auto":  # as distft.model.build.resolve_dtype will on these GPUs
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


def describe_elastic_failure(failures: dict) -> str:
    """One line naming the rank(s) that died first. The agent stops the survivors with SIGTERM,
    so those are the consequence, not the cause (its timestamps have one-second resolution)."""
    causes = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    parts = []
    for rank, failure in sorted(causes.items()):
        how = f"signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        parts.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed with {how}")
    return "; ".join(parts) + "; the job's other ranks were stopped"
