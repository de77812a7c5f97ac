"""Sweep summaries: one table of every point of a Hydra multirun, and a plot of its eval loss.

    python -m distft -m +experiment=tiny_lora technique.lora.r=4,8 train.lr=1e-3,3e-3 \\
        hydra/launcher=submitit_slurm        # writes the summary when the sweep ends
    python -m distft.sweep outputs/multirun  # writes it again, from what is on disk (the newest sweep):
                                             # distft/commands/sweep.py

Each sweep has its own directory, `${run.root}/multirun/<date>_<time>` (conf/config.yaml
hydra.sweep.dir), holding `sweep.json` (the sweep's id, written when it starts), Hydra's
`multirun.yaml` and one `<job num>/` per point; the run directories stay where a single run's
would be (deterministic: the same point run again resumes). A reused `hydra.sweep.dir` gets a new
id: its summary lists only the points of the latest sweep there.

Each point's rank 0 leaves `<sweep dir>/<job num>/point.json` (its overrides, its run directory and
the sweep id) when it starts; a rank that fails leaves `failed.rank<N>.json` beside it (its first
error line), and on SLURM the sweep's watcher (launchers/sweep_watch.py) leaves `failed.job.json`
for a job that ended without either (killed, out of memory, a rank that left through os._exit).
With Hydra's basic launcher (the default) the points run one after another in the sweep's own
process: a point that fails (its run directory in use by another run, bad data) raises
`PointFailed` instead of exiting (`point_exit`; `failed.job.json` when no rank recorded why), so
the other points still run, and the sweep exits 1 once they did. The summary reads
every point's `summary.json` from its run directory. Written into the sweep directory:
`summary.csv` (one row per point, the swept values as columns), `summary.md` (the same as a
markdown table, best eval loss first) and `summary.png` (eval loss after tuning per point, and
before it when the base was evaluated). A point's status is `complete`, `failed: <first error
line>` (the earliest failure of a rank that was not just a peer's lost connection), or
`incomplete`: still running or requeued. On SLURM, srun's first failure (the job's log) outranks
a rank's lost connection: a killed rank (the OOM killer) leaves no record, its peer's says only
"Connection reset by peer". Each point's rank 0 names its array task `<the sweep's job name>-<job
num>` (`name_point_job`; `distft-<experiment>-<job num>` by default), so that squeue tells them apart.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import math
import os
import sys
import time
import uuid
import warnings
from typing import Any, Optional

from distft.config import run_dir
from distft.errors import EXIT_INTERRUPTED, EXIT_STOPPED
from distft.files import read_json, write_bytes, write_json, write_text

log = logging.getLogger("distft")

POINT = "point.json"
SWEEP = "sweep.json"
FAILED = "failed.{source}.json"  # source: rank<N> (the rank's own error) or job (what the launcher saw)
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
METRICS = (  # column, path in a run's summary.json
    ("eval_loss", ("eval_after", "loss")),
    ("eval_loss_base", ("eval_before", "loss")),
    ("perplexity", ("eval_after", "perplexity")),
    ("exact_match", ("eval_after", "exact_match")),
    ("f1", ("eval_after", "f1")),
    ("rouge_l", ("eval_after", "rouge_l")),
    ("final_train_loss", ("final_train_loss",)),
    ("steps", ("steps",)),
    ("tokens_per_s", ("tokens_per_s",)),
    ("world_size", ("world_size",)),
    ("requeues", ("requeues",)),
)
# objective=dpo's held-out preference figures (distft/objective.py): columns of a sweep whose
# points have them (a sweep of objective.beta), left out of the others' summaries.
PREFERENCE_METRICS = (
    ("preference_accuracy", ("eval_after", "preference_accuracy")),
    ("reward_accuracy", ("eval_after", "reward_accuracy")),
    ("reward_margin", ("eval_after", "reward_margin")),
)


def start_sweep(sweep_dir: str) -> str:
    """A new sweep in `sweep_dir`: a fresh id in `sweep.json`, which its points copy into their
    point.json, so that a reused directory's summary lists only this sweep's points."""
    os.makedirs(sweep_dir, exist_ok=True)
    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    write_json(os.path.join(sweep_dir, SWEEP), {"id": sweep_id, "started": time.time()})
    return sweep_id


def sweep_id(sweep_dir: str) -> Optional[str]:
    """The id of the latest sweep started in `sweep_dir`; None for a directory without sweep.json."""
    try:
        return read_json(os.path.join(sweep_dir, SWEEP), max_bytes=1 << 16).get("id")
    except (OSError, ValueError, AttributeError):
        return None


def write_point(output_dir: str, cfg, overrides: list[str], job_num: int, sweep: Optional[str] = None) -> str:
    os.makedirs(output_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(output_dir, FAILED.format(source="*"))):  # a reused sweep dir's
        os.remove(stale)
    path = os.path.join(output_dir, POINT)
    write_json(path, {"job": int(job_num), "overrides": overrides, "run_dir": run_dir(cfg),
                      "experiment": cfg.run.experiment, "sweep": sweep})
    return path


def error_line(err: BaseException) -> str:
    """`Type: first line of the message`, what a failed point's status shows."""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0]}" if message else type(err).__name__


