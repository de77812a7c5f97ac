"""`launcher=slurm`: submit the run as one SLURM job through submitit, from a login node.

    python -m distft +experiment=qlora_13b launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8 \\
        launcher.partition=gpu launcher.time_min=240 [launcher.wait=true]

1. Before anything is queued, the cluster is asked (`scontrol show partition`, then
   `sbatch --test-only` with the job's own flags) whether the request can ever run: an unknown
   partition, more nodes than the partition has, a time limit above its maximum, or any other
   refusal (account, QOS, constraint, memory) ends here with one message and nothing queued.
2. submitit writes the batch script (`#SBATCH --signal=USR2@<signal_delay_s>`, `--requeue`)
   and submits it; each of the `nodes x tasks_per_node` tasks (`srun --kill-on-bad-exit=1`: one
   failing rank ends the whole step) runs `distft.commands.train.RankTask`, which sets up the rendezvous from the SLURM
   environment (`rank_environment()`, shared with slurm/train.sbatch) and runs the same
   `python -m distft` command line in-process as one rank.
3. The command prints the job id, the log paths and the run directory and returns (exit 0);
   `launcher.wait=true` follows the job instead, streaming rank 0's log, and exits 0 only when
   the job COMPLETED.

Requeues (preemption, time limit) rerun the same batch script, hence the same RankTask and the
same deterministic run directory: the run resumes (distft/preemption.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Optional

from distft.config import Config
from distft.config import run_dir as config_run_dir
from distft.errors import SubmissionError
from distft.files import open_regular
from distft.preemption import segment_problem, startup_s
from distft.runlock import check as run_dir_in_use

RANK_MARKER = "DISTFT_RANK_PROCESS"  # set in every rank: never submit again from inside the job
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED")


# --------------------------------------------------------------------------- inside the job


def is_rank_process() -> bool:
    """True inside a job step's task, a submitit job (Hydra's submitit sweeps, local ones
    included) or a rank our launcher started: this process trains as one rank and must never submit. A batch script or an salloc shell is not a step: submitting from
    there is allowed."""
    return bool(os.environ.get(RANK_MARKER) or os.environ.get("SLURM_STEP_ID") or os.environ.get("SUBMITIT_EXECUTOR"))


def rank_environment() -> Optional[dict]:
    """In a SLURM step or a submitit job, without a launcher that already set RANK: export
    RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT derived from the SLURM
    (or submitit) environment (first node of the allocation, a port derived from the job id), so
    `init_process_group("env://")` meets on every node. Returns what was exported, or None."""
    if "RANK" in os.environ or not (os.environ.get("SLURM_STEP_ID") or os.environ.get("SUBMITIT_EXECUTOR")):
        return None
    from submitit.helpers import TorchDistributedEnvironment

    # A plain srun step (slurm/train.sbatch) has SLURM's variables but not submitit's marker:
    # read them the way a submitit job does, so both paths meet at the same address and port.
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    os.environ[RANK_MARKER] = "1"
    return {"rank": env.rank, "world_size": env.world_size, "master": f"{env.master_addr}:{env.master_port}"}


# --------------------------------------------------------------------------- the cluster


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as err:
        raise SubmissionError(
            f"`{cmd[0]}` not found: launcher=slurm submits from a SLURM login node (slurm-wlm client tools on "
            "PATH, SLURM_CONF if the cluster needs it); on a workstation use launcher=local"
        ) from err
    except subprocess.TimeoutExpired as err:
        raise SubmissionError(f"`{' '.join(cmd)}` did not answer within {timeout:.0f} s: is slurmctld up?") from err


def partitions() -> dict[str, dict]:
    """name -> {'nodes': int, 'max_time_min': int|None, 'default': bool, 'state': str}."""
    result = _run(["scontrol", "show", "partition", "--oneliner"])
    if result.returncode != 0:
        raise SubmissionError(f"cannot ask the cluster for its partitions (scontrol: {result.stderr.strip()}); "
                              "is slurmctld up, and SLURM_CONF set if the cluster needs it?")
    found = {}
    for line in result.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        if "PartitionName" not in fields:
            continue
        found[fields["PartitionName"]] = {
            "nodes": int(fields.get("TotalNodes", "0")),
            "max_time_min": parse_time_min(fields.get("MaxTime", "UNLIMITED")),
            "default": fields.get("Default") == "YES",
            "state": fields.get("State", "UP"),
        }
    return found


def parse_time_min(value: str) -> Optional[int]:
    """SLURM's [days-]hours:minutes:seconds (or minutes) -> minutes; UNLIMITED/INFINITE -> None."""
    if value.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = parts[0]
    else:
        parts = [0] * (3 - len(parts)) + parts
        minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
    return minutes + int(days or 0) * 24 * 60


