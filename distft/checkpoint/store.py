"""Writing checkpoints: the layout, the atomic save (every rank's share, one commit), retention,
best.json and the RNG files. What a checkpoint holds and why it is written so: README.md here.

`save_checkpoint` stages everything in `step_XXXXXX.tmp/`, the ranks hash a share of the files
each, rank 0 writes MANIFEST.json, then COMMITTED, renames the directory into place and points
`latest` at it; a crash at any instant leaves a `.tmp` directory (replaced by the next save) or a
complete checkpoint. A failed write is one CheckpointError naming its real cause (`_fail`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from distft import dist, faults
from distft.config import Config, to_dict
from distft.errors import CheckpointError, OutputError, SaveInterrupted, UnsafePathError
from distft.files import (
    describe,
    file_kind,
    fsync_dir,
    is_disk_full,
    make_dirs,
    open_regular,
    read_json,
    remove_tree,
    write_json,
    write_text,
)

log = logging.getLogger("distft")

COMMITTED = "COMMITTED"
MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
STATE_DIR = "state"
RNG_DIR = "rng"
LATEST = "latest"
BEST = "best.json"  # checkpoints/best.json: the checkpoint of the best periodic eval loss (read_best)


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def committed_checkpoints(run_dir: str) -> list[str]:
    """Committed checkpoint directories of a run, oldest first (unverified)."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and "." not in n)
    return [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n, COMMITTED))]


# ------------------------------------------------------------------------------------ saving


@dataclass
class PendingCheckpoint:
    """A checkpoint written except for its engine state, which a background thread is still
    writing (`checkpoint.async_save`); `commit_checkpoint` finishes it."""

    run_dir: str
    step: int
    tmp: str
    final: str
    keep_last: int
    future: Any = None  # the state write: a Future, or None when it was written synchronously
    best_eval_loss: Optional[float] = None  # set when this step's eval loss is the run's best so far

    def written(self) -> bool:
        """This rank's share is on disk (or failed): the commit will not wait."""
        return self.future is None or self.future.done()


def save_checkpoint(
    run_dir: str, step: int, engine, tokenizer, cfg: Config, trainer_state: dict, weights: Optional[dict],
    background: bool = False,
):
    """Every rank: write the checkpoint of `step` and commit it. Returns its directory.

    `weights`: the full state dict gathered from a sharded engine on rank 0 (None: the model
    holds full weights), for the Hugging Face copy under model/.

    `background=True` (DCP engines): the engine state is copied to host memory here and written
    by a background thread while training goes on; everything else is written now. Returns a
    PendingCheckpoint, which `commit_checkpoint` commits once the write is done: until then it is
    a `.tmp` directory like any unfinished save.
    """
    info = dist.from_env()
    root = checkpoints_dir(run_dir)
    final = os.path.join(root, step_dir_name(step))
    tmp = final + ".tmp"
    pending = PendingCheckpoint(run_dir, step, tmp, final, cfg.checkpoint.keep_last)
    loop = trainer_state.get("loop") or {}
    if loop.get("best_step") == step:
        pending.best_eval_loss = loop.get("best_eval_loss")
    with _interrupt_named(pending):
        error = None
        if info.is_main:
            try:
                make_dirs(root, run_dir, "the checkpoints directory")  # a planted link there is refused
                remove_tree(tmp)  # what a crashed save left (a link planted there: the link itself)
                os.mkdir(tmp)
            except (OSError, UnsafePathError) as err:
                error = _failure(err, info.rank, tmp)
        errors = [e for e in dist.all_gather_object(error) if e]  # also the barrier: nobody writes before tmp exists
        if errors:
            _fail(pending, errors, info)
        pending = _write(pending, engine, tokenizer, cfg, trainer_state, weights, background, info)
        if pending.future is not None:
            return pending
        return commit_checkpoint(pending)


