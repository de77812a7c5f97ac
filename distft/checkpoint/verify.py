"""Reading checkpoints: every file checked against the manifest and every pickle scanned before
anything is loaded; the newest sound one found again (README.md here, "Reading").

`find_resumable` (every rank, training) sets damaged checkpoints aside as `*.damaged` and falls
back to an earlier one; `resolve_checkpoint` (evaluate, export, chat, compare) reads a run or a
checkpoint and changes nothing in it.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from distft import dist
from distft.checkpoint.safe_load import pickle_kind, scan_file
from distft.checkpoint.store import (
    COMMITTED,
    LATEST,
    MANIFEST,
    RNG_DIR,
    STATE_DIR,
    TRAINER_STATE,
    checkpoints_dir,
    committed_checkpoints,
    files_of,
    free_name,
    hash_files,
    read_best,
    special_files,
)
from distft.errors import CheckpointError
from distft.files import read_json, read_text

log = logging.getLogger("distft")

LOADED_DIRS = (STATE_DIR, RNG_DIR, "model", "tokenizer")
LOADED_FILES = (TRAINER_STATE, "meta.json")

# (checkpoint, file) pairs already warned about in this process: evaluate and export verify the
# same checkpoint twice (choosing it, then loading it), and one warning per file is enough.
_warned_unlisted: set[tuple[str, str]] = set()


def read_by_a_loader(name: str) -> bool:
    """Whether a loader could read the checkpoint file `name` (relative to the checkpoint)."""
    return bool(pickle_kind(name)) or name in LOADED_FILES or name.split(os.sep)[0] in LOADED_DIRS


def verify(checkpoint: str, rank: int = 0, world_size: int = 1, ignored: Optional[list[str]] = None) -> list[str]:
    """Problems of `checkpoint` this rank finds (empty: sound). With several ranks each checks a
    share of the files; `verify_collectively` merges the shares.

    Files missing from the manifest are rank 0's share. One a loader could read (`read_by_a_loader`)
    is a problem; any other is not, and is reported as "<name>: not in the manifest (added after
    the save); ignored": appended to `ignored` when the caller passes a list (it prints the line
    itself), otherwise logged at WARNING on the "distft" logger, once per file and process."""
    manifest_path = os.path.join(checkpoint, MANIFEST)
    if not os.path.exists(os.path.join(checkpoint, COMMITTED)):
        return [f"{COMMITTED} is missing (the save did not finish)"]
    try:
        files = read_json(manifest_path)["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError("its files are not a table of sizes and hashes")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} is missing or unreadable ({type(err).__name__}: {err})"]
    problems = [f"{name}: {kind}, where a checkpoint holds only regular files (refused, never read)"
                for name, kind in special_files(checkpoint)]
    present = set(files_of(checkpoint))
    if rank == 0:
        for name in sorted(present - set(files)):
            if read_by_a_loader(name):
                problems.append(f"{name}: not in the manifest (added after the save), and a loader would read it")
                continue
            note = f"{name}: not in the manifest (added after the save); ignored"
            key = (os.path.realpath(checkpoint), name)
            if ignored is not None:
                ignored.append(note)
            elif key not in _warned_unlisted:
                log.warning("checkpoint %s: %s", checkpoint, note)
            _warned_unlisted.add(key)
    for name in sorted(files)[rank::world_size]:
        expected = files[name]
        path = os.path.join(checkpoint, name)
        if name not in present:
            problems.append(f"{name}: missing")
            continue
        size = os.lstat(path).st_size
        if size != expected.get("size"):
            problems.append(f"{name}: {size} bytes, the manifest says {expected.get('size')} (truncated or rewritten)")
            continue
        if hash_files(checkpoint, [name])[name]["sha256"] != expected.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (corrupted)")
            continue
        if pickle_kind(name):
            problems += [f"{name}: {p}" for p in scan_file(path)]
    return problems


def verify_collectively(checkpoint: str) -> list[str]:
    """Every rank: the problems of `checkpoint` found by all ranks together (the same list on each)."""
    info = dist.from_env()
    problems = verify(checkpoint, info.rank, info.world_size)
    return sorted(p for part in dist.all_gather_object(problems) for p in part)


def find_resumable(run_dir: str) -> Optional[str]:
    """Every rank: the newest checkpoint of `run_dir` that verifies, or None when there is none.

    Damaged checkpoints are set aside (renamed `*.damaged`, never deleted) with a warning naming
    the bad file; a run whose checkpoints are all damaged is a CheckpointError."""
    info = dist.from_env()
    _check_latest(run_dir)
    candidates = committed_checkpoints(run_dir)
    damaged = []
    for checkpoint in reversed(candidates):
        problems = verify_collectively(checkpoint)
        if not problems:
            if damaged:
                log.warning("resuming from %s instead", os.path.basename(checkpoint))
            return checkpoint
        damaged.append((checkpoint, problems))
        log.warning(
            "checkpoint %s is damaged: %s%s",
            checkpoint,
            "; ".join(problems[:3]),
            f" (and {len(problems) - 3} more)" if len(problems) > 3 else "",
        )
        dist.barrier()
        if info.is_main:
            os.replace(checkpoint, free_name(checkpoint + ".damaged"))
        dist.barrier()
    if damaged:
        checkpoint, problems = damaged[0]
        raise CheckpointError(
            f"no usable checkpoint in {checkpoints_dir(run_dir)}: {os.path.basename(checkpoint)} is damaged "
            f"({problems[0]}) and so is every earlier one; they were kept as *.damaged. Pass resume=false to start "
            "over (the old run is kept aside)"
        )
    return None


def _check_latest(run_dir: str) -> None:
    """`latest` is a convenience for people and scripts; distft finds checkpoints by scanning. A
    `latest` that is empty or names nothing committed is reported and rewritten after the next save."""
    path = os.path.join(checkpoints_dir(run_dir), LATEST)
    if not os.path.exists(path):
        return
    try:
        name = read_text(path, max_bytes=1 << 10).strip()
    except OSError as err:  # a planted FIFO or link: never read, reported like an empty one
        log.warning("%s cannot be read (%s); finding the newest complete checkpoint by scanning instead", path, err)
        return
    if not name or not os.path.exists(os.path.join(checkpoints_dir(run_dir), name, COMMITTED)):
        log.warning(
            "%s is %s; finding the newest complete checkpoint by scanning instead",
            path,
            "empty" if not name else f"naming {name!r}, which is not a complete checkpoint",
        )



def resolve_checkpoint(path: str, announce: bool = False) -> str:
    """A verified checkpoint directory from a checkpoint path or a run directory (its best one when
    the run made it its default, see `read_best`; else its newest sound one). Damaged checkpoints
    are skipped, never moved (reading a run changes nothing in it).

    `announce` (the evaluate and export commands): given a run directory, say on stderr which
    checkpoint is used, and why when newer ones were skipped, every time; and, given either, name
    on stderr each unlisted file `verify` ignored (otherwise that goes to the "distft" logger)."""
    import sys

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a run directory or a checkpoint directory")
    ignored: Optional[list[str]] = [] if announce else None

    def say_ignored(checkpoint: str) -> None:
        for note in ignored or []:
            print(f"distft: warning: checkpoint {checkpoint}: {note}", file=sys.stderr)

    if os.path.exists(os.path.join(path, "meta.json")) or os.path.exists(os.path.join(path, MANIFEST)):
        problems = verify(path, ignored=ignored)
        if problems:
            raise CheckpointError(
                f"{path} is not a usable checkpoint: {problems[0]}; pass an earlier checkpoint or the run directory"
            )
        say_ignored(path)
        return path
    best = read_best(path)
    if best and best.get("default"):
        problems = verify(best["path"], ignored=ignored)
        if not problems:
            if announce:
                newest = committed_checkpoints(path)[-1]
                also = (f"; the newest is {os.path.basename(newest)}: pass {newest} for it"
                        if newest != best["path"] else "")
                print(f"distft: using the best checkpoint {best['path']} (eval loss {best['eval_loss']:.4f} at step "
                      f"{best['step']}{'; ' + best['why'] if best.get('why') else ''}){also}", file=sys.stderr)
                say_ignored(best["path"])
            return best["path"]
        log.warning("the best checkpoint %s is damaged (%s); using the newest sound one", best["path"], problems[0])
    skipped = []
    for checkpoint in reversed(committed_checkpoints(path)):
        if ignored:
            ignored.clear()
        problems = verify(checkpoint, ignored=ignored)
        if not problems:
            if announce:
                why = "; ".join(f"{os.path.basename(c)} is damaged ({p[0]})" for c, p in skipped)
                print(f"distft: using {checkpoint}" + (f", not a newer one: {why}" if why else " (the newest)"),
                      file=sys.stderr)
                say_ignored(checkpoint)
            return checkpoint
        log.warning("skipping damaged checkpoint %s: %s", checkpoint, problems[0])
        skipped.append((checkpoint, problems))
    if skipped:
        checkpoint, problems = skipped[0]
        raise CheckpointError(f"{path} holds no usable checkpoint: {os.path.basename(checkpoint)} is damaged "
                              f"({problems[0]}) and so is every earlier one")
    raise CheckpointError(
        f"{path} holds no complete checkpoint (expected meta.json, or checkpoints/step_*/ in a run directory)"
    )


# What may differ between a run and its resume: where and how it runs, not what it computes.
