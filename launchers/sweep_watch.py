"""`-m ... hydra/launcher=submitit_slurm` as distft runs it: the sweep ends on every cluster, and a
failed point is reported, not hidden.

`sweep_launcher_overrides` (launchers/slurm.py) adds the Hydra callback `SweepWatch` to such
sweeps. It changes nothing in Hydra's launcher (which only accepts plugins from `hydra_plugins`)
and copies none of it; it uses submitit's own extension point, the watcher that every SlurmJob
shares (`SlurmJob.watcher`):

1. Finished jobs are found without accounting. submitit learns that a job which left no result
   pickle has ended only from `sacct`; where the cluster keeps no accounting (no slurmdbd) that
   fails, submitit warns and waits forever. `SchedulerWatcher` asks `sacct` while it answers and
   the controller (`squeue --states=all`, which lists ended jobs for MinJobAge, 300 s by default)
   otherwise; a job that neither lists for `forget_after_s` (120 s) has ended (the controller
   forgot it, or it never reached the queue). Polls back off from 2 s to 15 s (submitit's sacct: to 600 s).
2. A failed point is reported once every point ended. Its ranks record their first error beside
   point.json and exit non-zero (distft/commands/train.py), so SLURM records FAILED and submitit has no
   result. Hydra's launcher waits for the jobs in order and raises at the first without a
   result, and its sweeper then skips on_multirun_end (no summary). So the watcher holds such a
   job "not done" until every job of the sweep ended; then `SweepWatch.report` leaves
   `failed.job.json` for a job that ended with no rank's record (killed, out of memory, a rank
   that left through os._exit), prints each failed point's first error and writes the summary,
   and Hydra raises submitit's error for the first failed job (exit 1). A point whose ranks
   recorded only a lost peer (gloo's "Connection reset by peer": a rank was SIGKILLed, by the OOM
   killer say, and could record nothing) is explained by srun's first failure in the job's latest
   run instead (`record_job_failure`).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from typing import Optional

from submitit.core.utils import JobPaths
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

from distft.evaluation.sweep import POINT, collect, first_failure, record_failure, summarize, sweep_id
from distft.files import write_json
from distft.launchers.slurm import failing_ranks, job_state, last_error, segment_start

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object

log = logging.getLogger("distft")


class SchedulerWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, with the controller (`squeue`) where `sacct` fails, and a
    hold on jobs that ended without a result while the rest of `sweep` runs."""

    def __init__(self, delay_s: int = 15, forget_after_s: float = 120.0) -> None:
        super().__init__(delay_s=delay_s)
        self.forget_after_s = forget_after_s
        self.accounting: Optional[bool] = None  # unknown until sacct was asked once
        self.sweep: Optional[SweepWatch] = None
        self._unlisted_since: dict[str, float] = {}

    def ended(self, job_id: str) -> bool:
        """The scheduler's answer alone (as last polled): the job is in no running state."""
        return SlurmInfoWatcher.is_done(self, job_id, mode="cache")

    def is_done(self, job_id: str, mode: str = "standard") -> bool:
        # submitit asks only about jobs without a result pickle: one that ended is a failed one.
        if not SlurmInfoWatcher.is_done(self, job_id, mode=mode):
            return False
        return self.sweep is None or mode == "cache" or self.sweep.all_ended(self)

    def update(self) -> None:
        pending = self._registered - self._finished
        if not pending:
            return
        self._num_calls += 1
        info = self._from_accounting() if self.accounting is not False else None
        if info is None:
            info = self._from_controller(pending)
        if info is not None:
            self._info_dict.update(info)
            self._note_unlisted(pending, info)
        self._last_status_check = time.time()
        self._finished.update(job_id for job_id in pending if self.ended(job_id))

    def _from_accounting(self) -> Optional[dict]:
        command = self._make_command()
        result = subprocess.run(command, capture_output=True, text=True) if command else None
        if result is None or result.returncode != 0:
            if self.accounting is None:
                reason = result.stderr.strip().splitlines()[-1] if result and result.stderr.strip() else "no answer"
                log.info("sacct failed (%s): job states from the controller (squeue) instead", reason)
                self.accounting = False
            return None
        self.accounting = True
        return self.read_info(result.stdout)

    def _from_controller(self, pending: set) -> Optional[dict]:
        jobs = ",".join(sorted({job_id.split("_")[0] for job_id in pending}))
        result = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T", f"--jobs={jobs}"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:  # none of them is known any more
                return {}
            log.warning("squeue failed (%s); job states may be stale", result.stderr.strip()[-300:])
            return None
        # The same `JobID|State` lines as sacct --parsable2 writes: submitit's reader expands arrays.
        return self.read_info("JobID|State\n" + result.stdout)

    def _note_unlisted(self, pending: set, info: dict) -> None:
        now = time.time()
        for job_id in pending:
            if job_id in info:
                self._unlisted_since.pop(job_id, None)
            elif now - self._unlisted_since.setdefault(job_id, now) > self.forget_after_s:
                self._info_dict[job_id] = {"State": "GONE"}  # any state but submitit's running ones: ended


def install_watcher() -> SchedulerWatcher:
    """Make SchedulerWatcher the watcher of every SlurmJob in this process (once)."""
    if not isinstance(SlurmJob.watcher, SchedulerWatcher):
        SlurmJob.watcher = SchedulerWatcher()
    return SlurmJob.watcher