def _write(pending: PendingCheckpoint, engine, tokenizer, cfg: Config, trainer_state: dict, weights: Optional[dict],
           background: bool, info) -> PendingCheckpoint:
    """Every rank: write its share of the checkpoint into `pending.tmp`; a failure on any rank is
    a CheckpointError on every rank (`_fail`)."""
    step, tmp = pending.step, pending.tmp
    error = None
    try:
        pending.future = engine.save_state(os.path.join(tmp, STATE_DIR), background=background)  # collective
        _save_rng(tmp, info.rank)
        if info.is_main:
            model = engine.unwrapped()
            extra = {"state_dict": weights} if weights is not None else {}
            if hasattr(model, "peft_config"):
                # An adapter never trains the embeddings or the head (vocab.py refuses a resize), and the
                # base is rebuilt to load it: PEFT's "auto" would store the frozen head whenever lm_head is
                # a LoRA target (262 MB per save at 7B).
                extra["save_embedding_layers"] = False
            model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True, **extra)
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            write_json(os.path.join(tmp, TRAINER_STATE), trainer_state, root=pending.run_dir)
            meta = {
                "step": step,
                "technique": cfg.technique.name,
                "experiment": cfg.run.experiment,
                "world_size": info.world_size,
                "parallel": cfg.parallel.strategy,
                "config": to_dict(cfg),
            }
            write_json(os.path.join(tmp, "meta.json"), meta, root=pending.run_dir)
    except BaseException as err:  # DCP's CheckpointException is a BaseException; reported collectively below
        if isinstance(err, SystemExit) or _interrupted(err):
            raise  # DCP wraps a Ctrl-C in its CheckpointException: an interrupt all the same (_interrupt_named)
        error = _failure(err, info.rank, tmp)
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        _fail(pending, errors, info)
    return pending


def commit_checkpoint(pending: PendingCheckpoint) -> str:
    """Every rank: wait for the state write, hash every file (each rank a share), and commit:
    manifest, commit marker, rename into place, `latest`, retention. Returns the directory."""
    with _interrupt_named(pending):
        return _commit(pending, dist.from_env())


def _commit(pending: PendingCheckpoint, info) -> str:
    step, tmp, final, root = pending.step, pending.tmp, pending.final, os.path.dirname(pending.final)
    errors: list[tuple[str, str]] = []
    if pending.future is not None:
        try:
            pending.future.result()
        except BaseException as err:  # noqa: BLE001 - reported collectively below
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            errors = [_failure(err, info.rank, tmp)]
        errors = [e for part in dist.all_gather_object(errors) for e in part]
    if not errors:
        faults.point("after_shards", step)
        try:
            hashes = hash_files(tmp, files_of(tmp)[info.rank :: info.world_size], sync=True)
        except OSError as err:
            hashes, errors = {}, [_failure(err, info.rank, tmp)]
        errors = [e for part in dist.all_gather_object(errors) for e in part]
        merged = {k: v for part in dist.all_gather_object(hashes) for k, v in part.items()}
    if not errors and info.is_main:
        missing = _missing_parts(tmp, info.world_size)
        if missing:  # never commit what another process removed under this save
            errors = [(RACED, f"rank 0: {', '.join(missing)} missing from {tmp} after being written")]
    if not errors and info.is_main:
        try:
            write_json(os.path.join(tmp, MANIFEST), {"format": 1, "step": step, "files": dict(sorted(merged.items()))},
                       root=pending.run_dir)
            faults.point("before_commit", step)
            write_text(os.path.join(tmp, COMMITTED), str(step), root=pending.run_dir)
            if os.path.exists(final):  # the same step saved again: set the old one aside first
                remove_tree(final + ".old")
                os.replace(final, final + ".old")
            os.replace(tmp, final)
            fsync_dir(root)
            remove_tree(final + ".old")
            write_text(os.path.join(root, LATEST), os.path.basename(final) + "\n", root=pending.run_dir)
            if pending.best_eval_loss is not None:
                write_best(pending.run_dir, step, pending.best_eval_loss)
            _prune(pending.run_dir, final, pending.keep_last)
        except (OSError, OutputError) as err:  # write_text's errors are OutputErrors
            errors = [_failure(err, 0, tmp)]
    errors = sorted({tuple(e) for part in dist.all_gather_object(errors) for e in part})  # rank 0's commit, to all
    if errors:
        _fail(pending, errors, info)
    dist.barrier()  # nobody moves on (or resumes, or exits) before the checkpoint is committed
    log.info("checkpoint: %s", final)
    faults.point("after_save", step)
    return final


# What made a save fail, as `_failure` sorts it (a rank's (kind, line) pair; the first kind of
# this order among the ranks' decides the advice).
DISK_FULL, RACED, OTHER = "disk full", "raced", "other"


