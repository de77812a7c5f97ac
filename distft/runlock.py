"""One owner per run directory: a lock file held by the process that trains in it.

Run directories are deterministic (the same command resumes), so the same command started twice
(a second shell, a resubmission while SLURM already requeued the job, Ctrl-C of
`launcher.wait` and a submit again) would train twice at once in one directory: interleaved
metrics, checkpoints written over each other. Rank 0 of a run takes `<run dir>/run.lock` before
it looks at anything in the directory and keeps it until the run ends; a second starter is
refused with one message naming the holder (pid and host, SLURM job id) and what to do. The
SLURM launcher asks the same question on the login node before it submits.

The lock is a file created with O_EXCL (atomic on local filesystems and NFS, Lustre, GPFS),
holding who took it: pid, host, the process's start time and the boot id (pid reuse and reboots
are told apart from a live holder), the SLURM job id when there is one, and a heartbeat (the
file's mtime, touched every `HEARTBEAT_S`). A lock whose holder is gone is stale and is taken
over with a warning naming it:
- a SLURM job's lock: gone when `scontrol` no longer lists the job as pending or running, or when
  the job is this one (an earlier run of a requeued job: SLURM runs one copy of a job at a time);
  when the controller does not answer, by its heartbeat alone (as below), never by its pid;
- a lock from this host: gone when its pid is dead, or now belongs to another process, or when
  its heartbeat is older than `STALE_AFTER_S` while that process is not stopped: a holder
  refreshes it every `HEARTBEAT_S`, so a running process that has not is one that holds nothing
  (pid 1 in a planted lock, a reused pid whose start time was not recorded), which would
  otherwise keep the lock, and a data cache's waiters, for hours; a stopped holder (Ctrl-Z,
  SIGSTOP) cannot refresh it and keeps it;
- a lock from another host, outside SLURM (nothing there to ask): gone when its heartbeat is older
  than `STALE_AFTER_S`.
A takeover renames the stale file aside and checks that it moved the file it judged, so two
starters racing over one stale lock cannot both win. The lock file is read only if it is a
regular file (a planted FIFO would block the reader, a link is never followed); anything else
there is taken over at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

from distft.errors import RunInUse
from distft.files import file_kind, open_regular

log = logging.getLogger("distft")

LOCK = "run.lock"
LOCK_MAX_BYTES = 64 << 10  # a lock holds a few hundred bytes; a larger file is not read
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
# scontrol's states of a job that has not ended: its lock is live (a requeued job waits PENDING).
LIVE_JOB_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "CONFIGURING",
                   "COMPLETING", "RESIZING", "SIGNALING", "STOPPED", "STAGE_OUT", "RESV_DEL_HOLD"}


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    job: Optional[str]  # the SLURM job id (array jobs: JOBID_TASK)
    started: float  # time.time() when the lock was taken
    pid_start: Optional[int] = None  # /proc/<pid>/stat start time (clock ticks after boot)
    boot_id: Optional[str] = None

    def describe(self) -> str:
        where = f"pid {self.pid} on {self.host}"
        if self.job:
            where += f" (SLURM job {self.job})"
        return f"{where}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"


def _process_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks after boot) of process `pid` (/proc/<pid>/stat fields 3
    and 22); None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _process_start(pid: int) -> Optional[int]:
    found = _process_stat(pid)
    return found[1] if found else None


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def this_job() -> Optional[str]:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def me() -> Holder:
    pid = os.getpid()
    return Holder(pid=pid, host=socket.gethostname(), job=this_job(), started=time.time(),
                  pid_start=_process_start(pid), boot_id=_boot_id())


def read_holder(path: str) -> Optional[Holder]:
    """The holder a lock file names; None when it cannot be read (being written, or garbage)."""
    try:
        with open_regular(path, "r", max_bytes=LOCK_MAX_BYTES) as f:  # no FIFO blocks it, no link is followed
            data = json.load(f)
        return Holder(**{k: data.get(k) for k in Holder.__dataclass_fields__})
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return None


def _job_state(job: str) -> Optional[str]:
    """scontrol's state of `job`; 'GONE' when the controller does not know it; None when there is
    no controller to ask (no scontrol, or it did not answer)."""
    try:
        result = subprocess.run(["scontrol", "show", "job", job, "--oneliner"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return "GONE" if "Invalid job id" in result.stderr else None
    for field in result.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def stale_reason(holder: Holder, path: str, now: Optional[float] = None) -> Optional[str]:
    """Why `holder`'s lock is stale, or None while its holder may still be running."""
    now = time.time() if now is None else now
    if holder.job:
        if holder.job == this_job():
            return f"it was taken by an earlier run of this job ({holder.describe()}), which SLURM ended to requeue it"
        state = _job_state(holder.job)
        if state == "GONE" or (state is not None and state not in LIVE_JOB_STATES):
            return f"its job {holder.job} has ended ({state if state != 'GONE' else 'unknown to the controller'})"
        if state is not None:
            return None
    # A job's holder whose controller did not answer (scontrol timed out under load) is judged by
    # its heartbeat only: its pid may live on a compute node or in a PID namespace of its own, so
    # "no such process here" would take a live job's lock.
    if not holder.job and holder.host == socket.gethostname():
        if holder.boot_id and _boot_id() and holder.boot_id != _boot_id():
            return f"its holder ({holder.describe()}) ran before this machine rebooted"
        process = _process_stat(holder.pid)
        if process is None:
            return f"its holder ({holder.describe()}) is no longer running"
        state, started = process
        if holder.pid_start is not None and started != holder.pid_start:
            return f"its holder ({holder.describe()}) is no longer running (pid {holder.pid} is another process now)"
        age = _heartbeat_age(path, now)
        if age is not None and age > STALE_AFTER_S and state not in ("T", "t"):  # T, t: stopped, cannot beat
            return (f"its holder ({holder.describe()}) has not refreshed it for {age:.0f} s (it does every "
                    f"{HEARTBEAT_S:.0f} s): pid {holder.pid} is running but does not hold it")
        return None
    age = _heartbeat_age(path, now)
    if age is not None and age > STALE_AFTER_S:
        return f"its holder ({holder.describe()}) has not refreshed it for {age:.0f} s (it does every {HEARTBEAT_S:.0f} s)"
    return None