def check_against_cluster(cfg: Config) -> tuple[Optional[str], list[str]]:
    """Everything SLURM would refuse, found before anything is queued.
    Returns (the partition the job goes to, problems)."""
    launcher = cfg.launcher
    known = partitions()
    if not known:
        return None, ["the cluster reports no partitions; ask its admins, or set launcher.partition"]
    name = launcher.partition or next((n for n, p in known.items() if p["default"]), None)
    if name is None:
        return None, [f"launcher.partition is not set and the cluster has no default partition; choose one of: "
                      f"{', '.join(sorted(known))}"]
    if name not in known:
        listing = ", ".join(f"{n}{' (default)' if p['default'] else ''}" for n, p in sorted(known.items()))
        return name, [f"launcher.partition={name}: no such partition on this cluster; choose one of: {listing}"]
    part, errors = known[name], []
    if launcher.nodes > part["nodes"]:
        errors.append(f"launcher.nodes={launcher.nodes} but partition {name} has {part['nodes']} node(s); "
                      f"ask for at most {part['nodes']} (or another partition)")
    if part["max_time_min"] is not None and launcher.time_min > part["max_time_min"]:
        errors.append(f"launcher.time_min={launcher.time_min} exceeds partition {name}'s limit of "
                      f"{part['max_time_min']} min; lower it (the job requeues itself to go on)")
    if part["state"] != "UP":
        errors.append(f"partition {name} is {part['state']}, not UP; choose another with launcher.partition")
    if errors:
        return name, errors
    # The rest (account, QOS, constraint, memory, GPUs, CPUs per node): SLURM's own verdict.
    test = _run(["sbatch", "--test-only", *sbatch_flags(cfg, name), "--wrap", "true"])
    if test.returncode != 0:
        message = " ".join(line.removeprefix("sbatch: error: ").strip()
                           for line in test.stderr.splitlines() if line.strip())
        return name, [f"SLURM refuses this job ({message}); check launcher.nodes, tasks_per_node, gpus_per_node, "
                      "cpus_per_task, mem_gb, account, qos, constraint and sbatch_extra"]
    return name, []


def sbatch_flags(cfg: Config, partition: str) -> list[str]:
    """The resource request as sbatch flags (what `sbatch --test-only` checks)."""
    launcher = cfg.launcher
    flags = [f"--partition={partition}", f"--nodes={launcher.nodes}", f"--ntasks-per-node={launcher.tasks_per_node}",
             f"--time={launcher.time_min}"]
    optional = {"gpus-per-node": launcher.gpus_per_node or None, "cpus-per-task": launcher.cpus_per_task,
                "account": launcher.account, "qos": launcher.qos, "constraint": launcher.constraint,
                "mem": f"{int(launcher.mem_gb * 1024)}M" if launcher.mem_gb else None}
    flags += [f"--{k}={v}" for k, v in optional.items() if v is not None]
    flags += [f"--{k}" if v is True else f"--{k}={v}" for k, v in extra_sbatch_parameters(launcher).items()]
    return flags


def extra_sbatch_parameters(launcher) -> dict:
    """#SBATCH flags submitit (and Hydra's submitit launcher) take as `additional_parameters`:
    --requeue, a signal other than submitit's USR2, --exclusive, and launcher.sbatch_extra
    (which wins). True stands for a bare flag."""
    extra: dict = {"requeue": True}
    signal_name = launcher.signal.upper().removeprefix("SIG")
    if signal_name != "USR2":
        extra["signal"] = f"{signal_name}@{launcher.signal_delay_s}"
    if launcher.exclusive:
        extra["exclusive"] = True
    extra.update({k: (True if v in (None, "", True) else v) for k, v in launcher.sbatch_extra.items()})
    return extra


# --------------------------------------------------------------------------- submission


