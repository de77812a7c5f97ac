"""The tokenized-data cache: `prepare_data`'s result, built once per key, memory-mapped by every rank.

Without it every rank of every run (and rerun, requeue, sweep point) loaded, cleaned and
tokenized the whole dataset and held it as Python lists. With it:

- **The key** is a sha256 over everything that decides the samples: the data files' content
  (`sources.data_fingerprint`: bytes, not paths or mtimes, so one changed byte is a new key), the
  tokenizer (its whole `tokenizer.json`, special tokens and the chat template in use), every data
  setting that changes tokens or the split (all of `data.*` except the order, packing and cache
  settings: `ORDER_ONLY`), the augmentation functions' source files, the versions of `tokenizers`
  and `transformers`, and the source of distft's own data modules (`CODE`), so a code change that
  could change tokens can never reuse an old cache.
- **Where**: `data.cache_dir`, by default `<run.root>/data-cache`, next to the run directories:
  on a cluster that is the shared filesystem every rank already writes checkpoints to.
  Decision: the cache must be on a filesystem every rank sees; global rank 0 builds it and the
  others wait (a node-local cache would be built once per node for no gain: the page cache
  already shares one copy per machine). A rank that sees neither the cache nor a build under way
  for `NO_BUILDER_S` says the directory is not shared.
- **Built once**: rank 0 takes `<key>.lock` (distft/runlock.py's lock: pid, host, SLURM job,
  heartbeat; a dead builder's lock is taken over), so two jobs or sweep points with the same key
  build it once while the other waits. The build writes into `<key>.tmp-<host>-<pid>`, fsyncs,
  writes `manifest.json` last and renames the directory to `<key>`: a killed build leaves only a
  tmp directory, removed by the next builder, never a half cache. Ranks that wait poll for the
  manifest with their own timeout (`data.cache_wait_s`) before any collective, so a long build
  trips no collective timeout.
- **Verified** on every load: the manifest's key and format, each array file's size, and the
  offsets' consistency. A damaged cache is moved aside (`<key>.damaged-<time>`) and rebuilt.
- **Read** as memory maps (`distft/samples.py`): a rank's memory for the data is its index arrays.

`python -m distft.data <overrides>` builds (or finds) the same cache ahead of a job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from typing import Optional

import numpy as np

from distft.config import DataConfig
from distft.errors import DataError

log = logging.getLogger("distft")

FORMAT = 1
MANIFEST = "manifest.json"
# data.* settings that change only the order or the batching of samples, or where the cache is.
ORDER_ONLY = ("name", "shuffle", "packing", "pack_strategy", "cache", "cache_dir", "cache_wait_s", "num_proc")
# distft's modules that turn rows into samples: their source is part of the key.
CODE = ("data.py", "encoding.py", "samples.py", "sources.py", "synthetic.py", "templates.py",
        "datacache.py")
POLL_S = 0.2  # cheap: one stat of the manifest
NO_BUILDER_S = 300.0  # a waiting rank that sees neither a cache nor its build for this long gives up


def default_dir(run_root: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(run_root)), "data-cache")


def cache_dir(cfg: DataConfig, run_root: str) -> str:
    return os.path.abspath(os.path.expanduser(cfg.cache_dir)) if cfg.cache_dir else default_dir(run_root)


# ------------------------------------------------------------------------------------------ key


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its serialized pipeline (vocab, merges, normalizer,
    pre-tokenizer, added tokens), its special tokens and chat template, its class."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode())
    special = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                                "unk_token_id")}
    digest.update(json.dumps([type(tokenizer).__name__, special, str(tokenizer.special_tokens_map),
                              getattr(tokenizer, "chat_template", None)], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _file_sha256(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _augment_sources(cfg: DataConfig) -> dict:
    """{target: sha256 of its module's file}: a changed augmentation function is a new key."""
    import importlib
    import inspect

    found = {}
    for spec in cfg.augment.functions:
        target = spec if isinstance(spec, str) else dict(spec).get("_target_")
        if not isinstance(target, str):
            continue
        try:
            module = importlib.import_module(target.rpartition(".")[0])
            found[target] = _file_sha256(inspect.getsourcefile(module) or "")
        except (ImportError, TypeError, ValueError):
            found[target] = None  # prepare_data names the problem
    return found


def key_inputs(cfg: DataConfig, tokenizer, seed: int, fingerprint: dict) -> dict:
    """Everything the cache key covers (see the module docstring), as plain JSON."""
    import tokenizers
    import transformers

    here = os.path.dirname(os.path.abspath(__file__))
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ORDER_ONLY}
    return {
        "format": FORMAT,
        "data_files": fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
        "augment_seed": seed if (cfg.augment.functions or cfg.augment.template_variation > 0) else None,
        "augment_code": _augment_sources(cfg),
        "versions": {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__},
        "code": {name: _file_sha256(os.path.join(here, name)) for name in CODE},
    }


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------- read/write


