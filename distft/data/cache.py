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
  for `NO_BUILDER_S` says the directory is not shared. What the cache holds is untrusted (the
  README's threat model): a cache directory every local user may write is warned about, and
  refused for root (`_check_permissions`).
- **Built once**: rank 0 takes `<key>.lock` (distft/runlock.py's lock: pid, host, SLURM job,
  heartbeat; a dead builder's lock, or one whose heartbeat stopped, is taken over), so two jobs or
  sweep points with the same key build it once while the other waits. The build writes into
  `<key>.tmp-<host>-<pid>`, a directory it creates new (never into a planted link), fsyncs, writes
  `manifest.json` last (each file's size and xxh3 checksum) and renames the directory to `<key>`:
  a killed build leaves only a tmp directory, removed by the next builder, never a half cache.
  Ranks that wait poll for the manifest with their own timeout (`data.cache_wait_s`) before any
  collective, so a long build trips no collective timeout.
- **Verified** on every open, by every rank (`_load`): `<key>` must be a directory, not a link;
  the manifest a regular JSON file with every field of its type, for this key and format; every
  file a regular file (never a link, a FIFO or a device: opened non-blocking) of the manifest's
  size and checksum (xxh3-64: ~0.1 s for a 1M-row cache, bench/RESULTS.md); every token id and
  prompt id within the tokenizer's vocabulary (`len(tokenizer)`), every target flag 0 or 1, the
  offsets non-decreasing. A damaged cache is moved aside (`<key>.damaged-<time>`, a link itself,
  never followed) and rebuilt, with a warning naming the file and what is wrong. The checksums
  catch damage; whoever can write the cache can rewrite its manifest too, which is why the
  directory's permissions and the ids' range are checked as well.
- **Read** as memory maps (`distft/data/samples.py`): a rank's memory for the data is its index arrays.
  The eval rows' text is `eval_rows.json`; their prompt ids are two arrays beside it, checked in
  one pass, not 5M JSON numbers (a 1M-row cache's: 0.7 s to parse, 0.6 s to check one by one).

`python -m distft.data <overrides>` builds (or finds) the same cache ahead of a job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import socket
import stat
import sys
import time
from typing import Optional

import numpy as np

from distft import faults
from distft.config import DataConfig
from distft.data.report import DataReport, PreparedData, count_sequences
from distft.data.samples import ARRAYS, CHECKSUM, TokenSamples, checksum, load_array, save_array, unreadable
from distft.data.sources import data_fingerprint
from distft.data.templates import use_chat_template
from distft.errors import DataError, OutputError
from distft.files import (
    file_kind,
    fsync_dir,
    make_dirs,
    open_regular,
    output_error,
    read_json,
    remove_tree,
    write_bytes,
    write_json,
)
from distft.runlock import try_take

log = logging.getLogger("distft")

FORMAT = 2  # 2: the manifest holds every file's size and checksum ("files")
MANIFEST = "manifest.json"
MANIFEST_MAX_BYTES = 16 << 20  # a manifest is kilobytes; a larger one is not read
EVAL_ROWS = "eval_rows.json"  # the eval rows' text fields; their prompt ids are the two arrays below
PROMPT_IDS, PROMPT_OFFSETS = "eval_rows.prompt_ids.npy", "eval_rows.prompt_offsets.npy"
SOURCES = "train.sources.npy"
# data.* settings that change only the order or the batching of samples, or where the cache is.
ORDER_ONLY = ("name", "shuffle", "packing", "pack_strategy", "cache", "cache_dir", "cache_wait_s", "num_proc")
# distft's modules that turn rows into samples: their source is part of the key.
CODE = ("pipeline.py", "encoding.py", "samples.py", "sources.py", "synthetic.py", "templates.py",
        "cache.py", "preference.py")
REJECTED = ("train_rejected", "eval_rejected")  # objective=dpo: the pairs' rejected answers (PreparedData)
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


def key_inputs(cfg: DataConfig, tokenizer, seed: int, fingerprint: dict, objective: str = "sft") -> dict:
    """Everything the cache key covers (see the module docstring), as plain JSON; `objective`
    dpo: the rows are prepared as preference pairs (a key of their own; sft keys as before)."""
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
        **({"objective": objective} if objective != "sft" else {}),
    }


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------- read/write


def _check_permissions(root: str, rank: int) -> None:
    """A cache directory every local user may write is refused for root and warned about for
    anyone else: whoever can write it can replace the samples a run trains on (and manifest,
    checksums and all). The sticky bit (as on /tmp) does not help: it stops others from renaming
    our entries, not from creating a key's directory before we build it. Group-writable is left
    alone: a team's shared cache is a group the user chose to trust."""
    try:
        mode = os.stat(root).st_mode
    except OSError:
        return
    if not mode & stat.S_IWOTH:
        return
    message = (f"data cache directory {root} is writable by every user of this machine ({stat.filemode(mode)}): "
               f"anyone could replace the samples a run trains on; make it yours alone with `chmod o-w {root}`, or "
               "set data.cache_dir to a directory only you can write")
    if os.geteuid() == 0:
        raise DataError(message + "; root does not train on data any local user could have replaced")
    if rank == 0:
        log.warning("%s", message)


def _load(path: str, key: str, vocab_size: int) -> Optional[tuple]:
    """(the PreparedData cached at `path`, the seconds its checks took: checksums and ids); None
    when there is none yet; ValueError, naming the file and what is wrong, when it is damaged (see
    the module docstring: every check is here)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise ValueError(f"it is a symbolic link (to {_link_target(path)}): a cache is never read through a link")
    if not stat.S_ISDIR(mode):
        raise ValueError(f"it is {file_kind(mode)}, not a directory")
    manifest = _read_manifest(path, key)
    files, report = manifest["files"], manifest["report"]
    # Mapped: each a regular file of its manifest's size, its header checked.
    names = ("train", "eval", *(REJECTED if report.pairs else ()))
    samples = {name: TokenSamples.load(path, name, files) for name in names}
    if len(samples["train"]) != manifest["train_samples"] or len(samples["eval"]) != manifest["eval_samples"]:
        raise ValueError(f"its sample counts differ from its {MANIFEST}'s")
    for name in REJECTED if report.pairs else ():  # pair by pair with the chosen answers
        if len(samples[name]) != len(samples[name.split("_")[0]]):
            raise ValueError(f"{name} has {len(samples[name])} answers for {len(samples[name.split('_')[0]])} pairs")
    contents = {f"{name}.{array}.npy": getattr(found, array) for name, found in samples.items() for array in ARRAYS}
    contents[EVAL_ROWS] = _read_bytes(os.path.join(path, EVAL_ROWS), files[EVAL_ROWS]["bytes"])
    more = {PROMPT_IDS: np.int32, PROMPT_OFFSETS: np.int64, **({SOURCES: np.int32} if report.sources else {})}
    for file, dtype in more.items():
        contents[file] = load_array(os.path.join(path, file), dtype, files[file]["bytes"])
    started = time.monotonic()
    for file, content in contents.items():
        if checksum(content) != files[file][CHECKSUM]:
            raise ValueError(f"{file} does not match its checksum (its content changed after it was written)")
    for name, found in samples.items():
        problem = found.problem(vocab_size)
        if problem:
            raise ValueError(f"{name}.{problem[0]}.npy: {problem[1]}")
    prompt_ids, prompt_offsets = contents[PROMPT_IDS], contents[PROMPT_OFFSETS]
    if len(prompt_ids) and int(prompt_ids.view(np.uint32).max()) >= vocab_size:  # as in TokenSamples.problem
        bad = int(prompt_ids.min()) if int(prompt_ids.min()) < 0 else int(prompt_ids.max())
        raise ValueError(f"{PROMPT_IDS}: prompt id {bad} is outside the tokenizer's vocabulary of {vocab_size} ids")
    if (not len(prompt_offsets) or prompt_offsets[0] != 0 or prompt_offsets[-1] != len(prompt_ids)
            or (len(prompt_offsets) > 1 and int(np.diff(prompt_offsets).min()) < 0)):
        raise ValueError(f"{PROMPT_OFFSETS} does not cut {PROMPT_IDS} into prompts")
    if not all(i < vocab_size for i in manifest["stop_ids"]):
        raise ValueError(f"its {MANIFEST}'s stop_ids {manifest['stop_ids']} are not all in the tokenizer's "
                         f"vocabulary of {vocab_size} ids")
    train_sources = np.array(contents[SOURCES]) if report.sources else None
    if train_sources is not None and len(train_sources) != len(samples["train"]):
        raise ValueError(f"{SOURCES} does not give every training sample a source")
    if train_sources is not None and len(train_sources) and not (
            0 <= train_sources.min() <= train_sources.max() < len(report.sources)):
        raise ValueError(f"{SOURCES} names a source outside the {len(report.sources)} of its report")
    checked = time.monotonic() - started
    eval_rows = _parse_eval_rows(contents[EVAL_ROWS])
    if len(eval_rows) != len(prompt_offsets) - 1:
        raise ValueError(f"{PROMPT_OFFSETS} has {len(prompt_offsets) - 1} prompts for {len(eval_rows)} eval rows")
    every_id, bounds = prompt_ids.tolist(), prompt_offsets.tolist()  # the rows as prepare_data made them, keys in order
    eval_rows = [{"prompt": row.pop("prompt"), "prompt_ids": every_id[start:end], **row}
                 for row, start, end in zip(eval_rows, bounds, bounds[1:])]
    data = PreparedData(samples["train"], samples["eval"], eval_rows, report, manifest["stop_ids"], train_sources,
                        manifest["packed_as"], samples.get("train_rejected"), samples.get("eval_rejected"))
    return data, checked


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _read_manifest(path: str, key: str) -> dict:
    """`path`'s manifest, checked to have every field `_load` reads, of its type (a ValueError
    otherwise); its report as a DataReport."""
    try:
        manifest = read_json(os.path.join(path, MANIFEST), max_bytes=MANIFEST_MAX_BYTES)
    except FileNotFoundError:
        raise ValueError(f"it has no {MANIFEST}") from None
    except OSError as err:  # not a regular file (distft.files.NotAFile), unreadable
        raise ValueError(unreadable(os.path.join(path, MANIFEST), err)) from None
    except ValueError as err:  # not JSON, or nested too deep
        raise ValueError(f"its {MANIFEST} is not JSON ({str(err).replace(path + os.sep, '')})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"its {MANIFEST} is not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("key") != key:
        raise ValueError(f"its {MANIFEST} is for key {manifest.get('key')!r} format {manifest.get('format')!r}")
    files, report = manifest.get("files"), manifest.get("report")
    wanted = [f"{name}.{array}.npy" for name in ("train", "eval") for array in ARRAYS] + [EVAL_ROWS, PROMPT_IDS,
                                                                                          PROMPT_OFFSETS]
    if isinstance(report, dict) and report.get("sources"):
        wanted.append(SOURCES)
    if isinstance(report, dict) and report.get("pairs") is True:
        wanted += [f"{name}.{array}.npy" for name in REJECTED for array in ARRAYS]
    problems = []
    if not isinstance(files, dict):
        problems.append("files")
    else:
        problems += [f"files.{name}" for name in wanted if not (
            isinstance(files.get(name), dict) and _is_count(files[name].get("bytes"))
            and isinstance(files[name].get(CHECKSUM), str))]
    problems += [field for field in ("train_samples", "eval_samples") if not _is_count(manifest.get(field))]
    stop_ids = manifest.get("stop_ids")
    if not (isinstance(stop_ids, list) and all(_is_count(i) for i in stop_ids)):
        problems.append("stop_ids")
    packed_as = manifest.get("packed_as")
    if packed_as is not None and not (isinstance(packed_as, list) and len(packed_as) == 2):
        problems.append("packed_as")
    fields = {f.name: f for f in dataclasses.fields(DataReport)}
    if not isinstance(report, dict) or set(report) - set(fields):
        problems.append("report")
    else:
        blank = DataReport()
        problems += [f"report.{name}" for name, value in report.items() if not _report_value_ok(name, value, blank)]
    if problems:
        raise ValueError(f"its {MANIFEST} lacks, or has the wrong type of, {', '.join(problems)}")
    return {**manifest, "report": DataReport(**report)}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _report_value_ok(name: str, value, blank) -> bool:
    """Whether `value` has the type of DataReport's field `name` (its default's type)."""
    if name == "packing_fill":
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if name == "sources":
        return isinstance(value, list) and all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and _is_count(s.get("samples"))
            and isinstance(s.get("weight"), (int, float)) and not isinstance(s.get("weight"), bool) for s in value)
    if name == "first_dropped":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if isinstance(getattr(blank, name), bool):
        return isinstance(value, bool)
    if name == "formats":
        return isinstance(value, list) and all(
            isinstance(f, dict) and isinstance(f.get("source"), str) and isinstance(f.get("format"), str)
            and _is_count(f.get("rows")) for f in value)
    return _is_count(value) if isinstance(getattr(blank, name), int) else False


def _read_bytes(path: str, size: int) -> bytes:
    try:
        with open_regular(path, "rb", size=size) as f:
            return f.read()
    except OSError as err:
        raise ValueError(unreadable(path, err)) from None


def _parse_eval_rows(raw: bytes) -> list:
    """eval_rows.json's rows, each {prompt, reference, task?} (their prompt ids are arrays: parsing
    5M ids as JSON took 0.6 s of a 1M-row cache's start-up, checking each in Python as long)."""
    try:
        rows = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"{EVAL_ROWS} is not JSON") from None
    if not isinstance(rows, list) or not all(
            isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("reference"), str)
            and isinstance(row.get("task", ""), str) for row in rows):
        raise ValueError(f"{EVAL_ROWS} holds a row that is not {{prompt, reference, task?}}")
    return rows