def lost_peer(err: BaseException) -> bool:
    """True for an error that only says a peer went away (torch.distributed's DistError family,
    gloo's closed connections): the consequence of another rank's failure, not its cause."""
    names = {cls.__name__ for cls in type(err).__mro__}
    text = str(err)
    return "DistError" in names or "Connection closed by peer" in text or "Connection reset by peer" in text


def record_failure(point_dir: str, source: str, error: str, rank: Optional[int] = None, host: str = "",
                   lost: bool = False) -> str:
    """Leave `failed.<source>.json` in a point's directory: its error line, where and when."""
    os.makedirs(point_dir, exist_ok=True)
    path = os.path.join(point_dir, FAILED.format(source=source))
    write_json(path, {"error": error[:500], "rank": rank, "host": host, "lost_peer": lost, "time": time.time()})
    return path


def first_failure(point_dir: str) -> Optional[dict]:
    """The failure that explains a point: the earliest one of a rank that did not merely lose a
    peer, else the launcher's (`failed.job.json`), else the earliest lost peer's; None when none.
    The launcher's outranks a lost peer: it is written beside one only when it knows better
    (srun's first failure: the rank that was killed and could not say so; launchers/sweep_watch.py)."""
    ranks, job = [], None
    for path in glob.glob(os.path.join(point_dir, FAILED.format(source="*"))):
        try:
            record = read_json(path, max_bytes=1 << 20)
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        if os.path.basename(path) == FAILED.format(source="job"):
            job = record
        else:
            ranks.append(record)
    causes = [r for r in ranks if not r.get("lost_peer")]
    if causes or job is None:
        return min(causes or ranks, key=lambda r: r.get("time", 0.0), default=None)
    return job


JOB_NAME_CHARS = 39  # squeue's default name column is narrow; longer names are cut there anyway


def point_job_name(job_name: str, job_num: int) -> str:
    """`<the sweep's job name>-<job num>` (`distft-tiny_lora-3`), its first part cut so that the
    whole stays within JOB_NAME_CHARS: the point's number is what tells the tasks apart."""
    suffix = f"-{job_num}"
    return job_name[:JOB_NAME_CHARS - len(suffix)] + suffix


