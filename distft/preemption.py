"""Stop cleanly when the scheduler says so: at the next step boundary, checkpoint, requeue.

SLURM sends `launcher.signal` (SIGUSR2 by default) `launcher.signal_delay_s` before a job's time
limit (`#SBATCH --signal`), and an operator or a preempting scheduler can send it any time
(`scancel --signal=USR2 JOB`). The handler only raises a flag: stopping inside a collective or
half-way through an optimizer step would desynchronise the ranks. At each step boundary the ranks
agree (any rank signalled -> all stop), the trainer writes a checkpoint whatever
`checkpoint.save_every` says (so a time limit shorter than one checkpoint interval still keeps its
work), rank 0 requeues the job, and the requeued job resumes from that checkpoint in the same run
directory and W&B run.

Requeues are bounded by `launcher.max_requeues`, counted by SLURM itself (SLURM_RESTART_COUNT).
When the budget is spent, or outside SLURM, the run stops with its checkpoint and exit code 4:
rerunning the same command resumes it.

Decided: only the configured signal is handled, not SIGTERM. SIGTERM is also what srun and
torch's elastic agent send to the survivors when a rank dies, and those must exit, not try a
collective with a dead peer. A signal that arrives during the final evaluation is not acted on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Optional

from distft import dist
from distft.config import Config

log = logging.getLogger("distft")

EXIT_STOPPED = 4  # stopped by the signal, checkpoint saved, not requeued: rerun to resume


class Preempted(Exception):
    """Raised out of the training loop after the stop checkpoint; `requeued` says whether SLURM
    will run the job again."""

    def __init__(self, message: str, requeued: bool):
        super().__init__(message)
        self.requeued = requeued


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
    """Installed for the training loop. `requested()` is a collective when there are several
    ranks: every rank must call it at the same step boundary."""

    def __init__(self, cfg: Config, device):
        self.cfg, self.device = cfg, device
        self.signum = signal_number(cfg.launcher.signal)
        self.received = False
        # Any one rank may be signalled (SLURM signals them all, a person may signal one): with
        # several ranks they agree at every step boundary (one tiny all-reduce, next to the loss's).
        self.collective = dist.from_env().world_size > 1
        self.previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.received:
            log.warning("received %s: stopping at the next step boundary to checkpoint", signal.Signals(signum).name)
        self.received = True

    def requested(self) -> bool:
        if self.collective:
            return dist.any_rank(self.received, self.device)
        return self.received

    def close(self) -> None:
        signal.signal(self.signum, self.previous if self.previous is not None else signal.SIG_DFL)

    def stop(self, step: int, checkpoint: Optional[str], is_main: bool) -> Preempted:
        """After the stop checkpoint is committed on every rank: requeue (rank 0) if allowed, and
        return the exception that ends the loop on every rank."""
        job, used, budget = slurm_job_id(), requeue_count(), self.cfg.launcher.max_requeues
        where = f"checkpoint of step {step}: {checkpoint}"
        if job and used < budget:
            if is_main:
                result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
                if result.returncode != 0:
                    detail = (result.stderr or result.stdout).strip()
                    return Preempted(f"stopped at step {step} ({where}); `scontrol requeue {job}` failed: {detail}; "
                                     "rerun the same command to resume", requeued=False)
                log.warning("job %s requeued (requeue %d of at most %d); it resumes from the %s",
                            job, used + 1, budget, where)
            return Preempted(f"stopped at step {step}, {where}; job {job} requeued ({used + 1}/{budget})",
                             requeued=True)
        reason = (f"the job was requeued {used} times already (launcher.max_requeues={budget})" if job
                  else "not a SLURM job, nothing to requeue")
        return Preempted(f"stopped at step {step} by {signal.Signals(self.signum).name}, {where}; {reason}; "
                         "rerun the same command to resume", requeued=False)