def _heartbeat_age(path: str, now: float) -> Optional[float]:
    """Seconds since the lock file at `path` (not what a link there names) was last touched."""
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return None


def refusal(run_dir: str, holder: Holder, path: str) -> str:
    if holder.job:
        wait, stop = f"follow it (squeue -j {holder.job}, its log)", f"cancel it (scancel {holder.job})"
    else:
        wait, stop = "wait for it to end", f"stop it (kill {holder.pid} on {holder.host})"
    return (f"run directory {run_dir} is in use by another run of this config: {holder.describe()} holds {path}. "
            f"Two copies would train over each other. {wait[0].upper() + wait[1:]}, or {stop} and rerun this command "
            f"to resume; if you are sure it is gone, delete {path}; or give this run its own run.dir")


def check(run_dir: str) -> Optional[str]:
    """The refusal a start in `run_dir` would meet now, or None (nothing is taken: the SLURM
    launcher asks this on the login node before submitting)."""
    path = os.path.join(run_dir, LOCK)
    holder = read_holder(path) if os.path.lexists(path) else None
    if holder is None or holder.job and holder.job == this_job():
        return None
    return None if stale_reason(holder, path) else refusal(run_dir, holder, path)


class RunLock:
    """The held lock of one run directory; `release()` (or leaving a `with`) gives it up."""

    def __init__(self, path: str, holder: Holder):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="distft-runlock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path, follow_symlinks=False)
            except OSError:
                pass

    def held(self) -> bool:
        return read_holder(self.path) == self.holder

    def release(self, remove: bool = True) -> None:
        """Stop the heartbeat and remove the lock (`remove=False`: leave it, for a requeued job's rerun)."""
        self._stop.set()
        if remove and self.held():
            try:
                os.remove(self.path)
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run_dir: str, unreadable_grace_s: float = 10.0) -> RunLock:
    """Take `<run_dir>/run.lock` (creating the directory), taking over a stale one with a
    warning; raises RunInUse naming a live holder."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    lock, holder = try_take(path, f"run directory {run_dir}", unreadable_grace_s)
    if lock is None:
        raise RunInUse(refusal(run_dir, holder, path))
    return lock


def try_take(path: str, what: str, unreadable_grace_s: float = 10.0) -> tuple[Optional[RunLock], Optional[Holder]]:
    """(the lock at `path`, None) once taken, a stale one taken over with a warning naming `what`;
    (None, the holder) while a live holder has it. Also the data cache's build lock (distft/data/cache.py)."""
    mine = me()
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(mine), f)
                f.flush()
                os.fsync(f.fileno())
            return RunLock(path, mine), None
        holder = read_holder(path)
        if holder is None:  # being written right now, left half-written by a crash, or not a file we wrote
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            age = time.time() - info.st_mtime
            if not stat.S_ISREG(info.st_mode):
                reason = f"it is {file_kind(info.st_mode)}, not a lock file"
            elif age < unreadable_grace_s:
                time.sleep(0.2)
                continue
            else:
                reason = f"it is unreadable and {age:.0f} s old"
        else:
            reason = stale_reason(holder, path)
            if reason is None:
                return None, holder
        if _take_over(path, holder):
            log.warning("%s: taking over its lock, %s", what, reason)
    raise RunInUse(f"could not take {path}: other starters keep taking it; is the same run being started in a loop?")


def _take_over(path: str, judged: Optional[Holder]) -> bool:
    """Move the stale lock aside; True when the file moved was the one judged stale. A fresh lock
    taken meanwhile by another starter is put back (os.link never replaces an existing file)."""
    aside = f"{path}.stale-{os.getpid()}-{threading.get_ident()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = read_holder(aside)
    if moved != judged:
        try:
            os.link(aside, path)
        except OSError:
            pass
        os.remove(aside)
        return False
    os.remove(aside)
    return True