def _write(data, path: str, key: str, inputs: dict, seconds: float) -> None:
    """Write `data` into the new directory `path` (arrays first, the manifest last, all fsynced;
    every file new, none written through a link: `save_array`, distft.files)."""
    root = os.path.dirname(path)
    os.mkdir(path, 0o755)  # ours, new: fails if anything (a planted link) is there
    files = data.train.save(path, "train")
    if data.train_sources is not None:
        files[SOURCES] = save_array(os.path.join(path, SOURCES), data.train_sources, np.int32)
    faults.point("cache_write", 0)
    files.update(data.eval.save(path, "eval"))
    for name in REJECTED if data.report.pairs else ():
        files.update(getattr(data, name).save(path, name))
    prompts = [row.get("prompt_ids") or [] for row in data.eval_rows]
    offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
    np.cumsum([len(ids) for ids in prompts], out=offsets[1:])
    every_id = np.fromiter(itertools.chain.from_iterable(prompts), dtype=np.int64, count=int(offsets[-1]))
    files[PROMPT_IDS] = save_array(os.path.join(path, PROMPT_IDS), every_id, np.int32)
    files[PROMPT_OFFSETS] = save_array(os.path.join(path, PROMPT_OFFSETS), offsets, np.int64)
    rows = json.dumps([{k: v for k, v in row.items() if k != "prompt_ids"} for row in data.eval_rows]).encode()
    write_bytes(os.path.join(path, EVAL_ROWS), rows, "the data cache's eval rows", root=root)
    files[EVAL_ROWS] = {"bytes": len(rows), CHECKSUM: checksum(rows)}
    manifest = {"format": FORMAT, "key": key, "inputs": inputs, "files": files, "train_samples": len(data.train),
                "eval_samples": len(data.eval), "report": data.report.as_dict(), "stop_ids": list(data.stop_ids),
                "packed_as": data.packed_as,
                "built": {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time(), "seconds": seconds}}
    write_json(os.path.join(path, MANIFEST), manifest, "the data cache's manifest", root=root)
    fsync_dir(path)


