"""The local launcher's watch (launchers/local.py `launch_ranks`) with real rank processes that
do what real ranks do when a job goes wrong: one is killed, one fails a collective after its peer
died, one exits with an orderly code its peer does not follow (rank 0 alone met a full disk)."""

from __future__ import annotations

import sys
import time

from launchers.local import launch_ranks

GRACE_S = 2.0  # the launcher's stop_grace_s here (STOP_GRACE_S, 10 s, in a real job)

# Each rank runs this with its RANK; the behaviours are chosen by argv.
RANK = r"""
import os, signal, sys, time
# What a real rank does first (distft.preemption.install): unblock what the launcher blocked.
signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD))
rank, plan = int(os.environ["RANK"]), sys.argv[1:]
action = plan[rank]
if action == "sleep":
    time.sleep(600)
elif action.startswith("exit"):
    time.sleep(float(action.split(":")[2]) if action.count(":") == 2 else 0)
    sys.exit(int(action.split(":")[1]))
elif action == "kill-self":
    time.sleep(0.3)
    os.kill(os.getpid(), 9)
elif action == "kill-self-marked":  # says it is dying (PEER_MARKER), then dies
    time.sleep(0.3)
    open(os.environ["PEER_MARKER"], "w").close()
    os.kill(os.getpid(), 9)
elif action.startswith("after-peer"):  # fails 10 ms after its peer died, as a lost collective does
    while not os.path.exists(os.environ["PEER_MARKER"]):
        time.sleep(0.005)
    time.sleep(0.01)
    sys.exit(int(action.split(":")[1]))
"""


def _launch(capfd, *plan: str) -> tuple[int, str, float]:
    started = time.time()
    code = launch_ranks(len(plan), [sys.executable, "-c", RANK, *plan], monitor_interval_s=0.5, stop_grace_s=GRACE_S)
    return code, capfd.readouterr().err, time.time() - started


def test_the_rank_a_signal_killed_is_named_not_the_peer_that_lost_it(capfd, tmp_path, monkeypatch):
    """Rank 1 dies by SIGKILL; rank 0 exits 1 ten milliseconds later (what a lost collective
    does), within the same polling interval: rank 1 is named, with its signal. CI once blamed rank 0.
    (Rank 0 waits for rank 1's marker, not for a fixed time: on a loaded machine rank 1 may start
    late enough that a timed rank 0 really failed first.)"""
    monkeypatch.setenv("PEER_MARKER", str(tmp_path / "rank1-dying"))
    code, err, _ = _launch(capfd, "after-peer:1", "kill-self-marked")
    assert code == 1
    assert "rank 1 (pid " in err and "failed first, with signal SIGKILL; the job's other rank were stopped" in err, err


def test_an_orderly_exit_its_peers_do_not_follow_ends_the_job_with_its_code(capfd):
    """Rank 0 exits 2 (its one-line message printed: a full disk) while rank 1 would wait in a
    collective for ever: after the grace rank 1 is stopped, the job exits 2, and the line names
    rank 0. And when the peer fails right after it (gloo's 'Connection closed by peer'), rank 0's
    code is still the job's."""
    code, err, took = _launch(capfd, "exit:2", "sleep")
    assert code == 2 and GRACE_S <= took < GRACE_S + 4, (code, took)
    assert "rank 0 (pid " in err and ("ended first, with exit code 2 (its message is above); the job's other rank "
                                      "were stopped") in err, err
    code, err, took = _launch(capfd, "exit:2", "exit:1:0.2")
    assert code == 2 and took < GRACE_S + 1 and "rank 0 (pid " in err and "ended first, with exit code 2" in err, err
    code, err, _ = _launch(capfd, "exit:4", "exit:4:0.2")  # both stopped by the signal: the same code, no line
    assert code == 4 and "first" not in err
