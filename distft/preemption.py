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
  rerun resumes from the final checkpoint and only evaluates (the answers so far are kept in the
  run directory: evaluation/evaluate.py AnswerLog) and reports;
- after the summary is written: nothing to do; the process ends normally (COMPLETED), and once
  every rank is through its last collective the signals are ignored (`ignore_late_signals`).

A SLURM job segment that made no progress (no step, no prompt of the final evaluation answered)
when its time limit's signal came is not requeued (SegmentTooShort, exit 2): the next segment
would stop the same way until the requeue budget is spent. A signal that is not the time
limit's (a preemption, an operator's `scancel --signal`) requeues as usual. Before that,
`segment_problem` refuses a launcher.time_min that cannot hold signal_delay_s plus start-up
(validation, the submission), and `start_problem` a job step whose end is already too near (the
sbatch template's path).

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
from distft.errors import EXIT_INTERRUPTED, EXIT_STOPPED, Preempted, SegmentTooShort  # noqa: F401  (re-exported)

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
_stop_signals: set[int] = set(EARLY_STOP_SIGNALS)  # and the configured one (StopSignal)
STARTED = time.time()  # this module is the first thing a process imports: the process's start
# SLURM sends the time limit's signal up to 60 s before `--signal`'s delay (its event resolution).
TIME_LIMIT_SLACK_S = 90
# What a job segment needs between its start and the stop signal to take one step: measured 25-50 s
# of start-up for the tiny model on 2 busy CPU cores (import, rendezvous, data, model), 1-2 min to
# load a 7B from local disk. A run directory's own measurement (startup.json) raises it.
MIN_SEGMENT_S = 60
STARTUP_FILE = "startup.json"


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
    faults.sleep_at(phase, received)


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


def _process_ends_with_the_run() -> bool:
    """Whether this process exists to run one job and leaves when it ends: a rank a launcher
    started (local, torch's agent, a SLURM step, a submitit job). A script, notebook or test that
    calls train() goes on after it, and what it starts next inherits ignored signals."""
    return any(os.environ.get(key) for key in (LAUNCHER_PID, "DISTFT_RANK_PROCESS", "SLURM_STEP_ID",
                                               "SUBMITIT_EXECUTOR", "TORCHELASTIC_RUN_ID"))


def ignore_late_signals(leaving: bool = False) -> None:
    """The run ended in order (finished, stopped with its checkpoint, or refused its input) and
    the process is leaving with its own exit code: from here a stop signal, SIGTERM or the
    configured signal has nothing left to act on, so it is ignored. Without this, a time limit's
    USR2 landing while the interpreter tears down killed a finished rank: CPython resets Python
    handlers to the default action at finalization (it keeps SIG_IGN), SLURM recorded FAILED
    140, and srun's --kill-on-bad-exit SIGTERMed the peers of a rank that exited 4 first (143).
    StopSignal puts the handlers back for another run in the same process. Only in a process
    that ends with the run (`_process_ends_with_the_run`), or `leaving` (the entry point's exit):
    ignored signals are inherited by every process started afterwards, so a caller that goes on
    (a notebook, a test) keeps its own."""
    if not (leaving or _process_ends_with_the_run()):
        return
    for signum in (*_stop_signals, signal.SIGTERM):
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread: nothing to change from here
            return


def record_startup(run_dir: str) -> None:
    """Rank 0, at the first step of a process: how long start-up took (from the process's start to
    its first applied step), kept in the run directory as the largest seen, for the next
    submission's check that launcher.time_min leaves room for it (`startup_s`)."""
    from distft.files import write_json

    took = time.time() - STARTED
    if took <= startup_s(run_dir):
        return
    try:
        write_json(os.path.join(run_dir, STARTUP_FILE), {"startup_s": round(took, 1)}, root=run_dir)
    except OSError as err:  # a measurement: never worth failing a run over
        log.debug("startup.json not written: %s", err)


def startup_s(run_dir: str) -> float:
    """The longest start-up measured in this run directory (0 when none): untrusted, read as a
    bounded regular file, anything malformed is no measurement."""
    from distft.files import read_json

    try:
        value = read_json(os.path.join(run_dir, STARTUP_FILE), max_bytes=4096).get("startup_s", 0)
        return float(value) if isinstance(value, (int, float)) and 0 <= value < 1e6 else 0.0
    except (OSError, ValueError, AttributeError):
        return 0.0


def segment_problem(time_min: Optional[int], signal_delay_s: int, startup: float = 0.0) -> Optional[str]:
    """Whether a job segment of `time_min` minutes can take a step before its stop signal comes
    `signal_delay_s` before the end; `startup`: the run directory's measured start-up, if any.
    A segment that cannot would stop before its first step and requeue without progress."""
    if not time_min or time_min <= 0:
        return None
    need = max(MIN_SEGMENT_S, startup)
    left = time_min * 60 - signal_delay_s
    if left >= need:
        return None
    measured = f"measured {startup:.0f} s in this run directory" if startup > MIN_SEGMENT_S else \
        f"allow at least {MIN_SEGMENT_S} s"
    return (f"launcher.time_min={time_min} ({time_min * 60} s) leaves {left} s before the stop signal that "
            f"launcher.signal_delay_s={signal_delay_s} sends, less than start-up and a first step take ({measured}): "
            "every job segment would stop before its first step and requeue without progress; raise "
            f"launcher.time_min to at least {-(-(signal_delay_s + need) // 60):.0f} or lower launcher.signal_delay_s")


def job_time_left_s(job: str) -> Optional[tuple[float, str]]:
    """(seconds until the job's end time, its time limit as SLURM prints it), from the
    controller; None when it cannot say (no scontrol, no end time)."""
    import re

    try:  # (launchers/slurm.py job_fields asks the same; this module stays below the launchers)
        shown = subprocess.run(["scontrol", "show", "job", job, "--oneliner"], capture_output=True, text=True,
                               timeout=30).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", shown))
        end = time.mktime(time.strptime(fields["EndTime"], "%Y-%m-%dT%H:%M:%S"))
    except (OSError, subprocess.TimeoutExpired, KeyError, ValueError, OverflowError):
        return None
    return end - time.time(), fields.get("TimeLimit", "?")


def start_problem(cfg: Config) -> Optional[str]:
    """At the start of a SLURM job's rank (the sbatch template's path, where no submission
    checked launcher.time_min): a job whose end is so near that the stop signal
    (launcher.signal_delay_s before it) comes before a first step could be taken would requeue
    without progress until its budget is spent. Said here, before anything loads."""
    job = slurm_job_id()
    if not job:
        return None
    found = job_time_left_s(job)
    if found is None:
        return None
    left, limit = found
    delay = cfg.launcher.signal_delay_s
    if left - delay >= MIN_SEGMENT_S:
        return None
    return (f"job {job} ends in {left:.0f} s (time limit {limit}) and its stop signal comes "
            f"launcher.signal_delay_s={delay} s before that: {max(left - delay, 0):.0f} s is less than start-up "
            f"and a first step take (at least {MIN_SEGMENT_S} s); not started, so it does not requeue without "
            "progress. Give the job a longer time limit (sbatch --time) or a shorter --signal delay, keeping "
            "launcher.signal_delay_s in step with it")


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
        _stop_signals.add(self.signum)
        if phase() == "finished":  # another run in this process (a test, a sweep on the basic launcher)
            _phase[0] = "start-up"
        if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:  # ignore_late_signals of an earlier run
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
        if self.signum not in EARLY_STOP_SIGNALS and signal.getsignal(self.signum) is _record:
            signal.signal(self.signum, signal.SIG_DFL)
        finished = phase() == "finished"
        reset()
        if finished:  # until the process ends: a late signal is "after the run finished", not start-up
            _phase[0] = "finished"

    def stop(self, step: int, checkpoint: Optional[str], is_main: bool, when: str = "",
             progress: bool = True) -> Exception:
        """After the stop checkpoint is committed on every rank: requeue (rank 0) if allowed, and
        return the exception that ends the run on every rank. `when`: the phase, said in the
        message when it is not a training step ("before its first step", "during the final
        evaluation"). `progress`: whether this process trained a step (or answered a prompt of
        the final evaluation); a segment that made none when the time limit's signal came is not
        requeued (SegmentTooShort: the next one would stop the same way)."""
        where = (f"checkpoint of step {step}: {checkpoint}" if checkpoint
                 else "nothing trained yet, nothing to save")
        at = f"stopped {when}" if when else f"stopped at step {step}"
        if self.interrupted:
            return Preempted(f"{at} by Ctrl-C ({where}); rerun the same command to resume", requeued=False,
                             interrupted=True)
        job, used, budget = slurm_job_id(), requeue_count(), self.cfg.launcher.max_requeues
        if job and not progress:
            too_short = self._without_progress(job, at, checkpoint)
            if too_short is not None:
                return too_short
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
        reason = (f"the job was requeued {used} times already (launcher.max_requeues={budget}, which counts every "
                  "restart: the stop signal's requeues and SLURM's after a node failure alike)" if job
                  else "not a SLURM job, nothing to requeue")
        return Preempted(f"{at} by {signal.Signals(self.signum).name}, {where}; {reason}; "
                         "rerun the same command to resume", requeued=False)


    def _without_progress(self, job: str, at: str, checkpoint: Optional[str]):
        """A segment that trained nothing (or answered no prompt of the final evaluation): the
        controller's end time says whether the signal was the time limit's (`no_progress_refusal`)."""
        found = job_time_left_s(job)
        if found is None:
            return None
        return no_progress_refusal(self.cfg, at, checkpoint, *found, since=time.time() - STARTED)


def no_progress_refusal(cfg: Config, at: str, checkpoint: Optional[str], left: float, limit: str,
                        since: float) -> Optional[SegmentTooShort]:
    """A segment stopped `at` ("stopped before its first step", "stopped during the final
    evaluation, ...") with no progress, `left` seconds before its job's end (time limit `limit`),
    `since` seconds after it started. When the signal is the time limit's (it came within
    launcher.signal_delay_s, plus SLURM's slack, of the end), a requeued segment would stop the
    same way until the requeue budget is spent: the error that ends it instead, naming the cause
    and the fix. None when the signal came earlier (a preemption, an operator's scancel
    --signal): the job requeues as usual."""
    delay = cfg.launcher.signal_delay_s
    if left > delay + TIME_LIMIT_SLACK_S:
        return None
    time_min = cfg.launcher.time_min
    limit_text = f"launcher.time_min={time_min}" if time_min else f"the job's time limit ({limit})"
    if "final evaluation" in at:
        return SegmentTooShort(
            f"{at}: the time limit's stop signal came before this job segment answered one more prompt; the final "
            f"evaluation does not fit in {limit_text}: lower eval.num_samples, raise launcher.time_min, or run "
            f"python -m distft.evaluate {checkpoint or '<run dir>'}; not requeued (the final checkpoint is kept)")
    return SegmentTooShort(
        f"{at}: the stop signal came {since:.0f} s after this job segment started, {max(left, 0):.0f} s before its "
        f"end, before a first step: {limit_text} leaves too little after launcher.signal_delay_s={delay} for "
        "start-up; not requeued (every segment would stop the same way). Raise the time limit or lower "
        "launcher.signal_delay_s, then rerun the same command")