def name_point_job(job_name: Optional[str], job_num: int) -> Optional[str]:
    """In a sweep point that is a task of a submitit job array (Hydra's submitit_slurm launcher
    submits one array named `job_name` for the whole sweep: every task the same name in squeue),
    rename this task `point_job_name`. Best effort: a name is only a label, so a refusal or a
    missing `scontrol` is logged at debug level and the run goes on. Returns the new name, or
    None where nothing was renamed (no array task, no name, scontrol failed)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if not (array and task and job_name and os.environ.get("SUBMITIT_FOLDER")):  # SUBMITIT_FOLDER: a submitit job
        return None
    import subprocess

    name = point_job_name(job_name, job_num)
    command = ["scontrol", "update", f"JobId={array}_{task}", f"JobName={name}"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        log.debug("sweep point %s keeps its job name: `%s` failed (%s)", job_num, " ".join(command), err)
        return None
    if result.returncode != 0:
        log.debug("sweep point %s keeps its job name: `%s` failed (%s)", job_num, " ".join(command),
                  (result.stderr or result.stdout).strip()[-300:])
        return None
    return name


def _get(data: dict, path: tuple) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def collect(sweep_dir: str) -> tuple[list[str], list[dict]]:
    """(swept keys, one row per point of the directory's latest sweep, in job order)."""
    current = sweep_id(sweep_dir)
    points = []
    for path in glob.glob(os.path.join(sweep_dir, "*", POINT)):
        try:  # a point directory is a run's: a FIFO or a link there is skipped, never waited for
            point = read_json(path, max_bytes=1 << 20)
        except (OSError, ValueError) as err:
            log.warning("sweep point %s cannot be read (%s); left out of the summary", path, err)
            continue
        if not isinstance(point, dict) or "job" not in point:
            log.warning("sweep point %s is not a point record; left out of the summary", path)
            continue
        if current is None or point.get("sweep") == current:  # an earlier sweep's point: not this summary's
            points.append((os.path.dirname(path), point))
    points.sort(key=lambda p: p[1]["job"])
    parsed = [dict(o.split("=", 1) for o in p["overrides"] if "=" in o) for _, p in points]
    # Swept keys: those whose value differs between points (the rest is the sweep's shared setting).
    keys = sorted({k for values in parsed for k in values})
    swept = [k for k in keys if len({values.get(k) for values in parsed}) > 1] or keys
    rows = []
    for (point_dir, point), values in zip(points, parsed):
        summary = None
        summary_path = os.path.join(point["run_dir"], "summary.json") if point.get("run_dir") else ""
        failure = first_failure(point_dir)  # this sweep's: write_point clears earlier ones
        if not failure and summary_path and os.path.lexists(summary_path):
            try:
                summary = read_json(summary_path)
            except (OSError, ValueError) as err:
                log.warning("%s cannot be read (%s); its point is listed as incomplete", summary_path, err)
        row = {"job": point["job"], **{k: values.get(k, "") for k in swept}}
        row["status"] = f"failed: {failure['error']}" if failure else "complete" if summary else "incomplete"
        for column, where in (*METRICS, *PREFERENCE_METRICS):
            row[column] = _get(summary, where) if summary else None
        row["run_dir"] = point.get("run_dir") or ""
        rows.append(row)
    return swept, rows


def latest_sweep(multirun_dir: str) -> Optional[str]:
    """The newest sweep directory (one holding sweep.json) under `multirun_dir`, or None."""
    found = glob.glob(os.path.join(multirun_dir, "*", SWEEP))
    return os.path.dirname(max(found, key=os.path.getmtime)) if found else None


def summarize(sweep_dir: str) -> Optional[dict[str, str]]:
    """Write summary.csv, summary.md and summary.png into the sweep directory; returns their
    paths, or None when the directory holds no sweep point."""
    swept, rows = collect(sweep_dir)
    if not rows:
        return None
    columns = ["job", *swept, "status", *(c for c, _ in METRICS), *_preference_columns(rows), "run_dir"]
    rows = [{k: row[k] for k in columns} for row in rows]
    paths = {name.split(".")[1]: os.path.join(sweep_dir, name) for name in SUMMARY_FILES}
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    write_text(paths["csv"], table.getvalue(), "the sweep summary")
    _write_markdown(paths["md"], sweep_dir, swept, rows)
    _plot(paths["png"], swept, rows)
    return paths


def _preference_columns(rows: list[dict]) -> list[str]:
    """PREFERENCE_METRICS' columns when any point has them, else none."""
    return [c for c, _ in PREFERENCE_METRICS if any(row.get(c) is not None for row in rows)]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def _sort_key(row: dict) -> tuple:
    loss = row["eval_loss"]
    return (loss is None, loss if loss is not None else 0.0, row["job"])


def _write_markdown(path: str, sweep_dir: str, swept: list[str], rows: list[dict]) -> None:
    shown = ["job", *swept, "status", "eval_loss", "eval_loss_base", "exact_match", "f1", "rouge_l",
             *_preference_columns(rows), "final_train_loss", "steps", "requeues"]
    done = sum(r["status"] == "complete" for r in rows)
    failed = sum(r["status"].startswith("failed") for r in rows)
    lines = [f"# Sweep {os.path.abspath(sweep_dir)}", "",
             f"{len(rows)} points, {done} complete{f', {failed} failed' if failed else ''}; best eval loss first. "
             "Run directories in summary.csv.", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in shown) + " |"
              for row in sorted(rows, key=_sort_key)]
    write_text(path, "\n".join(lines) + "\n")