def _remove_leftovers(root: str, key: str) -> None:
    """Tmp directories of earlier builds of `key` (killed ones; the caller holds the build lock)."""
    for name in os.listdir(root):
        if name.startswith(f"{key}.tmp-"):
            remove_tree(os.path.join(root, name))


def _set_aside(path: str, why: str) -> None:
    """Rename the damaged `path` (a link: the link itself, never what it names) aside; kept, not
    deleted: it is the user's disk to clean."""
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
    verify_s: float = 0.0  # of `seconds`: the cache's checks (checksums, ids against the vocabulary)


def prepared(cfg: DataConfig, tokenizer, seed: int, run_root: str, build, rank: int = 0,
             objective: str = "sft") -> CacheResult:
    """The run's PreparedData, through the cache (see the module docstring): rank 0 finds or builds
    it, the other ranks find it or wait for it. `build(cfg, tokenizer, seed)` -> PreparedData
    (`distft.data.pipeline.prepare_data`, passed in: the data command, distft/commands/data.py, calls this module). data.cache=false:
    built here, in memory, every time."""

    started = time.monotonic()
    if not cfg.cache:
        return CacheResult(build(cfg, tokenizer, seed), None, True, time.monotonic() - started)
    inputs, key, path = _locate(cfg, tokenizer, seed, run_root, objective)
    root = os.path.dirname(path)
    try:
        make_dirs(root)
    except OSError as err:
        raise DataError(f"data.cache_dir={root} cannot be created ({err.strerror or err}); set data.cache_dir to a "
                        "writable directory every rank sees, or data.cache=false") from None
    _check_permissions(root, rank)
    vocab_size = len(tokenizer)
    if rank != 0:
        found, verify_s = _wait(path, key, vocab_size, cfg, rank)
        return CacheResult(found, path, False, time.monotonic() - started, verify_s)
    result = _find_or_build(cfg, tokenizer, seed, build, path, key, inputs, started)
    # The packing figures depend on data.packing / pack_strategy, which the key leaves out.
    _recount(result.data, cfg)
    return result


