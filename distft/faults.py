"""Fault injection for tests and chaos drills: make a run fail at a chosen instant, for real.

`DISTFT_FAULTS` holds comma-separated faults, each `kind:step[:rank]` (rank: every rank when left
out):
    kill_after_save:8          SIGKILL once the checkpoint of step 8 is committed
    kill_after_shards:8        SIGKILL after every shard of step 8 is written, before the manifest
    kill_before_commit:8       SIGKILL after the manifest, before the commit marker (rank 0 writes it)
    kill_cache_write:0         SIGKILL while the data cache is written: its train arrays are, the rest not
    kill_cache_publish:0       SIGKILL once the data cache is written, before its directory is renamed
    nan_loss:5:1               rank 1's loss at step 5 becomes NaN (before backward)
    nan_weights:3              a trainable weight becomes NaN right after step 3's update
    raise_at_step:3:1          rank 1 raises an error at step 3 (a crash on one node)
    signal_at:final:USR2       the process sends itself SIGUSR2 as it enters a phase of the run
                               (preemption.PHASES: start-up, loading, training, final, finished)
    wait_for_signal:4          before step 4, wait until a stop signal (or Ctrl-C) has arrived (at
                               most 300 s), so that a signal sent from outside lands mid-run for sure
    kill_at_step:3:1           rank 1 is SIGKILLed before step 3 (what the OOM killer does)
    sleep_at:loading:90        sleep 90 s (or until a stop signal arrives) as the run enters a phase
                               (a slow start-up or evaluation: preemption.PHASES), or at `exit`: after
                               a stopped run's last collective, before it leaves (a rank slow to leave)
    signal_after_answers:4:USR2  the process sends itself SIGUSR2 once 4 answers of the final
                               evaluation exist (kept from an interrupted one, or generated: checked
                               as it starts and after each generation batch), so the evaluation
                               stops before its next batch

A fault fires once per process. Nothing reads the variable unless it is set, and it is never set
by distft itself: it exists so that resume, commit and non-finite handling are tested by killing
real processes at real instants rather than by mocks.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

ENV = "DISTFT_FAULTS"
_fired: set[str] = set()


def _active(kind: str, step: int) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    rank = int(os.environ.get("RANK", "0"))
    for fault in spec.split(","):
        parts = fault.strip().split(":")
        if parts[0] != kind or int(parts[1]) != step:
            continue
        if len(parts) > 2 and int(parts[2]) != rank:
            continue
        if fault in _fired:
            continue
        _fired.add(fault)
        return True
    return False


def point(where: str, step: int) -> None:
    """A place where a `kill_<where>` fault can fire: the process dies on the spot (no cleanup)."""
    if _active(f"kill_{where}", step):
        os.kill(os.getpid(), signal.SIGKILL)


def corrupt_loss(step: int) -> bool:
    """True when a `nan_loss` fault asks this rank's loss at `step` to become NaN."""
    return _active("nan_loss", step)


def corrupt_weights(step: int) -> bool:
    """True when a `nan_weights` fault asks this rank to poison a weight after `step`'s update."""
    return _active("nan_weights", step)


def wait_for_signal(step: int, arrived: Callable[[], bool], timeout_s: float = 300.0) -> None:
    """A `wait_for_signal` fault: before `step`, wait until `arrived()` (distft.preemption.received:
    a stop signal or Ctrl-C was recorded), then go on: the step runs and the run stops at its
    boundary."""
    if not _active("wait_for_signal", step):
        return
    import time

    deadline = time.time() + timeout_s
    while not arrived() and time.time() < deadline:
        time.sleep(0.05)


def crash(step: int) -> None:
    """A `raise_at_step` fault: this rank fails with an ordinary Python error, the others do not."""
    if _active("raise_at_step", step):
        raise RuntimeError(f"injected fault (DISTFT_FAULTS): rank {os.environ.get('RANK', '0')} fails at step {step}")


def kill_at(step: int) -> None:
    """A `kill_at_step` fault: this rank dies by SIGKILL before `step`, as under the OOM killer."""
    if _active("kill_at_step", step):
        os.kill(os.getpid(), signal.SIGKILL)


def _armed(kind: str, matches: Callable[[str], bool]) -> list[str]:
    """The `kind:<arg>:<value>[:rank]` faults of this rank whose <arg> `matches`, not fired yet,
    each marked fired (their parts); the phase and answer faults share this reading."""
    spec = os.environ.get(ENV)
    if not spec:
        return []
    rank = int(os.environ.get("RANK", "0"))
    found = []
    for fault in spec.split(","):
        parts = fault.strip().split(":")
        if parts[0] != kind or len(parts) < 3 or not matches(parts[1]) or fault in _fired:
            continue
        if len(parts) > 3 and int(parts[3]) != rank:
            continue
        _fired.add(fault)
        found.append(parts)
    return found


def _signal_self(name: str) -> None:
    os.kill(os.getpid(), getattr(signal, "SIG" + name.upper().removeprefix("SIG")))


def sleep_at(where: str, until: Callable[[], bool] = lambda: False) -> None:
    """A `sleep_at:<where>:<seconds>[:rank]` fault: this process sleeps there (for real time), or
    until `until()` (the phases pass preemption.received: a stop signal ends a slow start-up)."""
    for parts in _armed("sleep_at", lambda arg: arg == where):
        import time

        deadline = time.time() + float(parts[2])
        while time.time() < deadline and not until():
            time.sleep(0.05)


def signal_at(phase: str) -> None:
    """A `signal_at:<phase>:<SIGNAL>[:rank]` fault: this process sends itself the signal, for real,
    as the run enters `phase` (preemption.set_phase), so every phase's handling is tested at a
    known instant instead of by racing a timer."""
    for parts in _armed("signal_at", lambda arg: arg == phase):
        _signal_self(parts[2])


def signal_after_answers(answered: int) -> None:
    """A `signal_after_answers:<K>:<SIGNAL>[:rank]` fault: once `answered` (the answers of the
    final evaluation that exist, evaluation.evaluate.generate_outputs) reaches K, this process
    sends itself the signal, for real, so that a stop cuts the evaluation at a known answer."""
    for parts in _armed("signal_after_answers", lambda arg: answered >= int(arg)):
        _signal_self(parts[2])