def _load(path: str, key: str):
    """The PreparedData cached at `path`; None when there is none yet; ValueError when it is damaged."""
    from distft.datareport import DataReport, PreparedData
    from distft.samples import ARRAYS, TokenSamples

    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ValueError(f"its {MANIFEST} cannot be read ({err})") from None
    if manifest.get("format") != FORMAT or manifest.get("key") != key:
        raise ValueError(f"its manifest is for key {manifest.get('key')} format {manifest.get('format')}")
    for name in ("train", "eval"):
        for array in ARRAYS:
            file = os.path.join(path, f"{name}.{array}.npy")
            want = manifest["sizes"][name][array]
            size = os.path.getsize(file) if os.path.exists(file) else None
            if size != want:
                raise ValueError(f"{name}.{array}.npy is {size} bytes, the manifest says {want}")
    train, held_out = TokenSamples.load(path, "train"), TokenSamples.load(path, "eval")
    if len(train) != manifest["train_samples"] or len(held_out) != manifest["eval_samples"]:
        raise ValueError("its sample counts differ from the manifest's")
    with open(os.path.join(path, "eval_rows.json")) as f:
        eval_rows = json.load(f)
    report = DataReport(**manifest["report"])
    train_sources = np.load(os.path.join(path, "train.sources.npy")) if report.sources else None
    if train_sources is not None and len(train_sources) != len(train):
        raise ValueError("train.sources.npy does not give every training sample a source")
    return PreparedData(train, held_out, eval_rows, report, manifest["stop_ids"], train_sources,
                        manifest.get("packed_as"))


def _write(data, path: str, key: str, inputs: dict, seconds: float) -> None:
    """Write `data` into the new directory `path` (arrays first, the manifest last, all fsynced)."""
    from distft import faults
    from distft.files import fsync_dir

    os.makedirs(path)
    sizes = {"train": data.train.save(path, "train")}
    if data.train_sources is not None:
        np.save(os.path.join(path, "train.sources.npy"), data.train_sources)
    faults.point("cache_write", 0)
    sizes["eval"] = data.eval.save(path, "eval")
    with open(os.path.join(path, "eval_rows.json"), "w") as f:
        json.dump(data.eval_rows, f)
        f.flush()
        os.fsync(f.fileno())
    manifest = {"format": FORMAT, "key": key, "inputs": inputs, "sizes": sizes, "train_samples": len(data.train),
                "eval_samples": len(data.eval), "report": data.report.as_dict(), "stop_ids": list(data.stop_ids), "packed_as": data.packed_as,
                "built": {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time(), "seconds": seconds}}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path)


def _remove_leftovers(root: str, key: str) -> None:
    """Tmp directories of earlier builds of `key` (killed ones; the caller holds the build lock)."""
    for name in os.listdir(root):
        if name.startswith(f"{key}.tmp-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _set_aside(path: str, why: str) -> None:
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log.warning("data cache %s is damaged (%s): moved to %s and rebuilt", path, why, aside)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------------- the protocol


@dataclasses.dataclass
class CacheResult:
    data: object  # PreparedData
    path: Optional[str]  # None: data.cache=false
    built: bool  # this process built it (False: found it, or waited for another)
    seconds: float  # what preparing the data took here


def prepared(cfg: DataConfig, tokenizer, seed: int, run_root: str, build, rank: int = 0) -> CacheResult:
    """The run's PreparedData, through the cache (see the module docstring): rank 0 finds or builds
    it, the other ranks find it or wait for it. `build(cfg, tokenizer, seed)` -> PreparedData
    (`distft.data.prepare_data`, passed in: distft.data's CLI calls this module). data.cache=false:
    built here, in memory, every time."""

    started = time.monotonic()
    if not cfg.cache:
        return CacheResult(build(cfg, tokenizer, seed), None, True, time.monotonic() - started)
    inputs, key, path = _locate(cfg, tokenizer, seed, run_root)
    root = os.path.dirname(path)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.cache_dir={root} cannot be created ({err.strerror or err}); set data.cache_dir to a "
                        "writable directory every rank sees, or data.cache=false") from None
    if rank != 0:
        return CacheResult(_wait(path, key, cfg, rank), path, False, time.monotonic() - started)
    result = _find_or_build(cfg, tokenizer, seed, build, path, key, inputs, started)
    # The packing figures depend on data.packing / pack_strategy, which the key leaves out.
    _recount(result.data, cfg)
    return result


def _locate(cfg: DataConfig, tokenizer, seed: int, run_root: str) -> tuple[dict, str, str]:
    """(key inputs, key, cache path) of this config: the chat template in use is installed first,
    since it is part of the key."""
    from distft.sources import data_fingerprint
    from distft.templates import use_chat_template

    use_chat_template(tokenizer, cfg.chat_template)
    inputs = key_inputs(cfg, tokenizer, seed, data_fingerprint(cfg))
    key = cache_key(inputs)
    return inputs, key, os.path.join(cache_dir(cfg, run_root), key)