def _locate(cfg: DataConfig, tokenizer, seed: int, run_root: str, objective: str = "sft") -> tuple[dict, str, str]:
    """(key inputs, key, cache path) of this config: the chat template in use is installed first,
    since it is part of the key."""

    use_chat_template(tokenizer, cfg.chat_template)
    inputs = key_inputs(cfg, tokenizer, seed, data_fingerprint(cfg), objective)
    key = cache_key(inputs)
    return inputs, key, os.path.join(cache_dir(cfg, run_root), key)


def _recount(data, cfg: DataConfig) -> None:
    """The report's packing figures for this config's packing, when the cache was built with another."""
    if data.packed_as != [cfg.packing, cfg.pack_strategy] and not data.report.pairs:  # pairs: counted as answers
        count_sequences(data.report, cfg, data.train, data.eval)
        data.packed_as = [cfg.packing, cfg.pack_strategy]


def find(cfg: DataConfig, tokenizer, seed: int, run_root: str, objective: str = "sft") -> Optional[CacheResult]:
    """The cache of this config if it is there and sound, else None; nothing is built or locked
    (the planner's exact epoch)."""

    if not cfg.cache:
        return None
    started = time.monotonic()
    _, key, path = _locate(cfg, tokenizer, seed, run_root, objective)
    _check_permissions(os.path.dirname(path), 0)
    try:
        found = _load(path, key, len(tokenizer))
    except (ValueError, OSError):
        return None
    if found is None:
        return None
    _recount(found[0], cfg)
    return CacheResult(found[0], path, False, time.monotonic() - started, found[1])