def _failure(err: BaseException, rank: int, tmp: str) -> tuple[str, str]:
    """(kind, "rank R: <cause>") for a failed write of the save into `tmp`. Raced: something in
    `tmp` vanished (FileNotFoundError) or reappeared (FileExistsError) under the save, which only
    another process writing the same run directory does; safetensors reports errors as text."""
    cause = _root_exception(err)
    text = f"rank {rank}: {describe(cause)}"
    if is_disk_full(err) or is_disk_full(cause):
        return DISK_FULL, text
    paths = [str(getattr(cause, name, None) or "") for name in ("filename", "filename2")]
    if isinstance(cause, (FileNotFoundError, FileExistsError)) and any(p.startswith(tmp) for p in paths if p):
        return RACED, text
    if "kind: NotFound" in str(cause):  # safetensors' text: the directories it writes into were this save's
        return RACED, text
    return OTHER, text


def _fail(pending: PendingCheckpoint, errors: list[tuple[str, str]], info) -> None:
    """A failed save, on every rank: remove the unfinished directory (unless another process
    took it over), raise one error that names the real cause and what to do about it."""
    kinds = {kind for kind, _ in errors}
    kind = next(k for k in (DISK_FULL, RACED, OTHER) if k in kinds)
    first = next(text for k, text in errors if k == kind)
    if info.is_main and kind != RACED:  # a raced tmp directory is the other process's now
        remove_tree(pending.tmp)
    previous = committed_checkpoints(pending.run_dir)
    done = (f"nothing was committed and earlier checkpoints are untouched (newest: "
            f"{previous[-1] if previous else 'none'})")
    head = f"saving the checkpoint of step {pending.step} failed ({first})"
    if kind == DISK_FULL:
        raise CheckpointError(f"{head}: the disk (or quota) is full; {done}. Free disk space (or point run.root at "
                              "another disk), then rerun the same command to resume")
    if kind == RACED:
        raise CheckpointError(
            f"{head}: {os.path.basename(pending.tmp)} was removed or renamed while it was written, so another process "
            f"is probably writing this run directory ({os.path.dirname(os.path.dirname(pending.tmp))}): two copies of "
            f"this run? {done[0].upper()}{done[1:]}. Stop the other copy, then rerun the same command to resume")
    raise CheckpointError(f"{head}; {done}")