# The first line of each run of a job (its batch script's `setup`; slurm/train.sbatch prints the
# same): the job's log is appended across requeues, and this is where the latest run starts. No
# `${...}`: in a sweep it goes through Hydra, which would read it as an interpolation.
SEGMENT_LINE = 'echo "distft: job $SLURM_JOB_ID (restart $((SLURM_RESTART_COUNT+0))) on $SLURM_JOB_NODELIST"'
SEGMENT_START = re.compile(rb"^distft: job \S+ \(restart \d+\) on ", re.M)
QUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED",
                 "RUNNING", "COMPLETING")


def run_tag(run_dir: str) -> str:
    """The job comment (`--comment`) naming the run directory a submission trains in: a hash,
    so that any path fits SLURM's field; what `queued_for` finds a job of the same run by."""
    import hashlib

    return "distft-run:" + hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]


def queued_for(run_dir: str) -> list[tuple[str, str]]:
    """(job id, state) of this user's jobs that will train in `run_dir` and have not ended: a
    pending one holds no run-directory lock yet (runlock), so a second submission of the same
    run would queue and only fail once it starts."""
    import getpass

    result = _run(["squeue", "-h", f"--user={getpass.getuser()}", "-o", "%i|%T|%k"])
    if result.returncode != 0:
        return []  # the cluster's check above answered; a failed listing must not block a submission
    tag = run_tag(run_dir)
    jobs = [line.split("|", 2) for line in result.stdout.splitlines() if line.count("|") >= 2]
    return [(job, state) for job, state, comment in jobs if comment.strip() == tag and state in QUEUED_STATES]


def executor(cfg: Config, folder: str, partition: str):
    """A submitit SlurmExecutor asking for the job's resources, signal and requeue."""
    import submitit

    launcher = cfg.launcher
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher.max_requeues)
    ex.update_parameters(
        job_name=launcher.job_name or f"distft-{cfg.run.experiment}",
        partition=partition,
        nodes=launcher.nodes,
        ntasks_per_node=launcher.tasks_per_node,
        gpus_per_node=launcher.gpus_per_node or None,
        cpus_per_task=launcher.cpus_per_task,
        time=launcher.time_min,
        account=launcher.account,
        qos=launcher.qos,
        constraint=launcher.constraint,
        mem=f"{int(launcher.mem_gb * 1024)}M" if launcher.mem_gb else None,
        signal_delay_s=launcher.signal_delay_s,
        # The segment's first log line (rank 0's log is the batch script's too): where a requeued
        # job's latest run starts, for `follow` to blame only that run's failures.
        setup=[SEGMENT_LINE, *launcher.setup],
        srun_args=["--kill-on-bad-exit=1", *launcher.srun_args],
        additional_parameters={"comment": run_tag(config_run_dir(cfg)), **extra_sbatch_parameters(launcher)},
        stderr_to_stdout=True,  # one log per rank, errors in their place
    )
    return ex