def _find_or_build(cfg, tokenizer, seed, build, path, key, inputs, started) -> CacheResult:
    vocab_size = len(tokenizer)
    lock_path = f"{path}.lock"
    waited_for = None
    while True:
        try:
            found = _load(path, key, vocab_size)
        except ValueError:
            found = None  # set aside by whoever holds the lock: this process once it has it, or another builder
        if found is not None:
            return CacheResult(found[0], path, False, time.monotonic() - started, found[1])
        lock, holder = try_take(lock_path, f"data cache {path}")
        if lock is not None:
            break
        if waited_for != holder:
            log.info("data cache %s is being built by %s: waiting for it", path, holder.describe())
            waited_for = holder
        _check_timeout(started, cfg, f"{holder.describe()} to build the data cache {path}", 0)
        time.sleep(POLL_S)
    try:
        try:
            found = _load(path, key, vocab_size)  # built, or damaged, while the lock was being taken
        except ValueError as err:
            _set_aside(path, str(err))
            found = None
        if found is not None:
            return CacheResult(found[0], path, False, time.monotonic() - started, found[1])
        _remove_leftovers(os.path.dirname(path), key)
        data = build(cfg, tokenizer, seed)
        seconds = time.monotonic() - started
        tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
        try:
            _write(data, tmp, key, inputs, seconds)
            faults.point("cache_publish", 0)
            os.rename(tmp, path)
            fsync_dir(os.path.dirname(path))
        except OutputError:
            remove_tree(tmp)
            raise
        except OSError as err:
            remove_tree(tmp)  # ours, or planted in our name (a link is unlinked, not followed)
            raise output_error(tmp, err, "the data cache") from None
    finally:
        lock.release()
    # Train from the memory maps, as every other rank does, not from the lists just built.
    try:
        found = _load(path, key, vocab_size)
    except ValueError as err:
        found, why = None, str(err)
    else:
        why = "it is gone"
    if found is None:
        raise DataError(f"the data cache just built at {path} fails its own check ({why}): the disk changed its "
                        "files, or the tokenizer gives ids its length does not cover; set data.cache=false to prepare "
                        "the data in memory instead")
    return CacheResult(found[0], path, True, time.monotonic() - started, found[1])