class SweepWatch(Callback):
    """Hydra callback for submitit_slurm sweeps (added by sweep_launcher_overrides): installs
    SchedulerWatcher when the multirun starts; reports failed points when every job ended."""

    def on_multirun_start(self, config, **kwargs) -> None:
        self.sweep_dir = str(config.hydra.sweep.dir)
        self.folder = str(config.hydra.launcher.submitit_folder)
        self.tasks = int(config.hydra.launcher.nodes) * int(config.hydra.launcher.tasks_per_node)
        self.reported = False
        install_watcher().sweep = self  # not kept here: this callback is pickled into every job

    def jobs(self, watcher: SchedulerWatcher) -> list[str]:
        """The sweep's jobs, in job-number order: array tasks `<array>_<i>`, and lone jobs (a
        one-point batch); an array's own id, which submitit registers too, is not a job."""
        ids = watcher._registered
        parents = {job_id.split("_")[0] for job_id in ids if "_" in job_id}
        jobs = [job_id for job_id in ids if job_id not in parents]
        return sorted(jobs, key=lambda j: tuple(int(part) for part in j.split("_")))

    def has_result(self, job_id: str) -> bool:
        return all(JobPaths(self.folder, job_id, task).result_pickle.exists() for task in range(self.tasks))

    def all_ended(self, watcher: SchedulerWatcher) -> bool:
        """True once every job of the sweep left its result or ended; the first time, report."""
        if self.reported:
            return True
        if not all(self.has_result(j) or watcher.ended(j) for j in self.jobs(watcher)):
            return False
        self.reported = True
        try:
            self.report(watcher)
        except Exception as err:  # noqa: BLE001 - a report problem must not hide the sweep's own outcome
            print(f"distft: the sweep's failure report failed ({type(err).__name__}: {err}); "
                  f"`python -m distft.sweep {self.sweep_dir}` writes the summary", file=sys.stderr)
        return True

    def report(self, watcher: SchedulerWatcher) -> None:
        failed = [self.record_point(job_num, job_id) for job_num, job_id in enumerate(self.jobs(watcher))
                  if not self.has_result(job_id)]
        swept, rows = collect(self.sweep_dir)
        values = {row["job"]: " ".join(f"{k}={row[k]}" for k in swept) for row in rows}
        for job_num, job_id, failure in failed:
            where = f"rank {failure['rank']} on {failure['host']}: " if failure.get("rank") is not None else ""
            print(f"distft: sweep point {job_num} ({values.get(job_num, '')}) failed: {where}{failure['error']} "
                  f"(job {job_id}, logs {JobPaths(self.folder, job_id).folder})", file=sys.stderr, flush=True)
        paths = summarize(self.sweep_dir)
        if paths:
            print(f"sweep summary: {paths['md']} (also summary.csv, summary.png)", flush=True)

    def record_point(self, job_num: int, job_id: str) -> tuple[int, str, dict]:
        """A job that ended without a result: its point's first error, recorded by a rank or,
        failing that, here from the scheduler's state and the job's log."""
        point_dir = os.path.join(self.sweep_dir, str(job_num))  # hydra.sweep.subdir: the job number
        point_path = os.path.join(point_dir, POINT)
        if not os.path.exists(point_path):  # it failed before its rank 0 wrote point.json
            os.makedirs(point_dir, exist_ok=True)
            write_json(point_path, {"job": job_num, "overrides": self.overrides(job_id), "run_dir": None,
                                    "experiment": None, "sweep": sweep_id(self.sweep_dir)})
        failure = first_failure(point_dir)
        if failure is None or failure.get("lost_peer"):  # else a rank's own error says why
            state, exit_code = job_state(job_id)
            log_path = str(JobPaths(self.folder, job_id).stdout)
            failure = record_job_failure(point_dir, job_id, state, exit_code, log_path)
        return job_num, job_id, failure

    def overrides(self, job_id: str) -> list[str]:
        """The point's overrides, from the job's submitted pickle (Hydra's launcher call)."""
        from submitit.core.utils import DelayedSubmission

        try:
            return list(DelayedSubmission.load(JobPaths(self.folder, job_id).submitted_pickle).args[0])
        except Exception:  # noqa: BLE001 - only a label for the summary
            return []


def record_job_failure(point_dir: str, job_id: str, state: str, exit_code: str, log_path: str) -> Optional[dict]:
    """A failed job whose ranks recorded nothing, or only a lost peer: leave `failed.job.json`
    with srun's first failure in the job's latest run (`log_path`: the job's log, where srun
    writes `srun: error: <node>: task <rank>: Killed`), which first_failure ranks above a lost
    peer; a peer's lost connection is the consequence, the rank srun names first the cause.
    Without srun's word, a lost peer's record stands; with no record at all, the job's state and
    its log's last error are recorded. Returns the point's failure (first_failure)."""
    srun = failing_ranks(log_path, since=segment_start(log_path))
    if srun or first_failure(point_dir) is None:
        why = srun or last_error(log_path) or "no rank recorded an error (killed?)"
        record_failure(point_dir, "job", f"job {job_id} {state} (exit code {exit_code or '?'}): {why}")
    return first_failure(point_dir)