def submit(cfg: Config, argv: list[str], task) -> int:
    """Plan, check, submit `task` (picklable; what every rank runs: distft.commands.train.RankTask), print
    where everything is; follow the job with launcher.wait=true."""
    # lazy: torch (the planner's meta build); this module stays torch-free
    from distft.plan import refusal as plan_refusal

    try:
        refusal = plan_refusal(cfg, "not submitted, nothing queued", verb="submit", argv=argv)
    except Exception as err:  # noqa: BLE001 - an estimate must not stop a submission
        print(f"distft: warning: the plan before submitting failed ({type(err).__name__}: {err}); submitting "
              "without it", file=sys.stderr)
        refusal = None
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    try:
        partition, problems = check_against_cluster(cfg)
    except SubmissionError as err:
        partition, problems = None, [str(err)]
    if problems:
        print("distft: not submitted, nothing queued:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2
    run_dir = config_run_dir(cfg)
    # The config check held the time limit against start-up's floor; this run's own start-up,
    # measured by its earlier jobs, may need more.
    too_short = segment_problem(cfg.launcher.time_min, cfg.launcher.signal_delay_s, startup_s(run_dir))
    if too_short:
        print(f"distft: not submitted, nothing queued: {too_short}", file=sys.stderr)
        return 2
    busy = run_dir_in_use(run_dir)  # the same run already running (or requeued, waiting): not twice
    if busy:
        print(f"distft: not submitted, nothing queued: {busy}", file=sys.stderr)
        return 2
    queued = queued_for(run_dir)  # or submitted and not started yet: no lock to find
    if queued:
        job, state = queued[0]
        print(f"distft: not submitted, nothing queued: job {job} ({state}) was submitted for the same run "
              f"directory {run_dir} and has not ended; two jobs would train over each other. Wait for it "
              f"(squeue -j {job}), or cancel it with `scancel {job}` and submit again", file=sys.stderr)
        return 2
    folder = os.path.abspath(cfg.launcher.log_dir or os.path.join(run_dir, "slurm"))
    os.makedirs(folder, exist_ok=True)
    job = executor(cfg, folder, partition).submit(task)
    logs = os.path.join(folder, f"{job.job_id}_<rank>_log.out")
    print(f"submitted job {job.job_id}: {cfg.launcher.nodes} node(s) x {cfg.launcher.tasks_per_node} rank(s), "
          f"partition {partition}, {cfg.launcher.time_min} min", flush=True)
    print(f"  logs:    {logs} (rank 0: {rank_log(folder, job.job_id, 0)})", flush=True)
    print(f"  run dir: {run_dir}", flush=True)
    if not cfg.launcher.wait:
        print(f"  follow:  tail -f {rank_log(folder, job.job_id, 0)}   (state: squeue -j {job.job_id})", flush=True)
        return 0
    try:
        state = follow(job.job_id, rank_log(folder, job.job_id, 0))
    except KeyboardInterrupt:
        return 130  # follow() said the job keeps running, and how to follow or cancel it
    return 0 if state == "COMPLETED" else 1


def rank_log(folder: str, job_id: str, rank: int) -> str:
    return os.path.join(folder, f"{job_id}_{rank}_log.out")


def job_fields(job_id: str) -> dict[str, str]:
    """The controller's view of a job (`scontrol show job`); {} once it forgot the job."""
    result = _run(["scontrol", "show", "job", str(job_id), "--oneliner"])
    return dict(re.findall(r"(\w+)=(\S+)", result.stdout)) if result.returncode == 0 else {}


def job_state(job_id: str) -> tuple[str, str]:
    """(state, exit code) from the controller; ('UNKNOWN', '') once it forgot the job."""
    fields = job_fields(job_id)
    return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")


# What a job's log says about why it stopped and was requeued (the log is appended across requeues).
# distft's stop lines (preemption.StopSignal.stop, whose `when` comes from train._stop) say what was
# saved: a checkpoint only at a step; before the first step nothing (or, resumed, nothing new); in
# the final evaluation the final checkpoint, saved before it, is kept.
REQUEUE_CAUSES = (
    (re.compile(r"Node failure on (\S+)"), "node failure on {0}"),
    (re.compile(r"distft: stopped at step (\d+)[^\n]*(?:job \S+ requeued|requeueing job)"),
     "stopped at step {0} by the stop signal, checkpoint saved"),
    (re.compile(r"distft: stopped before its first step after step (\d+)[^\n]*(?:job \S+ requeued|requeueing job)"),
     "stopped before its first step after step {0} by the stop signal, nothing new to save"),
    (re.compile(r"distft: stopped before its first step[^\n]*(?:job \S+ requeued|requeueing job)"),
     "stopped before its first step by the stop signal, nothing to save"),
    (re.compile(r"distft: stopped during the final evaluation, after step (\d+)"
                r"[^\n]*(?:job \S+ requeued|requeueing job)"),
     "stopped during the final evaluation after step {0} by the stop signal, final checkpoint kept"),
    (re.compile(r"DUE TO TIME LIMIT"), "time limit"),
    (re.compile(r"DUE TO PREEMPTION"), "preempted"),
    (re.compile(r"DUE TO NODE FAILURE"), "node failure"),
)


def requeue_cause(log_text: str, reason: str = "") -> str:
    """Why the incarnation whose log is `log_text` ended, for the requeue line: the log's own
    words (srun's node failure, distft's stop line), else the controller's Reason."""
    for pattern, words in REQUEUE_CAUSES:
        match = pattern.search(log_text)
        if match:
            return words.format(*[g for g in match.groups() if g is not None])
    return {"NodeFail": "node failure", "Prolog": "prolog failure", "JobHeldAdmin": "held by an admin",
            "BeginTime": "requeued by the job itself (scontrol requeue)"}.get(reason, reason or "cause not reported")


def follow(job_id: str, log_path: str, poll_s: float = 2.0, out=None) -> str:
    """Stream the log as it grows until the job reaches a final state, following it through its
    requeues. Says what happens as it happens (waiting and why, running where, each requeue and
    its cause) and ends with one line: the final state, the requeues and, for a job that did not
    complete, the rank that failed first in its last run (srun's report). Ctrl-C stops following,
    not the job: it says so, and how to follow or cancel it. Returns the final state."""
    out = out or sys.stdout
    offset, incarnation_start, state, exit_code = 0, 0, "", ""
    seen, restarts, causes = None, 0, []
    try:
        while True:
            if os.path.lexists(log_path):
                chunk, offset = read_log(log_path, offset)
                if chunk:
                    out.write(chunk)
                    out.flush()
            if state in TERMINAL_STATES:
                break
            fields = job_fields(job_id)
            if not fields:
                state = "UNKNOWN"
                break
            state, exit_code = fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "")
            reason = fields.get("Reason", "None")
            count = int(fields.get("Restarts", "0") or 0)
            if count > restarts:
                cause = requeue_cause(read_log(log_path, incarnation_start)[0], reason)
                causes += [cause] * (count - restarts)
                restarts, incarnation_start = count, offset
                print(f"distft: job {job_id} requeued (restart {count}): {cause}", file=out, flush=True)
            where = fields.get("NodeList", "") if state == "RUNNING" else reason
            if (state, where) != seen and state not in TERMINAL_STATES:
                if state == "RUNNING":
                    print(f"distft: job {job_id} RUNNING on {where}", file=out, flush=True)
                else:
                    print(f"distft: job {job_id} {state}{f' ({where})' if where not in ('None', '') else ''}",
                          file=out, flush=True)
                seen = (state, where)
            if state not in TERMINAL_STATES:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\ndistft: stopped following; job {job_id} keeps running. Follow it with `tail -f {log_path}` "
              f"(state: squeue -j {job_id}); cancel it with `scancel {job_id}`", file=out, flush=True)
        raise
    requeued = ""
    if causes:
        requeued = f" after {len(causes)} requeue{'s' if len(causes) > 1 else ''} ({'; '.join(causes)})"
    failed = failing_ranks(log_path, since=segment_start(log_path, incarnation_start)) if state != "COMPLETED" else ""
    detail = f"; {failed}" if failed else ""
    print(f"distft: job {job_id} {state} (exit code {exit_code or '?'}){requeued}{detail}", file=out, flush=True)
    return state


