"""Checkpoints: sharded, atomic, verified, exactly resumable; the newest complete one is found again.

Layout of one checkpoint (`<run_dir>/checkpoints/step_000300/`):
    state/              the engine's sharded training state, written by every rank: trainable
                        weights, optimizer, LR schedule (torch.distributed.checkpoint for DDP and
                        FSDP, DeepSpeed's own files for ZeRO); see `Engine.save_state`
    rng/rank_00000.safetensors   each rank's RNG states (dropout streams)
    trainer_state.json  step and loop counters, data position (in rows, so it reshards), world size
    model/              Hugging Face format for evaluation and export: full weights as safetensors
                        or the PEFT adapter, gathered on rank 0
    tokenizer/          the tokenizer the run trained with
    meta.json           step, technique, the run's config with secrets redacted
    MANIFEST.json       size and sha256 of every file above
    COMMITTED           written last

Writing (`save_checkpoint`, every rank): everything goes into `step_000300.tmp/`; the ranks hash
the files (each a share), rank 0 writes the manifest, the commit marker, renames the directory
into place and points `latest` at it. A crash at any instant leaves either a `.tmp` directory
(ignored and replaced by the next save) or a complete checkpoint; the previous checkpoint is
never touched. Retention (`checkpoint.keep_last`) runs only after the new one is committed and
never deletes it, nor the best one. The best one (`checkpoints/best.json`): the checkpoint of the
lowest periodic eval loss so far, saved at that eval when early stopping or `checkpoint.keep_best`
is on (train.py); when the run ends having stopped early, or with keep_best, best.json says
`"default": true` and `resolve_checkpoint` (evaluate, export) uses it for a run directory, saying
so. Resuming always continues from the newest. With `checkpoint.async_save` (DDP/FSDP) the engine state is staged in host
memory and written by a background thread; the trainer commits it at the first step boundary
where every rank's write is done (and always before the next save and at the end). A failed write
ends in a CheckpointError on every rank that names its real cause (`_fail`): a full disk or quota
(with what to do), the `.tmp` directory removed or renamed under the save (another process writing
the same run directory: two copies of the run), or any other error's own text; only the unfinished
`.tmp` directory is removed, and only when it is still this save's. Ctrl-C during a save stays an
interrupt (`SaveInterrupted`: exit 130) and says that nothing was committed.

Reading (`find_resumable`, every rank): candidates newest first; each is verified against its
manifest (sizes, sha256, no unlisted file a loader would read; the ranks share the hashing) and its
pickles are scanned (`distft.checkpoint.safe_load.scan_file`) before anything is loaded. A damaged one is set
aside under `step_XXXXXX.damaged` with a message naming the bad file, and the previous one is tried.
A file added after the commit that no loader reads (a report, notes, an editor backup) is named in
a warning and ignored: it cannot change what is loaded, and discarding the checkpoint for it
would cost every step since the one before. Nothing distft runs writes into a committed
checkpoint (`python -m distft.evaluate` writes under `<run_dir>/evals/`). The checkpoint directory
must be on a filesystem every rank sees (as on any cluster).

Safe loading (`distft.checkpoint.safe_load`): the only pickles in a checkpoint are DCP's `.metadata` and
DeepSpeed's `.pt` files. Before any is opened, every one is scanned, read as its loader reads it,
for the globals it would import (an exact allow-list of tensor and metadata types); the loads
themselves go through the same allow-list. Weights load from safetensors; our own state is JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

from distft import dist, faults
from distft.checkpoint.safe_load import pickle_kind, scan_file
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
    read_text,
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
            hashes = _hash_files(tmp, _files(tmp)[info.rank :: info.world_size], sync=True)
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


def _files(directory: str) -> list[str]:
    """Every file under `directory`, relative and sorted, manifest and commit marker excluded."""
    found = []
    for parent, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), directory)
            if rel not in (MANIFEST, COMMITTED):
                found.append(rel)
    return sorted(found)


def _special_files(directory: str) -> list[tuple[str, str]]:
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


def _hash_files(directory: str, names: list[str], sync: bool = False) -> dict[str, dict]:
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
                for name, kind in _special_files(checkpoint)]
    present = set(_files(checkpoint))
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
        if _hash_files(checkpoint, [name])[name]["sha256"] != expected.get("sha256"):
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
            os.replace(checkpoint, _free_name(checkpoint + ".damaged"))
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


def _free_name(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate


def set_run_aside(run_dir: str, keep: tuple[str, ...] = ()) -> Optional[str]:
    """`resume=false`: move an existing run directory's contents out of the way, into a new
    directory beside it (never deleted), leaving the names in `keep` (the run's own lock). Rank 0."""
    if not os.path.isdir(run_dir):
        return None
    names = [n for n in sorted(os.listdir(run_dir)) if n not in keep]
    if not names:
        return None
    aside = _free_name(f"{run_dir}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside)
    for name in names:
        os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    return aside


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
RESUMABLE_CHANGES = ("parallel", "launcher", "cluster", "checkpoint", "tracking", "run", "eval", "resume", "plan",
                     "train.micro_batch_size", "train.log_every", "train.device", "train.eval_every",
                     "train.eval_max_batches", "train.nonfinite", "train.max_nonfinite_steps")


def resume_conflicts(cfg: Config, run_dir: str) -> list[str]:
    """Settings in which `cfg` differs from the run its newest checkpoint in `run_dir` belongs to
    (`key: then -> now`), beyond RESUMABLE_CHANGES. Empty when there is nothing to resume."""
    from distft.tracking import flatten

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
    from distft.engines import state_format

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


def read_meta(checkpoint: str) -> dict:
    return read_json(os.path.join(checkpoint, "meta.json"))


def read_trainer_state(checkpoint: str) -> dict:
    return read_json(os.path.join(checkpoint, TRAINER_STATE))
