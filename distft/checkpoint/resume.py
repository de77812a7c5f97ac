"""The run directory's policy: who owns it, and whether a run resumes, starts over or is done.

Run directories are deterministic, so the same command finds its own run again. Before anything is
built, `prepare_run_dir` (every rank) decides: `resume=false` sets the old run aside (never
deletes it); a finished run (summary.json) is reported, not trained again; a run whose data files
or settings changed is refused with the way out (`data_changes`, `resume_conflicts`); otherwise
the config is dumped once and the loop resumes from `find_resumable`'s checkpoint or starts.
`owning_run_dir` holds the run's lock (distft/runlock.py) for the whole run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Optional

from distft import dist
from distft.checkpoint.store import committed_checkpoints, free_name, read_meta, read_trainer_state
from distft.config import Config, config_hash, to_dict
from distft.data.sources import data_fingerprint
from distft.engines import state_format
from distft.errors import CheckpointError, DataError, Preempted, RunInUse
from distft.files import make_dirs, read_json, read_text, write_text
from distft.runlock import LOCK, acquire
from distft.summary import SUMMARY
from distft.tracking import flatten

log = logging.getLogger("distft")



@contextlib.contextmanager
def owning_run_dir(run_dir: str, info) -> Iterator[None]:
    """Every rank: rank 0 holds the run directory's lock (distft/runlock.py) from before anything
    in it is read or moved until the run ends; all ranks refuse together when another run holds
    it. A requeued job keeps its lock while it waits to run again: a submission of the same run
    meanwhile is refused (the job is PENDING, so the lock is live), and the job's own rerun takes
    it over (an earlier run of this job, distft/runlock.py)."""
    lock, refusal = None, None
    if info.is_main:
        try:
            lock = acquire(run_dir)
        except RunInUse as err:
            refusal = str(err)
    refusal = dist.all_gather_object(refusal)[0]
    if refusal:
        raise RunInUse(refusal)
    requeued = False
    try:
        yield
    except Preempted as stopped:
        requeued = stopped.requeued
        raise
    finally:
        if lock is not None:
            lock.release(remove=not requeued)


def prepare_run_dir(cfg: Config, info, run_dir: str) -> tuple[Optional[dict], Optional[dict]]:
    """Every rank, before the run is built: (the summary of a run already complete, None) when
    there is nothing to do, else (None, the data files' fingerprint) with the run directory ready
    to resume or start in (see the module docstring)."""
    if not cfg.resume:
        if info.is_main:
            aside = set_run_aside(run_dir, keep=(LOCK,))
            if aside:
                log.info("resume=false: the previous run in %s was moved to %s", run_dir, aside)
        dist.barrier()
    summary_path = os.path.join(run_dir, SUMMARY)
    fingerprint = _data_fingerprint(cfg, info)
    if os.path.lexists(summary_path):
        summary = read_run_file(summary_path, read_json)
        changed = data_changes(summary.get("data_fingerprint"), fingerprint)
        if changed:
            raise CheckpointError(
                f"{run_dir} holds a run that finished on other data: {'; '.join(changed)}. Pass resume=false to "
                "train on the data as it is now (the finished run is kept aside), restore the file, or choose "
                "another run.dir")
        log.info("this run is already complete (%s); nothing to do. Change the config, or pass resume=false "
                 "to train it again.", summary_path)
        return summary, None
    newest = _newest_trainer_state(run_dir)
    changed = data_changes(newest[1].get("data_fingerprint") if newest else None, fingerprint)
    if changed:
        raise CheckpointError(
            f"cannot resume {newest[0]}: its run trained on other data: {'; '.join(changed)}. Resuming would go on "
            "with rows it never saw (and its base-model scores are of the old split). Restore the file, pass "
            "resume=false to start over on the data as it is now (the interrupted run is kept aside), or choose "
            "another run.dir")
    conflicts = resume_conflicts(cfg, run_dir)
    if conflicts:
        raise CheckpointError(
            f"{run_dir} holds a run with another config ({'; '.join(conflicts[:3])}); rerun it with its own "
            "config to resume, choose a new run.dir, or pass resume=false to start over (the old run is kept aside)"
        )
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        if not os.path.exists(os.path.join(run_dir, "config.yaml")):  # a resume keeps the first dump
            write_config_dump(cfg, run_dir)
    dist.barrier()
    return None, fingerprint or {}


def write_config_dump(cfg: Config, run_dir: str) -> None:
    """The run's config, secrets redacted, as YAML: what `python -m distft` actually ran."""
    from omegaconf import OmegaConf

    write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg, redact=True))),
               "the config dump")


def _data_fingerprint(cfg: Config, info) -> Optional[dict]:
    """Rank 0's fingerprint of the data files (distft.data.sources.data_fingerprint), on every rank;
    None when a file cannot be read: the data loader reports that later in its own words (after
    the tokenizer and vocabulary checks, which come first), and nothing is compared."""
    found = None
    if info.is_main:
        try:
            found = data_fingerprint(cfg.data)
        except DataError:
            found = None
    return dist.all_gather_object(found)[0]


def _newest_trainer_state(run_dir: str) -> Optional[tuple[str, dict]]:
    """(the newest committed checkpoint, its trainer state), or None (none, or it cannot be read:
    find_resumable then reports it and falls back)."""
    for checkpoint in reversed(committed_checkpoints(run_dir)):
        try:
            return checkpoint, read_trainer_state(checkpoint)
        except (OSError, ValueError):
            continue
    return None