def read_log(log_path: str, offset: int = 0) -> tuple[str, int]:
    """A job log's text from byte `offset` on, and the offset of its end ('' when it is missing).
    Logs live in the run directory, which is untrusted: only a regular file is read
    (distft.files.open_regular), never a FIFO planted there (the follower would wait for a writer
    forever) nor a link."""
    try:
        with open_regular(log_path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return "", offset
    except OSError as err:
        print(f"distft: cannot read the job log ({err}); following the job's state only", file=sys.stderr)
        return "", offset
    return data.decode("utf-8", errors="replace"), offset + len(data)


def segment_start(log_path: str, known: int = 0) -> int:
    """Where the job's latest run starts in its log (a byte offset, failing_ranks' `since`): the
    last SEGMENT_LINE, else `known` (what the follower saw). The follower's own count of
    restarts can lag behind the log (a failed run's srun lines written after it noticed the
    requeue): the log's own mark cannot. Only a regular file is read (the run directory is
    untrusted)."""
    try:
        with open_regular(log_path, "rb") as f:
            text = f.read()
    except OSError:
        return known
    marks = [m.start() for m in SEGMENT_START.finditer(text)]
    return marks[-1] if marks else known


def failing_ranks(log_path: str, since: int = 0) -> str:
    """Which rank failed first and why: srun reports the tasks in the order they ended, so its
    first `srun: error: <node>: task <rank>: ...` line is the cause and the rest were stopped
    after it; the cause's own log gives its last error line. Empty when srun reported nothing.
    `since`: where the job's last run starts in the log (an earlier run's failures are not this one's)."""
    lines = re.findall(r"srun: error: (\S+): tasks? ([\d\-,]+): (.+)", read_log(log_path, since)[0])
    if not lines:
        return ""
    node, task, how = lines[0]
    first_task = re.split(r"[-,]", task)[0]
    reason = last_error(os.path.join(os.path.dirname(log_path), re.sub(r"_\d+_log", f"_{first_task}_log",
                                                                        os.path.basename(log_path))))
    others = len(lines) - 1
    return (f"rank {task} on {node} failed first ({how.strip()}{': ' + reason if reason else ''})"
            + (f"; {others} other task line(s) followed as srun stopped the step" if others else ""))


def last_error(log_path: str) -> str:
    """The last exception line (`SomeError: message`) of a rank's log, or ''."""
    found = re.findall(r"^(\w*(?:Error|Exception|Interrupt)\b.*)$", read_log(log_path)[0], flags=re.M)
    return found[-1].strip()[:300] if found else ""


# --------------------------------------------------------------------------- sweeps



def sweep_launcher_overrides(cfg: Config, argv: list[str]) -> list[str]:
    """For `-m ... hydra/launcher=submitit_slurm|submitit_local`: size every point's job from
    the same launcher.* settings a single run uses (nodes x tasks per node, partition, time
    limit, memory, signal, requeues, setup, job name), so a sweep point is the run it would be
    on its own. Keys the user set as hydra.launcher.* win. Returns Hydra overrides to append.

    Memory: hydra-submitit-launcher's `mem_gb` is an int (0.5 would become 0: no request at all),
    so on SLURM the point asks `--mem` in MiB through additional_parameters, exactly as a single
    run's sbatch_flags; submitit_local takes whole GB, rounded up."""
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra/launcher=")]
    if not chosen or chosen[-1] not in ("submitit_slurm", "submitit_local"):
        return []
    launcher = cfg.launcher
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv}
    values: dict = {"nodes": launcher.nnodes, "tasks_per_node": launcher.nproc_per_node,
                    "cpus_per_task": launcher.cpus_per_task, "gpus_per_node": launcher.gpus_per_node or None,
                    "timeout_min": launcher.time_min, "stderr_to_stdout": True,
                    # squeue's name; each point's rank 0 adds its number (evaluation/sweep.py name_point_job)
                    "name": launcher.job_name or f"distft-{cfg.run.experiment}"}
    if chosen[-1] == "submitit_local":
        values["mem_gb"] = int(-(-launcher.mem_gb // 1)) if launcher.mem_gb else None  # whole GB, rounded up
    else:
        additional = extra_sbatch_parameters(launcher)
        memory_given = given & {"hydra.launcher.mem_gb", "hydra.launcher.mem_per_cpu", "hydra.launcher.mem_per_gpu"}
        if launcher.mem_gb and not memory_given:
            additional = {"mem": f"{int(launcher.mem_gb * 1024)}M", **additional}  # sbatch_extra's mem still wins
        values.update(partition=launcher.partition, account=launcher.account, qos=launcher.qos,
                      constraint=launcher.constraint, signal_delay_s=launcher.signal_delay_s,
                      max_num_timeout=launcher.max_requeues, additional_parameters=additional,
                      # srun_args is not in hydra-submitit-launcher 1.2; srun reads this instead:
                      # one failing rank ends the whole step.
                      setup=["export SLURM_KILL_BAD_EXIT=1", SEGMENT_LINE, *launcher.setup])
    overrides = []
    for key, value in values.items():
        if value is None or f"hydra.launcher.{key}" in given:
            continue
        if isinstance(value, dict):  # a free-form mapping: its keys are added one by one
            overrides += [f"+hydra.launcher.{key}.{k}={_hydra_value(v)}" for k, v in value.items()
                          if f"hydra.launcher.{key}.{k}" not in given]
            continue
        overrides.append(f"hydra.launcher.{key}={_hydra_value(value)}")
    if chosen[-1] == "submitit_slurm" and not any(k.startswith("hydra.callbacks.sweep_watch") for k in given):
        # Waits without sacct and reports failed points once every job ended (launchers/sweep_watch.py).
        overrides.append("+hydra.callbacks.sweep_watch._target_=distft.launchers.sweep_watch.SweepWatch")
    return overrides


def _hydra_value(value) -> str:
    """A Python value as a Hydra override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)
