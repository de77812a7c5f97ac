"""A local 2-rank run's life under signals, as a shell and a person see it: the ranks die with the
launcher, a second copy of the run is refused while the first trains, Ctrl-C to the job's
process group checkpoints and exits 130, the documented stop signal sent to the launcher alone
reaches every rank, and the run resumed after each ends as an uninterrupted one would.

One run directory goes through all of it, in order (each launch costs a 2-rank start-up).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil

from tests.distributed.helpers import REPO

# Long enough to be interrupted (each launch is stopped long before its end), steps cheap.
ARGS = ["+experiment=tiny_lora", "parallel=ddp", "launcher.nproc_per_node=2", "train.max_steps=400",
        "train.log_every=1", "checkpoint.save_every=0", "data.max_seq_len=128", "train.global_batch_size=8",
        "eval.compare_base=false", "eval.num_samples=2", "eval.max_new_tokens=2", "train.eval_max_batches=1"]


def start(run_dir, *extra: str) -> subprocess.Popen:
    """The command as a shell starts a job: its own process group, led by the launcher."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "DISTFT_FAULTS"))}
    return subprocess.Popen([sys.executable, "-m", "distft", *ARGS, f"run.dir={run_dir}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if "RANK" in child.environ():
                out.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def logged_steps(run_dir, since: float = 0.0) -> list[int]:
    """Steps in metrics.jsonl, of records logged after `since` (an earlier launch's are older)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        records = [json.loads(line) for line in f if '"loss"' in line and line.endswith("\n")]
    return [r["step"] for r in records if r["time"] >= since]


def wait_training(launcher: subprocess.Popen, run_dir, after: int = 0, timeout: float = 180) -> list[psutil.Process]:
    deadline = time.time() + timeout
    since = psutil.Process(launcher.pid).create_time()
    while True:
        steps = logged_steps(run_dir, since)
        ranks = ranks_of(launcher)
        try:  # this launch's rank 0 holds the run directory (an earlier attempt's files may still be there)
            holder = json.loads((run_dir / "run.lock").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            holder = None
        if len(ranks) == 2 and holder in {r.pid for r in ranks} and steps and steps[-1] >= after + 2:
            return ranks
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not start training"
        time.sleep(0.1)


def test_a_local_run_under_signals_from_start_to_finish(tmp_path):
    run = tmp_path / "run"

    # 1. kill -9 of the launcher alone: its ranks die with it (parent-death signal), none trains on.
    job = start(run)
    ranks = wait_training(job, run)
    assert {r.pid for r in ranks} and all(os.getpgid(r.pid) == job.pid for r in ranks)  # in the job's group
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert alive == [], f"ranks left training after the launcher died: {[p.pid for p in alive]}"
    assert (run / "run.lock").exists()  # left by the killed run: stale now

    # 2. The same command again: takes the stale lock over (its dead holder named), and starts at
    # step 0 with the earlier attempt's metrics set aside (it never saved a checkpoint).
    job = start(run)
    wait_training(job, run)
    holder = json.loads((run / "run.lock").read_text())
    # A second copy while it trains: refused at once, naming the holder; nothing of the first touched.
    second = subprocess.run([sys.executable, "-m", "distft", *ARGS[:2], *ARGS[3:], f"run.dir={run}"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"run directory {run} is in use by another run of this config: pid {holder['pid']} on " \
           f"{holder['host']}" in second.stderr and f"kill {holder['pid']}" in second.stderr
    # Ctrl-C to the job's process group (what a terminal does; the launcher also forwards what it
    # gets, and a rank counts one interrupt): checkpoint at the next boundary, exit 130.
    os.killpg(job.pid, signal.SIGINT)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130, err[-3000:]
    assert "taking over its lock, its holder (pid" in out and "is no longer running" in out
    match = re.search(r"stopped at step (\d+) by Ctrl-C \(checkpoint of step \1: ", err)
    assert match, err[-3000:]
    stopped = int(match.group(1))
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert (run / "checkpoints" / f"step_{stopped:06d}" / "COMMITTED").exists()
    assert logged_steps(run) == list(range(1, stopped + 1))  # this attempt's alone, from step 1
    attempts = list((run / "attempts").iterdir())
    assert len(attempts) == 1 and (attempts[0] / "metrics.jsonl").exists() and (attempts[0] / "tracker_run_id").exists()
    assert (attempts[0] / "tracker_run_id").read_text() != (run / "tracker_run_id").read_text()  # a new W&B run
    assert not (run / "run.lock").exists()

    # 3. Rerun: resumes; SIGUSR2 (the documented stop) to the launcher alone reaches both ranks:
    # the checkpoint of a later step, exit 4, each step logged once.
    job = start(run)
    wait_training(job, run, after=stopped)
    job.send_signal(signal.SIGUSR2)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 4, err[-3000:]
    assert f"resuming from {run}/checkpoints/step_{stopped:06d}" in out
    again = int(re.search(r"stopped at step (\d+) by SIGUSR2", err).group(1))
    assert again > stopped and (run / "checkpoints" / f"step_{again:06d}" / "COMMITTED").exists()
    assert logged_steps(run) == list(range(1, again + 1))
