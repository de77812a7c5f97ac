"""distft on a real 2-node SLURM cluster (tests/slurm/conftest.py starts it): the one-line
submission, the plain sbatch template, a Hydra submitit sweep, preemption with requeue, a rank
failing on one node, and bad launcher configs refused before anything is queued.

Every job is the tiny model with FSDP on 2 nodes x 1 rank (one rank per node; the nodes are
network namespaces of this machine, so the ranks talk over a real bridge between two hosts).
OMP_NUM_THREADS=1 everywhere (the jobs inherit it): the same threads as the local reference run,
so the losses can be compared exactly.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.distributed.helpers import REPO, final_weights, run_dir_of, step_metrics, summary_of

pytestmark = pytest.mark.slurm

STEPS = 16
# 128-token rows (the presets pack 256): a SLURM job, its requeue and resume are what is checked,
# not what a step learns; a step costs half.
TINY = ["parallel=fsdp", "train.log_every=1", "train.warmup_steps=2", "eval.num_samples=2", "eval.max_new_tokens=2",
        "train.eval_max_batches=1", "data.max_seq_len=128"]
RUN = ["+experiment=tiny_full", f"train.max_steps={STEPS}", *TINY]
ON_SLURM = ["launcher=slurm", "launcher.nodes=2", "launcher.time_min=10", "+launcher.env.GLOO_SOCKET_IFNAME=eth0"]


def env(**extra) -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    out.pop("DISTFT_FAULTS", None)
    out.update(extra)
    return out


def distft(*args: str, timeout: int = 600, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env(**extra_env))


def job_field(job_id: str, key: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id, "--oneliner"], capture_output=True, text=True).stdout
    match = re.search(rf"\b{key}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for_state(job_id: str, states: tuple, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_field(job_id, "JobState")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job_field(job_id, 'JobState')} after {timeout} s")


def submitted_job_id(proc: subprocess.CompletedProcess) -> str:
    match = re.search(r"submitted job (\d+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    return match.group(1)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The same run launched locally with 2 processes (torch's elastic agent), never stopped."""
    root = tmp_path_factory.mktemp("local")
    proc = distft(*RUN, "launcher.nproc_per_node=2", f"run.dir={root / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir_of(proc)


def test_one_line_submission_matches_the_local_run(slurm_cluster, local_reference, tmp_path):
    """`python -m distft ... launcher=slurm launcher.nodes=2 launcher.wait=true`: the job id, the
    logs and the run directory are printed, the job completes on n1 and n2, and its loss curve
    equals the local 2-process run's, step for step."""
    run = tmp_path / "run"
    proc = distft(*RUN, *ON_SLURM, f"run.dir={run}", "launcher.wait=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = submitted_job_id(proc)
    assert f"run dir: {run}" in proc.stdout and f"{run}/slurm/{job}_0_log.out" in proc.stdout
    assert f"distft: job {job} RUNNING on n[1-2]" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"distft: job {job} COMPLETED (exit code 0:0)")  # no requeue, no blame
    assert job_field(job, "NodeList") == "n[1-2]"
    losses = step_metrics(str(run))
    assert len(losses) == STEPS and losses == step_metrics(local_reference)
    assert step_metrics(str(run), "grad_norm") == step_metrics(local_reference, "grad_norm")
    assert summary_of(str(run))["world_size"] == 2


def test_the_sbatch_template_matches_the_local_run(slurm_cluster, local_reference, tmp_path):
    """`sbatch --nodes=2 slurm/train.sbatch <overrides>`: same rendezvous, same losses. The stop
    signal is sent a second after the job step starts (its ranks still importing, long before
    training; as a time limit shorter than launcher.signal_delay_s does): the job requeues itself
    instead of failing, and the rerun trains the whole run."""
    run, log = tmp_path / "run", tmp_path / "job.out"
    proc = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={log}", os.path.join(REPO, "slurm", "train.sbatch"),
         *RUN, f"run.dir={run}", "+launcher.env.GLOO_SOCKET_IFNAME=eth0"],
        capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
        env=env(DISTFT_PYTHON=sys.executable),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = proc.stdout.strip().split(";")[0]
    deadline = time.time() + 120
    while subprocess.run(["scontrol", "show", "step", f"{job}.0"], capture_output=True).returncode != 0:
        assert time.time() < deadline, job_field(job, "JobState")
        time.sleep(0.05)
    time.sleep(1.0)  # the ranks' Python has started (its first line installs the handlers), distft is importing
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = wait_for_state(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))  # sbatch --wait polls slowly
    assert state == "COMPLETED", log.read_text()[-4000:]
    assert job_field(job, "Restarts") == "1"
    text = log.read_text()
    # (the requeue ends the job's processes before they print the line after it)
    assert "received SIGUSR2 during start-up: stopping before the first step" in text
    assert "(restart 1) on n[1-2]" in text
    assert "2 node(s) x 1 rank(s)" in text and "summary:" in text
    assert step_metrics(str(run)) == step_metrics(local_reference)


