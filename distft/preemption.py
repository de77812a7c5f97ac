"""Signals, in every phase of a run: stop cleanly at a step boundary, checkpoint, requeue or exit.

SLURM sends `launcher.signal` (SIGUSR2 by default) `launcher.signal_delay_s` before a job's time
limit (`#SBATCH --signal`), and an operator or a preempting scheduler can send it any time
(`scancel --signal=USR2 JOB`). Ctrl-C sends SIGINT. The handlers only record the signal: stopping
inside a collective or half-way through an optimizer step would desynchronise the ranks. At each
step boundary the ranks agree (any rank signalled -> all stop), the trainer writes a checkpoint
whatever `checkpoint.save_every` says, and then:
- `launcher.signal` in a SLURM job: rank 0 requeues the job (at most `launcher.max_requeues` times,
  counted by SLURM_RESTART_COUNT) and the requeued job resumes in the same run directory and W&B
  run; with the budget spent, or outside SLURM, the run exits 4 (rerun the same command to resume);
- SIGINT (Ctrl-C): "stopped at step N; rerun the same command to resume", exit 130. A second
  Ctrl-C aborts at once (the default action: nothing more is saved). Before training starts
  (start-up, loading) there is nothing to save and Ctrl-C aborts at once, with one line.

The handlers are installed first thing in every process that may train (`install`: the entry
point, a SLURM task, before Hydra composes anything), so a signal in any phase is handled:
- start-up and loading (before the first step): recorded; the run stops before its first step with
  nothing new to save (requeued, or exit 4);
- training: the step finishes, then the checkpoint above;
- the final save, then the final evaluation (the final checkpoint is saved *before* the final
  evaluation): the evaluation stops at its next batch and the run requeues (or exits 4 / 130); the
  rerun resumes from the final checkpoint and only evaluates and reports;
- after the summary is written: nothing to do; the process ends normally (COMPLETED).

Decided: SIGTERM (plain `scancel`, srun and torch's elastic agent stopping the survivors of a failed
rank, a node shutting down) ends a rank at once, with no checkpoint: it is the default action, and
submitit's handler that ignores it inside jobs is replaced. A survivor of a failed peer must exit,
not try a collective with a dead rank; and a step plus a save of a large model does not fit in the
grace SLURM gives before SIGKILL (KillWait, 30 s by default). To stop with a checkpoint, send the
stop signal: `scancel --signal=USR2 JOB` (or `kill -USR2`). `launcher.signal=TERM` makes SIGTERM
the stop signal instead, for clusters that preempt with SIGTERM and a long GraceTime.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Optional

from distft import faults

# The exit codes and the exception the trainer raises live with the others (distft/errors.py).
from distft.errors import EXIT_INTERRUPTED, EXIT_STOPPED, Preempted  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # importing this module must stay cheap: it is the first thing a process does
    from distft.config import Config

log = logging.getLogger("distft")

# Signals recorded from the start of the process; the configured stop signal is one of these
# unless it is TERM (installed by StopSignal when the config is known).
EARLY_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# One interrupt can arrive twice: sent to the whole process group (`kill -INT -- -PGID`, a
# scheduler) and forwarded by the local launcher too. Within this window it is the same one.
SAME_INTERRUPT_S = 0.5
PHASES = ("start-up", "loading", "training", "final", "finished")

LAUNCHER_PID = "DISTFT_LAUNCHER_PID"  # in every rank the local launcher starts: the process it dies with
_received: dict[int, float] = {}  # signal number -> when it first arrived (this run)
_phase = ["start-up"]


def install() -> None:
    """First thing in a process that may train: record the stop signals and Ctrl-C from now on,
    and give SIGTERM back its default action (prompt exit; submitit's job wrapper ignores it)."""
    for signum in EARLY_STOP_SIGNALS:
        signal.signal(signum, _record)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The local launcher starts its ranks with these blocked (launchers/local.py): one that came
    # while this rank started is delivered now, to the handlers above (SIGCHLD, blocked there for
    # its own watch, is unblocked for this rank's children).
    signal.pthread_sigmask(signal.SIG_UNBLOCK,
                           (*EARLY_STOP_SIGNALS, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD))
    die_with_launcher()
    if os.environ.get("DISTFT_FAULTS"):
        faults.signal_at("start-up")


def die_with_launcher() -> None:
    """In a rank the local launcher started: be killed when it dies (PR_SET_PDEATHSIG), and exit
    at once if it is already gone. Linux only; elsewhere nothing happens."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):
        os._exit(1)  # the launcher died before the signal was armed


def set_phase(phase: str) -> None:
    assert phase in PHASES, phase
    _phase[0] = phase
    faults.signal_at(phase)


def phase() -> str:
    return _phase[0]


def received() -> bool:
    """Whether a stop signal or Ctrl-C has arrived in this run (recorded by the handlers)."""
    return bool(_received)


def reset() -> None:
    """After a run in this process: forget its signals (the next run in the same process, a
    test or a sweep on Hydra's basic launcher, starts clean) and go back to start-up."""
    _received.clear()
    _phase[0] = "start-up"
    if signal.getsignal(signal.SIGINT) in (signal.SIG_DFL, _interrupt):
        signal.signal(signal.SIGINT, _interrupt)


def _say(message: str) -> None:
    """One line on stderr from a signal handler (the logger may be mid-line on stdout)."""
    try:
        rank = os.environ.get("RANK")
        os.write(2, (f"distft{f' rank {rank}' if rank else ''}: {message}\n").encode())
    except OSError:
        pass


def _record(signum, frame) -> None:
    name = signal.Signals(signum).name
    if phase() == "finished":
        _say(f"received {name} after the run finished: nothing to do")
        return
    if signum not in _received:
        _received[signum] = time.time()
        _say(f"received {name} " + {
            "start-up": "during start-up: stopping before the first step",
            "loading": "while loading: stopping before the first step",
            "final": "during the final save or evaluation: the final checkpoint is kept, the evaluation stops",
        }.get(phase(), "stopping at the next step boundary to checkpoint"))


def _interrupt(signum, frame) -> None:
    """Ctrl-C. Before training there is nothing to save: abort now. During training and the
    final evaluation: stop at the next boundary with a checkpoint; a second Ctrl-C kills at once."""
    if phase() in ("start-up", "loading"):
        raise KeyboardInterrupt
    if phase() == "finished":
        return
    first = _received.get(signal.SIGINT)
    if first is None:
        _received[signal.SIGINT] = time.time()
        _say("Ctrl-C: stopping after this step to save a checkpoint (Ctrl-C again aborts at once, without saving)")
    elif time.time() - first > SAME_INTERRUPT_S:  # a second Ctrl-C: the default action, at once
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)


def signal_number(name: str) -> int:
    return int(getattr(signal, "SIG" + name.upper().removeprefix("SIG")))


def slurm_job_id() -> Optional[str]:
    """The job to requeue (an array task is requeued by its own id)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


class StopSignal:
    """The run's view of the signals: `requested()` is a collective when there are several ranks
    (every rank calls it at the same boundary). Created at the start of train(); the handlers
    themselves stay installed for the whole process (`install`)."""

    def __init__(self, cfg: Config, device):
        # lazy, here and in requested(): distft.dist imports torch, and this module is the first thing
        # every process imports (torch-free: distft --help, preflight, the launchers)
        from distft import dist

        self.cfg, self.device = cfg, device
        self.signum = signal_number(cfg.launcher.signal)
        if self.signum not in EARLY_STOP_SIGNALS:  # launcher.signal=TERM: SIGTERM checkpoints instead
            signal.signal(self.signum, _record)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # train() called without install()
            signal.signal(signal.SIGINT, _interrupt)
        for signum in EARLY_STOP_SIGNALS:
            if signal.getsignal(signum) is not _record:
                signal.signal(signum, _record)
        # Any one rank may be signalled (SLURM signals them all, a person may signal one): with
        # several ranks they agree at every boundary (one tiny all-reduce, next to the loss's).
        self.collective = dist.from_env().world_size > 1
        self.interrupted = False  # decided by requested(): Ctrl-C on some rank (exit 130, no requeue)

    def _local(self) -> int:
        """0: nothing; 1: the stop signal; 2: Ctrl-C (wins: a person wants it stopped)."""
        return 2 if signal.SIGINT in _received else 1 if self.signum in _received else 0

    @property
    def received(self) -> bool:
        return self._local() > 0

    def requested(self) -> bool:
        local = self._local()
        if self.collective:
            import torch

            from distft import dist

            flags = torch.tensor([float(local == 1), float(local == 2)], device=self.device)
            dist.all_reduce_sum(flags)
            stop, interrupted = bool(flags.sum().item() > 0), bool(flags[1].item() > 0)
        else:
            stop, interrupted = local > 0, local == 2
        self.interrupted = self.interrupted or interrupted
        return stop

    def close(self) -> None:
        """Nothing to undo: the handlers stay for the rest of the process (a signal after the
        summary must not kill a finished run). Forget this run's signals."""
        if self.signum not in EARLY_STOP_SIGNALS:
            signal.signal(self.signum, signal.SIG_DFL)
        reset()

    def stop(self, step: int, checkpoint: Optional[str], is_main: bool, when: str = "") -> Preempted:
        """After the stop checkpoint is committed on every rank: requeue (rank 0) if allowed, and
        return the exception that ends the run on every rank. `when`: the phase, said in the
        message when it is not a training step ("before its first step", "during the final
        evaluation")."""
        where = (f"checkpoint of step {step}: {checkpoint}" if checkpoint
                 else "nothing trained yet, nothing to save")
        at = f"stopped {when}" if when else f"stopped at step {step}"
        if self.interrupted:
            return Preempted(f"{at} by Ctrl-C ({where}); rerun the same command to resume", requeued=False,
                             interrupted=True)
        job, used, budget = slurm_job_id(), requeue_count(), self.cfg.launcher.max_requeues
        if job and used < budget:
            if is_main:
                # Said before the requeue, which ends this job's processes at once: the log's last
                # line, from which `launcher.wait` tells the requeue's cause.
                print(f"distft: {at}, {where}; requeueing job {job} ({used + 1}/{budget})", file=sys.stderr, flush=True)
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    detail = (result.stderr or result.stdout).strip()
                    return Preempted(f"{at} ({where}); `scontrol requeue {job}` failed: {detail}; "
                                     "rerun the same command to resume", requeued=False)
                log.warning("job %s requeued (requeue %d of at most %d); it resumes from the %s",
                            job, used + 1, budget, where)
            return Preempted(f"{at}, {where}; job {job} requeued ({used + 1}/{budget})", requeued=True)
        reason = (f"the job was requeued {used} times already (launcher.max_requeues={budget})" if job
                  else "not a SLURM job, nothing to requeue")
        return Preempted(f"{at} by {signal.Signals(self.signum).name}, {where}; {reason}; "
                         "rerun the same command to resume", requeued=False)