def _root_exception(err: BaseException) -> BaseException:
    """The error under DCP's CheckpointException (which carries every rank's exception and
    traceback) or under a chain of re-raises (an OutputError's OSError)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first
    seen = 0
    while err.__cause__ is not None and seen < 10:
        err, seen = err.__cause__, seen + 1
    return err


def _interrupted(err: BaseException) -> bool:
    """Whether `err` is a Ctrl-C or an error raised because of one: DCP's CheckpointException
    holds each rank's error, and torch.save's writer, interrupted mid-file, raises a RuntimeError
    ("unexpected pos") while the KeyboardInterrupt is being handled (its __context__)."""
    pending: list[Optional[BaseException]] = [err]
    seen = 0
    while pending and seen < 32:
        current = pending.pop()
        if current is None:
            continue
        seen += 1
        if isinstance(current, KeyboardInterrupt):
            return True
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [v[0] if isinstance(v, tuple) else v for v in failures.values()]
        pending += [current.__cause__, current.__context__]
    return False


@contextlib.contextmanager
def _interrupt_named(pending: PendingCheckpoint) -> Iterator[None]:
    """Ctrl-C anywhere in a save (DCP wraps it in its CheckpointException) becomes a
    SaveInterrupted, still a KeyboardInterrupt (exit 130), whose message says what was committed.
    The unfinished `.tmp` directory is left for the next save to replace: a Ctrl-C is answered
    at once, not after removing a large directory."""
    try:
        yield
    except SaveInterrupted:
        raise
    except BaseException as err:
        if not _interrupted(err):
            raise
        if os.path.exists(os.path.join(pending.final, COMMITTED)) and not os.path.exists(pending.tmp):
            raise SaveInterrupted(f"interrupted (Ctrl-C) right after the checkpoint of step {pending.step} was "
                                  f"committed: {pending.final} is complete") from None
        previous = committed_checkpoints(pending.run_dir)
        raise SaveInterrupted(
            f"interrupted (Ctrl-C) while saving step {pending.step}; nothing committed, earlier checkpoints untouched "
            f"(newest: {previous[-1] if previous else 'none'}); rerun the same command to resume") from None


def _missing_parts(tmp: str, world_size: int) -> list[str]:
    """The parts every checkpoint has that `tmp` lacks: each was written by this save, so a
    missing one was removed under it (the manifest lists only what is there, so without this a
    raced save could commit a checkpoint without its training state)."""
    parts = [STATE_DIR, "model", "tokenizer", TRAINER_STATE, "meta.json"]
    parts += [os.path.join(RNG_DIR, f"rank_{rank:05d}.safetensors") for rank in range(world_size)]
    return [part for part in parts if not os.path.exists(os.path.join(tmp, part))]


def _prune(run_dir: str, newest: str, keep_last: int) -> None:
    """Keep the `keep_last` newest committed checkpoints; `newest` (just committed) and the best
    one (best.json) always stay."""
    if keep_last <= 0:
        return
    best = read_best(run_dir)
    for old in committed_checkpoints(run_dir)[:-keep_last]:
        if old != newest and (best is None or old != best["path"]):
            remove_tree(old)


def write_best(run_dir: str, step: int, eval_loss: float, default: bool = False, why: str = "") -> None:
    """Rank 0: point checkpoints/best.json at the committed checkpoint of `step`, the run's best
    periodic eval loss; `default`: evaluate and export use it for the run directory (`why` says why)."""
    record = {"checkpoint": step_dir_name(step), "step": step, "eval_loss": eval_loss, "default": default}
    if why:
        record["why"] = why
    write_json(os.path.join(checkpoints_dir(run_dir), BEST), record, what="the best checkpoint's pointer", root=run_dir)


def read_best(run_dir: str) -> Optional[dict]:
    """checkpoints/best.json with `path` added, or None: no best recorded, an unreadable pointer,
    or one whose checkpoint is no longer committed."""
    try:
        record = read_json(os.path.join(checkpoints_dir(run_dir), BEST), max_bytes=1 << 16)
        path = os.path.join(checkpoints_dir(run_dir), record["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if os.path.basename(path) != record["checkpoint"] or not os.path.exists(os.path.join(path, COMMITTED)):
        return None
    return {**record, "path": path}


def _save_rng(tmp: str, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    states = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    make_dirs(os.path.join(tmp, RNG_DIR), tmp)
    save_file(states, os.path.join(tmp, RNG_DIR, f"rank_{rank:05d}.safetensors"))


def load_rng(checkpoint: str, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank (it was
    saved on fewer ranks)."""
    import torch
    from safetensors.torch import load_file

    path = os.path.join(checkpoint, RNG_DIR, f"rank_{rank:05d}.safetensors")
    if not os.path.exists(path):
        return False
    states = load_file(path)
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    return True


def files_of(directory: str) -> list[str]:
    """Every file under `directory`, relative and sorted, manifest and commit marker excluded."""
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), directory)
            if rel not in (MANIFEST, COMMITTED):
                found.append(rel)
    return sorted(found)


def special_files(directory: str) -> list[tuple[str, str]]:
    """(relative name, what it is) of everything under `directory` that is neither a regular file
    nor a directory: links (to files or directories), pipes, devices, sockets. distft never writes
    them into a checkpoint, and reading one could hang (a FIFO), never end (a link to /dev/zero)
    or read outside the checkpoint."""
    found = []
    for parent, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(parent, name)
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or stat.S_ISLNK(mode):
                found.append((os.path.relpath(path, directory), file_kind(mode)))
    return sorted(found)


def hash_files(directory: str, names: list[str], sync: bool = False) -> dict[str, dict]:
    """Size and sha256 of each file; `sync`: also flush it to disk (a save does, before it commits:
    not every library fsyncs what it writes). Only regular files are opened (`open_regular`)."""
    out = {}
    for name in names:
        digest = hashlib.sha256()
        size = 0
        with open_regular(os.path.join(directory, name), "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
            if sync:
                os.fsync(f.fileno())
        out[name] = {"size": size, "sha256": digest.hexdigest()}
    return out


# What the loaders read: the engine state, RNG, model and tokenizer folders, the pickles wherever
# they are, and our two top-level JSON files. An unlisted file among these could change what is
# loaded, so it makes a checkpoint damaged; any other unlisted file is ignored with a warning.

def free_name(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate




def read_meta(checkpoint: str) -> dict:
    return read_json(os.path.join(checkpoint, "meta.json"))


def read_trainer_state(checkpoint: str) -> dict:
    return read_json(os.path.join(checkpoint, TRAINER_STATE))