def _check_timeout(started: float, cfg: DataConfig, what: str, rank: int) -> None:
    waited = time.monotonic() - started
    if waited > cfg.cache_wait_s:
        raise DataError(
            f"rank {rank} waited {waited:.0f} s for {what}, longer than data.cache_wait_s={cfg.cache_wait_s}; "
            "look at that process's log; prepare the data ahead of the job with `python -m distft.data <the same "
            "overrides>`, or raise data.cache_wait_s")


def _wait(path: str, key: str, vocab_size: int, cfg: DataConfig, rank: int) -> tuple:
    """A rank other than 0: `_load`'s (data, seconds of its checks) of the cache at `path` once
    rank 0 (or another job) has built it."""
    started = last_note = time.monotonic()
    seen_builder = False
    while True:
        try:
            found = _load(path, key, vocab_size)
        except ValueError:
            found = None  # rank 0 sets it aside and rebuilds it
        if found is not None:
            return found
        root = os.path.dirname(path)
        building = os.path.lexists(f"{path}.lock") or any(n.startswith(f"{key}.tmp-") for n in _listdir(root))
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


def prepared_for_run(cfg, tokenizer, rank: int = 0) -> CacheResult:
    """The data a run of `cfg` (the whole Config) trains and is scored on, through the cache:
    preference pairs for objective=dpo (distft/data/preference.py build_pairs), else the SFT
    samples (distft/data/pipeline.py prepare_data). The trainer, distft.data, distft.evaluate and
    distft.compare all read a run's data here."""
    if cfg.objective.name == "dpo":
        from distft.data.preference import build_pairs

        return prepared(cfg.data, tokenizer, cfg.data.seed, cfg.run.root, build_pairs, rank, objective="dpo")
    from distft.data.pipeline import prepare_data

    return prepared(cfg.data, tokenizer, cfg.data.seed, cfg.run.root, prepare_data, rank)