def test_a_sweep_on_submitit_slurm_runs_every_point_and_summarizes(slurm_cluster, tmp_path):
    """A 2x2 multirun on hydra/launcher=submitit_slurm: 4 jobs of 2 ranks each, 4 run directories,
    and summary.csv/.md/.png whose values are each run's summary.json; `python -m distft.sweep`
    writes the same table again later."""
    sweep = tmp_path / "multirun"
    proc = distft("-m", "+experiment=tiny_lora", "train.max_steps=4", *TINY, "technique.r=4,8", "train.lr=1e-3,3e-3",
                  "hydra/launcher=submitit_slurm", *ON_SLURM, f"run.root={tmp_path}", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"sweep summary: {sweep}/summary.md" in proc.stdout
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and len({r["run_dir"] for r in rows}) == 4
    assert {(r["technique.r"], r["train.lr"]) for r in rows} == {("4", "0.001"), ("4", "0.003"), ("8", "0.001"),
                                                                  ("8", "0.003")}
    markdown = (sweep / "summary.md").read_text()
    for row in rows:
        summary = summary_of(row["run_dir"])
        assert row["status"] == "complete" and summary["world_size"] == 2 and summary["steps"] == 4
        assert float(row["eval_loss"]) == summary["eval_after"]["loss"]
        assert float(row["final_train_loss"]) == summary["final_train_loss"]
        assert f"| {row['job']} | {row['technique.r']} | {row['train.lr']} | complete | " \
               f"{summary['eval_after']['loss']:.4f} |" in markdown
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = (sweep / "summary.csv").read_text()
    for name in ("summary.csv", "summary.md", "summary.png"):
        (sweep / name).unlink()
    again = subprocess.run([sys.executable, "-m", "distft.sweep", str(sweep)], capture_output=True, text=True,
                           cwd=REPO, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (sweep / "summary.csv").read_text() == first and (sweep / "summary.png").exists()


def test_a_sweep_whose_points_fail_ends_names_their_errors_and_summarizes_its_own_points(slurm_cluster, tmp_path):
    """Two 1-rank points on this cluster without accounting (sacct fails), with the faults
    nan_loss:3 and kill_after_save:2 and only a final checkpoint: the 2-step point is SIGKILLed
    after its checkpoint (no rank can say why), the 3-step one stops on a non-finite loss
    (train.nonfinite=halt: exit 3). The sweep ends once both ended, without sacct and within a
    bound; both jobs are FAILED in SLURM; each point's first error is printed; the sweep has its
    own timestamped directory under run.root/multirun, and its summary lists its two points as
    `failed: <first error>`. (Completed points' rows: the 2x2 sweep above.)"""
    started = time.time()
    proc = distft("-m", "+experiment=tiny_lora", "train.max_steps=2,3", *TINY[1:], "checkpoint.save_every=0",
                  "train.nonfinite=halt", "hydra/launcher=submitit_slurm", "launcher=slurm", "launcher.nodes=1",
                  "launcher.time_min=10", f"run.root={tmp_path}", timeout=300,
                  DISTFT_FAULTS="nan_loss:3,kill_after_save:2")
    elapsed = time.time() - started
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 180
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", sweep.name)
    assert f"sweep summary: {sweep}/summary.md" in proc.stdout
    failed = dict(re.findall(r"distft: sweep point (\d) \(.*\) failed: .*\(job (\d+_\d), logs ", proc.stderr))
    assert sorted(failed) == ["0", "1"], proc.stderr[-3000:]
    assert all(job_field(job, "JobState") == "FAILED" for job in failed.values())
    assert job_field(failed["1"], "ExitCode") == "3:0"
    assert re.search(rf"distft: sweep point 0 \(train.max_steps=2\) failed: job {failed['0']} FAILED \(exit code "
                     r"137:0\): rank 0 on n\d failed first \(Killed\)", proc.stderr), proc.stderr[-3000:]
    assert re.search(r"distft: sweep point 1 \(train.max_steps=3\) failed: rank 0 on n\d: NonFiniteError: ",
                     proc.stderr), proc.stderr[-3000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["train.max_steps"], r["eval_loss"]) for r in rows] == [("0", "2", ""), ("1", "3", "")]
    assert rows[0]["status"].startswith(f"failed: job {failed['0']} FAILED (exit code 137:0)")
    assert rows[1]["status"].startswith("failed: NonFiniteError: ")
    assert "2 points, 0 complete, 2 failed" in (sweep / "summary.md").read_text()


def test_a_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, local_reference, tmp_path):
    """SIGUSR2 (what SLURM sends before a time limit; here `scancel --signal`) mid-run, with no
    periodic checkpoint at all: every rank stops at the next step boundary, the checkpoint of that
    step is written, the job requeues itself and the rerun resumes from it. Each step is applied
    once (the metrics log has steps 1..N once each) and the final weights equal the
    uninterrupted run's bit for bit.

    Around it, what a user at the login node sees: `launcher.wait=true` reports the requeue and
    its cause as it happens; the same command submitted again while the job runs is refused,
    naming the job (two copies would train over each other); Ctrl-C of the follower says the job
    keeps running and how to follow or cancel it (exit 130); following it again ends with its
    final state and its requeue."""
    import io

    from distft.launchers.slurm import follow

    run = tmp_path / "run"
    args = [sys.executable, "-m", "distft", *RUN, *ON_SLURM, f"run.dir={run}", "checkpoint.save_every=0"]
    # Every rank waits before step 4 until the signal has come (faults.wait_for_signal): it lands
    # mid-run however long the second submission below takes (in CI the 16 steps once ended first).
    waiter = subprocess.Popen([*args, "launcher.wait=true"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=REPO, env=env(DISTFT_FAULTS="wait_for_signal:4"))
    lines: list[str] = []

    def read_until(pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = waiter.stdout.readline()
            assert line, "".join(lines)[-3000:]
            lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError("".join(lines)[-3000:])

    job = read_until(r"submitted job (\d+)").group(1)
    log = run / "slurm" / f"{job}_0_log.out"
    read_until(r"step 3/")
    lock = json.loads((run / "run.lock").read_text())  # held by the job's rank 0 while it trains
    assert lock["job"] == job and job_field(job, "JobState") == "RUNNING", (lock, job_field(job, "JobState"))
    again = distft(*RUN, *ON_SLURM, f"run.dir={run}", "checkpoint.save_every=0")
    assert again.returncode == 2 and "submitted job" not in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"distft: not submitted, nothing queued: run directory {run} is in use by another run of this config: " \
           f"pid " in again.stderr and f"(SLURM job {job})" in again.stderr and f"scancel {job}" in again.stderr
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    cause = read_until(rf"distft: job {job} requeued \(restart 1\): (.*)").group(1)
    # Requeued, the job keeps its lock (its rerun takes it over): a submission meanwhile is refused.
    from distft.runlock import check

    assert json.loads((run / "run.lock").read_text())["job"] == job
    refusal = check(str(run))
    assert refusal is not None and f"(SLURM job {job})" in refusal, job_field(job, "JobState")
    stopped = int(re.search(r"stopped at step (\d+)", "".join(lines)).group(1))
    assert cause == f"stopped at step {stopped} by the stop signal, checkpoint saved"
    waiter.send_signal(signal.SIGINT)
    rest, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 130, rest[-3000:]
    assert f"stopped following; job {job} keeps running. Follow it with `tail -f {log}` (state: squeue -j {job}); " \
           f"cancel it with `scancel {job}`" in rest and "Traceback" not in rest
    assert job_field(job, "JobState") in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED")  # not cancelled
    followed = io.StringIO()
    assert follow(job, str(log), poll_s=0.5, out=followed) == "COMPLETED", log.read_text()[-3000:]
    assert followed.getvalue().rstrip().endswith(f"distft: job {job} COMPLETED (exit code 0:0) after 1 requeue "
                                                 f"(stopped at step {stopped} by the stop signal, checkpoint saved)")
    assert job_field(job, "Restarts") == "1"
    text = log.read_text()
    assert stopped == 4 and f"resuming from {run}/checkpoints/step_{stopped:06d}" in text
    assert f"job {job} requeued (requeue 1 of at most 3)" in text
    with open(run / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # no step lost, none applied twice
    assert step_metrics(str(run)) == step_metrics(local_reference)
    summary = summary_of(str(run))
    assert summary["requeues"] == 1 and summary["resumed_from"].endswith(f"step_{stopped:06d}")
    ours, reference = final_weights(str(run)), final_weights(local_reference)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_plain_scancel_ends_the_ranks_at_once(slurm_cluster, tmp_path):
    """`scancel JOB` (SIGTERM, then SIGKILL after KillWait, 10 s here): every rank exits at once
    (submitit's wrapper used to ignore SIGTERM, and the ranks trained on until killed)."""
    import psutil

    run = tmp_path / "run"
    proc = distft(*[a for a in RUN if not a.startswith("train.max_steps=")], *ON_SLURM, f"run.dir={run}",
                  "train.max_steps=400")
    job = submitted_job_id(proc)
    log = run / "slurm" / f"{job}_0_log.out"
    deadline = time.time() + 300
    while not (log.exists() and re.search(r"step [2-9]/", log.read_text())):
        assert time.time() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING"), job_field(job, "JobState")
        time.sleep(0.2)

    def ranks() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if str(run / "slurm") in " ".join(p.info["cmdline"] or []):
                found.append(p)
        return found

    assert len(ranks()) >= 2
    cancelled = time.time()
    subprocess.run(["scancel", job], check=True)
    _, alive = psutil.wait_procs(ranks(), timeout=15)
    took = time.time() - cancelled
    assert alive == [] and took < 5, f"ranks still running {took:.1f} s after scancel: {[p.pid for p in alive]}"
    assert wait_for_state(job, ("CANCELLED",), timeout=60) == "CANCELLED"


def test_a_rank_failing_on_one_node_ends_the_job_and_is_named(slurm_cluster, tmp_path):
    """Rank 1 (on n2) raises at step 2: srun stops rank 0 too, the job ends FAILED within
    seconds (no survivor waits in a collective), and the launcher names rank 1, its node and its
    error."""
    started = time.time()
    proc = distft(*RUN, *ON_SLURM, f"run.dir={tmp_path / 'run'}", "launcher.wait=true",
                  DISTFT_FAULTS="raise_at_step:2:1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = submitted_job_id(proc)
    assert job_field(job, "JobState") == "FAILED"
    assert f"job {job} FAILED" in proc.stdout
    assert "rank 1 on n2 failed first" in proc.stdout and "injected fault (DISTFT_FAULTS): rank 1 fails at step 2" \
        in proc.stdout
    assert time.time() - started < 120


@pytest.mark.parametrize("overrides, message", [
    (["launcher.partition=gpu"], "launcher.partition=gpu: no such partition on this cluster; choose one of: debug (default)"),
    (["launcher.nodes=4"], "launcher.nodes=4 but partition debug has 2 node(s)"),
    (["launcher.tasks_per_node=4", "launcher.nodes=1"], "SLURM refuses this job (allocation failure: Requested node configuration is not available)"),
    (["launcher.time_min=null"], "launcher=slurm needs a time limit: set launcher.time_min=MINUTES"),
])
def test_a_bad_launcher_config_is_refused_before_submission(slurm_cluster, tmp_path, overrides, message):
    """Unknown partition, more nodes than exist, more ranks than a node has CPUs, no time limit:
    one clear message, exit 2, nothing queued, no run directory."""
    jobs_before = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    next_id = re.search(r"NEXT_JOB_ID\s*=\s*(\d+)", jobs_before).group(1)
    given = {o.split("=")[0] for o in overrides}  # a key holds one value: the case's replaces ON_SLURM's
    on_slurm = [o for o in ON_SLURM if o.split("=")[0] not in given]
    proc = distft(*RUN, *on_slurm, f"run.dir={tmp_path / 'run'}", "train.global_batch_size=16", *overrides)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "submitted job" not in proc.stdout
    after = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    next_after = re.search(r"NEXT_JOB_ID\s*=\s*(\d+)", after).group(1)
    for job in range(int(next_id), int(next_after)):  # `sbatch --test-only` takes an id but creates no job
        shown = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True)
        assert shown.returncode != 0 and "Invalid job id" in shown.stderr, shown.stdout  # never queued, not even briefly
    assert not (tmp_path / "run").exists()