def plot_figure(swept: list[str], rows: list[dict]):
    """The sweep's bar chart (summary.png): each point's held-out loss, tuned beside its base. The
    legend sits in headroom above the tallest bar (the y axis reaches 30% past it), never over a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.rpartition('.')[2]}={row[k]}" for k in swept) or f"job {row['job']}" for row in rows]
    after = [row["eval_loss"] if row["eval_loss"] is not None else math.nan for row in rows]
    before = [row["eval_loss_base"] if row["eval_loss_base"] is not None else math.nan for row in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4), dpi=100)
    xs = range(len(rows))
    if any(math.isfinite(b) for b in before):
        ax.bar([x - 0.2 for x in xs], before, width=0.4, label="base model", color="0.7")
        ax.bar([x + 0.2 for x in xs], after, width=0.4, label="tuned")
        tallest = max((v for v in before + after if math.isfinite(v)), default=1.0)
        ax.set_ylim(0, tallest * 1.3)
        ax.legend(loc="upper center", ncol=2, frameon=False)
    else:
        ax.bar(xs, after, width=0.6)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("eval loss per sweep point")
    ax.grid(axis="y", alpha=0.3)
    with warnings.catch_warnings():  # labels too long to fit (a one-point summary names every key): drawn anyway
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    return fig


def _plot(path: str, swept: list[str], rows: list[dict]) -> None:
    fig = plot_figure(swept, rows)
    import matplotlib.pyplot as plt

    image = io.BytesIO()
    fig.savefig(image, format="png")
    plt.close(fig)
    write_bytes(path, image.getvalue(), "the sweep's plot")


try:
    from hydra.errors import CompactHydraException
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = CompactHydraException = Exception


class PointFailed(CompactHydraException):
    """A sweep point that failed, raised in place of its exit where Hydra's basic launcher (the
    default for -m) runs every point in this process: a SystemExit there would end the whole
    sweep, the points after it never run. Hydra keeps an exception as that point's result, runs
    the other points, then ends the sweep with it: its message alone (a CompactHydraException,
    no traceback) and exit code 1."""

    def __init__(self, sweep_dir: str, job: int, error: str):
        super().__init__(sweep_dir, job, error)
        self.sweep_dir, self.job, self.error = sweep_dir, job, error

    def __str__(self) -> str:
        # Composed when Hydra prints it, after the last point: the point named by its swept values,
        # as the summary names it, and how many points failed in all.
        try:
            swept, rows = collect(self.sweep_dir)
            row = next(r for r in rows if r["job"] == self.job)
            values = " ".join(f"{k}={row[k]}" for k in swept)
            failed = sum(r["status"].startswith("failed") for r in rows)
            tally = f"{failed} of {len(rows)} points failed"
        except Exception:  # noqa: BLE001 - the point's own error still says what matters
            values, tally = "", "the other points were run"
        summary = os.path.join(self.sweep_dir, "summary.md")
        return f"distft: sweep point {self.job} ({values}) failed: {self.error}; {tally}: see {summary}"


def runs_points_here(hydra_cfg) -> bool:
    """Whether this is a multirun whose launcher runs its points in this process, one after the
    other (Hydra's basic launcher; submitit's run each in a job of its own)."""
    from hydra.types import RunMode

    return hydra_cfg.mode == RunMode.MULTIRUN and str(hydra_cfg.launcher._target_).endswith(".BasicLauncher")


def point_exit(code: Any) -> Optional[PointFailed]:
    """What the current point's exit with `code` becomes where `runs_points_here`: PointFailed
    naming the point and its first error (`failed.job.json` recorded when no rank left one: a
    refusal before training, a local launcher's exit code). None (exit as asked) elsewhere, on
    success, and for a stop signal or Ctrl-C (4, 130), which stop the sweep, not one point."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if code in (None, 0, EXIT_STOPPED, EXIT_INTERRUPTED) or not runs_points_here(hydra_cfg):
        return None
    point_dir = hydra_cfg.runtime.output_dir
    if first_failure(point_dir) is None:
        record_failure(point_dir, "job", f"exit code {code} (its message is above)")
    return PointFailed(hydra_cfg.sweep.dir, int(hydra_cfg.job.num), first_failure(point_dir)["error"])


class SweepSummary(Callback):
    """Hydra callback (conf/config.yaml), in the submitting process: a new sweep id when a
    multirun starts, the summary when it ends after every job returned (submitit launchers wait
    for their jobs). Hydra's sweeper raises a failed point's error instead of ending the multirun:
    on submitit_slurm, launchers/sweep_watch.py writes the summary then, once every job ended;
    with the basic launcher it is written after each point (`on_job_end`), so the last one is the
    whole sweep's (elsewhere, `python -m distft.sweep <sweep dir>` writes it)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        start_sweep(config.hydra.sweep.dir)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if runs_points_here(config.hydra):
            _write_summary(config.hydra.sweep.dir, announce=False)

    def on_multirun_end(self, config, **kwargs) -> None:
        _write_summary(config.hydra.sweep.dir, announce=True)


def _write_summary(sweep_dir: str, announce: bool) -> None:
    try:
        paths = summarize(sweep_dir)
    except Exception as err:  # a summary problem must not hide the sweep's own outcome
        print(f"distft: sweep summary failed ({err}); rerun `python -m distft.sweep {sweep_dir}`", file=sys.stderr)
        return
    if paths and announce:
        print(f"sweep summary: {paths['md']} (also summary.csv, summary.png)", flush=True)