def set_attempt_aside(run_dir: str, leftovers: tuple[str, ...]) -> None:
    """Rank 0, when a run starts from step 0 in a directory an earlier attempt used (it stopped
    before its first checkpoint): its files among `leftovers` (metrics, plot, report, W&B id) move
    to `attempts/<time>/` (kept, never deleted), so this run's curve and W&B run start clean
    instead of appending to the old ones."""
    leftovers = [n for n in leftovers if os.path.lexists(os.path.join(run_dir, n))]
    if not leftovers:
        return
    aside = os.path.join(run_dir, "attempts", time.strftime("%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(aside):
        aside, n = f"{aside.rsplit('.', 1)[0]}.{n}", n + 1
    make_dirs(aside, run_dir, "the earlier attempt's files")
    for name in leftovers:
        os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    log.warning("no checkpoint to resume from: training starts at step 0; what an earlier attempt left (%s) was "
                "moved to %s", ", ".join(leftovers), aside)


def tracker_run_id(cfg: Config, run_dir: str, info) -> str:
    """The W&B run id of this run directory: chosen once, kept in the directory, so a resumed
    (or resharded) run continues the same curve."""
    path = os.path.join(run_dir, "tracker_run_id")
    if info.is_main and not os.path.exists(path):
        # Random suffix: a run started over (resume=false) is a new W&B run, not the old one continued.
        write_text(path, f"{cfg.run.experiment}-{config_hash(cfg)}-{os.urandom(3).hex()}\n")
    dist.barrier()
    return read_run_file(path, read_text).strip()


def read_run_file(path: str, read):
    """A small file of the run directory read with `read` (files.read_json / read_text: regular
    files only, never a planted link or FIFO); what cannot be read is a CheckpointError naming it."""
    try:
        value = read(path, max_bytes=16 << 20)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); the run directory is damaged: remove that file to "
                              "resume, or pass resume=false to start over (the old run is kept aside)") from None
    if read is read_json and not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object; the run directory is damaged: remove that file to "
                              "resume, or pass resume=false to start over (the old run is kept aside)")
    return value


def set_run_aside(run_dir: str, keep: tuple[str, ...] = ()) -> Optional[str]:
    """`resume=false`: move an existing run directory's contents out of the way, into a new
    directory beside it (never deleted), leaving the names in `keep` (the run's own lock). Rank 0."""
    if not os.path.isdir(run_dir):
        return None
    names = [n for n in sorted(os.listdir(run_dir)) if n not in keep]
    if not names:
        return None
    aside = free_name(f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    return aside



RESUMABLE_CHANGES = ("parallel", "launcher", "cluster", "checkpoint", "tracking", "run", "eval", "resume", "plan",
                     "train.micro_batch_size", "train.log_every", "train.device", "train.eval_every",
                     "train.eval_max_batches", "train.nonfinite", "train.max_nonfinite_steps")


def resume_conflicts(cfg: Config, run_dir: str) -> list[str]:
    """Settings in which `cfg` differs from the run its newest checkpoint in `run_dir` belongs to
    (`key: then -> now`), beyond RESUMABLE_CHANGES. Empty when there is nothing to resume."""
    found = committed_checkpoints(run_dir)
    if not found:
        return []
    try:
        then = flatten(read_meta(found[-1])["config"], sep=".")
    except (OSError, ValueError, KeyError):
        return []  # a damaged checkpoint: find_resumable reports it
    now = flatten(to_dict(cfg), sep=".")
    # A setting the distft that wrote the checkpoint did not have yet ran as its default since.
    defaults = flatten(to_dict(Config()), sep=".")
    for key in set(now) - set(then):
        if key in defaults:
            then[key] = defaults[key]
    allowed = tuple(RESUMABLE_CHANGES)
    conflicts = [f"{key}: {then.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(then) | set(now))
                 if then.get(key) != now.get(key) and not any(key == k or key.startswith(k + ".") for k in allowed)]
    strategy = "parallel.strategy"
    if state_format(str(then.get(strategy))) != state_format(str(now.get(strategy))):
        conflicts.insert(0, f"{strategy}: {then.get(strategy)!r} -> {now.get(strategy)!r}, whose training states do "
                            "not convert into each other")
    return conflicts


def data_changes(then: Optional[dict], now: Optional[dict]) -> list[str]:
    """How the data files differ from the ones a run trained on (distft.data.sources.data_fingerprint),
    one line each; empty when they are the same, or when either is unknown (a checkpoint or
    summary written before distft recorded it; a file that cannot be read now, which the data
    loader reports)."""
    if then is None or now is None:
        return []
    changes = []
    for key in sorted(set(then) | set(now)):
        old, new = then.get(key), now.get(key)
        if old == new:
            continue
        if old is None or new is None:
            changes.append(f"{key} was {old['path'] if old else 'not set'}, now {new['path'] if new else 'not set'}")
        elif old["sha256"] != new["sha256"]:
            moved = f" (was {old['path']})" if old["path"] != new["path"] else ""
            changes.append(f"{key}={new['path']}{moved} has other content: {old['bytes']} -> {new['bytes']} bytes, "
                           f"sha256 {old['sha256'][:12]} -> {new['sha256'][:12]}")
    return changes