def _recount(data, cfg: DataConfig) -> None:
    """The report's packing figures for this config's packing, when the cache was built with another."""
    from distft.datareport import count_sequences

    if data.packed_as != [cfg.packing, cfg.pack_strategy]:
        count_sequences(data.report, cfg, data.train, data.eval)
        data.packed_as = [cfg.packing, cfg.pack_strategy]


def find(cfg: DataConfig, tokenizer, seed: int, run_root: str) -> Optional[CacheResult]:
    """The cache of this config if it is there and sound, else None; nothing is built or locked
    (the planner's exact epoch)."""

    if not cfg.cache:
        return None
    started = time.monotonic()
    _, key, path = _locate(cfg, tokenizer, seed, run_root)
    try:
        found = _load(path, key)
    except (ValueError, OSError):
        return None
    if found is None:
        return None
    _recount(found, cfg)
    return CacheResult(found, path, False, time.monotonic() - started)


def _find_or_build(cfg, tokenizer, seed, build, path, key, inputs, started) -> CacheResult:
    from distft.runlock import try_take

    lock_path = f"{path}.lock"
    waited_for = None
    while True:
        try:
            found = _load(path, key)
        except ValueError as err:
            found = None
            lock, _ = try_take(lock_path, f"data cache {path}")
            if lock is None:
                time.sleep(POLL_S)  # another builder holds it: it sets the damaged cache aside
                continue
            try:
                _set_aside(path, str(err))
            finally:
                lock.release()
            continue
        if found is not None:
            return CacheResult(found, path, False, time.monotonic() - started)
        lock, holder = try_take(lock_path, f"data cache {path}")
        if lock is not None:
            break
        if waited_for != holder:
            log.info("data cache %s is being built by %s: waiting for it", path, holder.describe())
            waited_for = holder
        _check_timeout(started, cfg, f"{holder.describe()} to build the data cache {path}", 0)
        time.sleep(POLL_S)
    try:
        found = _load(path, key) if os.path.exists(path) else None  # built while the lock was being taken
        if found is not None:
            return CacheResult(found, path, False, time.monotonic() - started)
        _remove_leftovers(os.path.dirname(path), key)
        data = build(cfg, tokenizer, seed)
        seconds = time.monotonic() - started
        tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
        from distft import faults
        from distft.files import fsync_dir, output_error

        try:
            _write(data, tmp, key, inputs, seconds)
            faults.point("cache_publish", 0)
            os.rename(tmp, path)
            fsync_dir(os.path.dirname(path))
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise output_error(tmp, err, "the data cache") from None
    finally:
        lock.release()
    # Train from the memory maps, as every other rank does, not from the lists just built.
    return CacheResult(_load(path, key), path, True, time.monotonic() - started)


def _check_timeout(started: float, cfg: DataConfig, what: str, rank: int) -> None:
    waited = time.monotonic() - started
    if waited > cfg.cache_wait_s:
        raise DataError(
            f"rank {rank} waited {waited:.0f} s for {what}, longer than data.cache_wait_s={cfg.cache_wait_s}; "
            "look at that process's log; prepare the data ahead of the job with `python -m distft.data <the same "
            "overrides>`, or raise data.cache_wait_s")


def _wait(path: str, key: str, cfg: DataConfig, rank: int):
    """A rank other than 0: the cache at `path` once rank 0 (or another job) has built it."""
    started = last_note = time.monotonic()
    seen_builder = False
    while True:
        try:
            found = _load(path, key)
        except ValueError:
            found = None  # rank 0 sets it aside and rebuilds it
        if found is not None:
            return found
        root = os.path.dirname(path)
        building = os.path.exists(f"{path}.lock") or any(n.startswith(f"{key}.tmp-") for n in _listdir(root))
        seen_builder = seen_builder or building
        now = time.monotonic()
        if not seen_builder and now - started > NO_BUILDER_S:
            raise DataError(
                f"rank {rank} on {socket.gethostname()} has seen no data cache at {path} and no build of it for "
                f"{NO_BUILDER_S:.0f} s; rank 0 builds it, so data.cache_dir={root} must be a directory every rank "
                "sees (a shared filesystem, like run.root): set data.cache_dir to one, or data.cache=false")
        if now - last_note > 60:
            print(f"distft: rank {rank}: waiting for rank 0 to build the data cache {path} "
                  f"({now - started:.0f} s)", file=sys.stderr, flush=True)
            last_note = now
        _check_timeout(started, cfg, f"rank 0 to build the data cache {path}", rank)
        time.sleep(POLL_S)


def _listdir(root: str) -> list[str]:
    try:
        return os.listdir(root)
    except OSError:
        return []
