"""The data path: load, clean (with counts), template, mask prompts, tokenize, split, augment (packing and
batching: batching.py).

`prepare_data()` runs once per process and is deterministic, so every rank builds the same samples
without talking to the others; `TrainBatches` then gives each rank its own micro-batches of one
shared, seeded order. The order is a pure function of (seed, epoch, index), which is why resuming
needs only `{"epoch", "index"}` and why runs with the same global batch on different numbers of
ranks see the same data.

Rows are plain dicts. After cleaning each row has one of three canonical shapes, whatever the
source's column names were: alpaca `{"instruction", "input", "output", ...extra keys}`, chat
`{"messages": [{"role", "content"}, ...]}`, text `{"text"}`. Augmentation functions see and return
these shapes.

Samples are `{"input_ids", "labels"}` with labels aligned to input_ids (the loss shifts): bos
first, prompt tokens -100 (unless train_on_prompt), response tokens and eos as targets. The first
label of every sample is -100, so a packed sample never learns to predict across a boundary.
Packed rows carry position_ids that restart at 0 per sample and no attention_mask: transformers
builds a block-diagonal causal mask from them, so packed samples neither attend to nor shift the
positions of one another. (That only happens when no KV cache is built: call the model with
use_cache=False in training and evaluation.)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from distft.config import AUGMENT_CALL, DataConfig
from distft.data.batching import TrainBatches, eval_batches, pack, pack_index  # noqa: F401  (re-exported)
from distft.data.encoding import encode_row, encode_rows
from distft.data.report import DataReport, PreparedData, count_sequences, lengths_that_keep  # noqa: F401  (re-exported)
from distft.data.samples import TokenSamples, piece
from distft.data.sources import SURROGATE, RawRow, Unparsable, json_type, load_rows, parts, read_eval_path  # noqa: F401  (load_rows re-exported)
from distft.data.templates import (
    HEADER_TEMPLATES,
    HEADERS,
    HEADERS_CHAT_TEMPLATE,
    RejectedConversation,
    render_row,
    stop_token_ids,
    use_chat_template,
)
from distft.errors import DataError, TemplateError  # DataError also re-exported (tests import it here)

# ---------------------------------------------------------------------------------------------
# Cleaning: detect the format, check types, drop empty / duplicate / over-long rows, counted.


class RejectedRow(Exception):
    def __init__(self, rule: str, reason: str):
        super().__init__(reason)
        self.rule, self.reason = rule, reason

    def __reduce__(self):  # comes back from a tokenizing process
        return RejectedRow, (self.rule, self.reason)


def _string(row: dict, name: str, what: str, required: bool = True) -> str:
    if name not in row:
        if required:
            raise RejectedRow("malformed", f"no {what} field {name!r} (columns: {sorted(row)})")
        return ""
    value = row[name]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RejectedRow("malformed", f"{what} field {name!r} is a {type(value).__name__}, expected a string")
    _check_text(value, f"{what} field {name!r}")
    return value


def _check_text(value: str, what: str) -> None:
    """A lone surrogate (JSON's "\\ud800" escape without its pair) is not text: no tokenizer encodes it."""
    found = SURROGATE.search(value)
    if found:
        raise RejectedRow("malformed", f"{what} holds a lone surrogate \\u{ord(found.group()):04x} (half of a "
                                     "UTF-16 pair), which is not text; fix the \\u escape")


def to_canonical(value: Any, fmt: str, cfg: DataConfig) -> tuple[str, dict]:
    """(kind, canonical row) of a raw record, or RejectedRow('malformed', why)."""
    if isinstance(value, Unparsable):
        raise RejectedRow("malformed", value.reason)
    if not isinstance(value, dict):
        raise RejectedRow("malformed", f"a JSON {json_type(value)}, expected an object")
    kind = fmt
    if fmt == "auto":
        if cfg.messages_field in value or SHAREGPT_FIELD in value:
            kind = "chat"
        elif cfg.instruction_field in value or cfg.output_field in value:
            kind = "alpaca"
        elif cfg.text_field in value:
            kind = "text"
        else:
            raise RejectedRow(
                "malformed",
                f"none of the fields {cfg.messages_field!r} (chat), {cfg.instruction_field!r}+{cfg.output_field!r} "
                f"(alpaca), {cfg.text_field!r} (text); it has {sorted(value)} "
                "(map your columns with data.messages_field / instruction_field / output_field / text_field)",
            )
    if kind == "text":
        return kind, {**_extras(value, cfg.text_field), "text": _string(value, cfg.text_field, "text")}
    if kind == "alpaca":
        row = _extras(value, cfg.instruction_field, cfg.input_field, cfg.output_field)
        row["instruction"] = _string(value, cfg.instruction_field, "instruction")
        row["input"] = _string(value, cfg.input_field, "input", required=False)
        row["output"] = _string(value, cfg.output_field, "output")
        return kind, row
    field_name = cfg.messages_field if cfg.messages_field in value or SHAREGPT_FIELD not in value else SHAREGPT_FIELD
    messages = _from_sharegpt(value.get(field_name), field_name)
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise RejectedRow("malformed", f"{cfg.messages_field!r} is not a list of {{role: str, content: str}} objects")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    for i, m in enumerate(messages):
        _check_text(m["role"], f"{cfg.messages_field}[{i}].role")
        _check_text(m["content"], f"{cfg.messages_field}[{i}].content")
    return kind, {**_extras(value, cfg.messages_field, SHAREGPT_FIELD), "messages": messages}


# ShareGPT conversations (FastChat's, Vicuna's, many Hub sets): `{"conversations": [{"from": "human",
# "value": ...}, {"from": "gpt", "value": ...}]}`; their speaker names, mapped to chat roles.
SHAREGPT_FIELD = "conversations"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant"}


def _from_sharegpt(turns: Any, field_name: str) -> Any:
    """ShareGPT turns (`from`/`value`) as chat messages (`role`/`content`); anything else as it is
    (the caller checks the shape). An unknown speaker is a malformed row naming it."""
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and "from" in t for t in turns):
        return turns
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RejectedRow("malformed", f"{field_name}[{i}].from is {speaker!r}, not a ShareGPT speaker "
                                         f"({', '.join(sorted(SHAREGPT_ROLES))})")
        if not isinstance(turn.get("value"), str):
            raise RejectedRow("malformed", f"{field_name}[{i}].value is not a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _extras(value: dict, *used: str) -> dict:
    """The row's other keys (e.g. "task", used for per-task eval metrics), kept as they are."""
    return {k: v for k, v in value.items() if k not in used}


def _check_not_empty(kind: str, row: dict) -> None:
    if kind == "text" and not row["text"].strip():
        raise RejectedRow("empty", "blank text")
    if kind == "alpaca" and not (row["instruction"].strip() and row["output"].strip()):
        raise RejectedRow("empty", "blank instruction" if not row["instruction"].strip() else "blank output")
    if kind == "chat":
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        if not replies or not all(r.strip() for r in replies):
            raise RejectedRow("empty", "no assistant turn" if not replies else "an assistant turn with blank content")


def _dedup_key(kind: str, row: dict) -> bytes:
    """What makes two rows the same (the kind, and the texts with whitespace collapsed), as a
    16-byte digest: the set of keys seen then costs ~100 bytes a row, not a second copy of the text."""
    def norm(text: str) -> str:
        return " ".join(text.split())

    if kind == "text":
        key: tuple = (kind, norm(row["text"]))
    elif kind == "alpaca":
        key = (kind, norm(row["instruction"]), norm(row["input"]), norm(row["output"]))
    else:
        key = (kind, tuple((m["role"], norm(m["content"])) for m in row["messages"]))
    return hashlib.blake2b(repr(key).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def tokenize_row(row: dict, kind: str, cfg: DataConfig, tokenizer, variant: int = 0) -> dict:
    """{"input_ids", "labels"} of a cleaned row: the tokenization of its whole formatted text
    (`distft/data/encoding.py`), untruncated; except that a text far longer than data.max_seq_len is
    encoded only as far as matters (the row is dropped or cut anyway), and the sample then stops
    at max_seq_len + 1 tokens."""
    encoded, _ = encode(row, kind, cfg, tokenizer, variant)
    return {"input_ids": encoded.input_ids, "labels": encoded.labels}


def encode(row: dict, kind: str, cfg: DataConfig, tokenizer, variant: int = 0) -> tuple:
    """(Encoded, Rendered) of a cleaned row; RejectedRow('malformed') for a conversation the chat
    template refuses, DataError when the template cannot render rows at all."""
    try:
        rendered = render_row(row, kind, cfg.template, tokenizer, variant)
        return encode_row(rendered, tokenizer, cfg.max_seq_len, cfg.train_on_prompt), rendered
    except RejectedConversation as err:
        raise RejectedRow("malformed", str(err)) from None
    except TemplateError as err:
        raise DataError(f"data.template={cfg.template}: {err}") from None


@dataclass
class Example:
    kind: str
    row: dict
    sample: tuple  # (ids int32, targets uint8) arrays: samples.piece
    variant: int = 0  # header wording (templates.HEADERS), set by template_variation
    source: int = 0  # its index in data.sources (sources.parts)
    prompt_len: Optional[int] = None  # the untruncated encoding's Encoded.prompt_len, when cleaning kept it


def clean(raw: list[RawRow], cfg: DataConfig, tokenizer, report: DataReport, seen: set,
          pool: Optional[TokenizerPool] = None, source: int = 0, lengths: Optional[list] = None) -> list[Example]:
    """Cleaned, tokenized examples in source order; every dropped row is counted in `report`, and
    the token length of every row that reaches the length check is appended to `lengths`.

    Rows go in chunks of CHUNK_ROWS through `_clean_chunk` (checked, templated, tokenized in one
    batch), here or in `pool`'s processes; what depends on the rows before (duplicates, the
    counts, on_bad_rows=fail's first bad row) is decided here, in order, so the result is the
    same row for row however many processes tokenized."""
    kept = []
    chunks = [[r.value for r in raw[i : i + CHUNK_ROWS]] for i in range(0, len(raw), CHUNK_ROWS)]
    results = pool.map(chunks) if pool is not None else (_clean_chunk(c, cfg, tokenizer) for c in chunks)
    records = iter(raw)
    for outcomes in results:
        for outcome in outcomes:
            record = next(records)
            report.loaded += 1
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                kind, row, key, (ids, targets, prompt_len), chars = outcome
                if key in seen:
                    raise RejectedRow("duplicate", "the same prompt and response as an earlier row")
                if lengths is not None:
                    lengths.append(_measured_length(len(ids), chars, cfg.max_seq_len))
                sample, truncated = _fit_piece((ids, targets), cfg)
            except RejectedRow as rejected:
                if cfg.on_bad_rows == "fail":
                    raise DataError(
                        f"{record.where} is {rejected.rule}: {rejected.reason}. Fix or remove the row, or set "
                        "data.on_bad_rows=drop to skip such rows (they are counted in the data report)"
                    ) from None
                setattr(report, rejected.rule, getattr(report, rejected.rule) + 1)
                report.first_dropped.setdefault(rejected.rule, f"{record.where}: {rejected.reason}")
                continue
            seen.add(key)
            report.truncated += truncated
            kept.append(Example(kind, row, sample, source=source, prompt_len=prompt_len))
    return kept


CHUNK_ROWS = 1000  # rows tokenized in one call (and handed to a process at a time)


def _measured_length(ids: int, chars: int, max_seq_len: int) -> int:
    """A row's token length for the data report (`datareport.lengths_that_keep`), or -1 where it
    is not known: encoding.encode_row stops a text far longer than max_seq_len at max_seq_len + 1
    ids, which it only does to a text of more than 8 characters for each of those ids."""
    return -1 if ids == max_seq_len + 1 and chars > 8 * ids else ids


def _clean_chunk(values: list, cfg: DataConfig, tokenizer) -> list:
    """Per raw record: (kind, canonical row, dedup key, (ids, targets, prompt_len), characters of the
    rendered text) or the exception that rejects it (RejectedRow, or the DataError of a template
    that cannot render rows), in order.
    The tokenization is `tokenize_row`'s, for the whole chunk at once (encoding.encode_rows)."""
    staged: list = []
    for value in values:
        try:
            kind, row = to_canonical(value, cfg.format, cfg)
            _check_not_empty(kind, row)
            staged.append((kind, row, _dedup_key(kind, row)))
        except RejectedRow as rejected:
            staged.append(rejected)
    todo, rendered = [], []
    for i, item in enumerate(staged):
        if isinstance(item, Exception):
            continue
        try:
            rendered.append(render_row(item[1], item[0], cfg.template, tokenizer, 0))
            todo.append(i)
        except RejectedConversation as err:
            staged[i] = RejectedRow("malformed", str(err))
        except TemplateError as err:
            staged[i] = DataError(f"data.template={cfg.template}: {err}")
    encoded_rows = encode_rows(rendered, tokenizer, cfg.max_seq_len, cfg.train_on_prompt)
    for i, text, encoded in zip(todo, rendered, encoded_rows):
        if isinstance(encoded, RejectedConversation):
            staged[i] = RejectedRow("malformed", str(encoded))
        elif isinstance(encoded, Exception):
            raise encoded  # a bug, not the row's fault
        else:
            staged[i] = (*staged[i], encoded, len(text.text))
    return staged


class TokenizerPool:
    """`_clean_chunk` in `processes` processes, results in order (`map`). Spawned, not forked: the
    caller may be a training rank with torch's and the tokenizer's threads running, which a fork
    copies in a broken state. Each process tokenizes on one thread (RAYON_NUM_THREADS=1), so
    n processes use n cores.

    A process that ends before its work is done (killed for memory; or, the usual case, a user's
    script without an `if __name__ == "__main__":` guard, which each spawned process runs again and
    which would start processes of its own) ends the build with one DataError naming both causes.
    concurrent.futures reports such a death; multiprocessing.Pool replaced the dead process, again
    and again, and the build hung."""

    def __init__(self, processes: int, cfg: DataConfig, tokenizer):
        import multiprocessing
        import os
        import pickle
        import tempfile
        from concurrent.futures import ProcessPoolExecutor

        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # This is a spawned tokenizing process re-running an unguarded main script (what
            # multiprocessing's own "bootstrapping phase" check detects): end it quietly; the
            # parent process names the problem.
            os._exit(3)
        self.processes = processes
        # The tokenizer goes by file: a spawned process reads its start-up arguments only after
        # importing its modules (~2 s), so a ~1 MB argument through the pipe would start the
        # processes one after another, each waiting for the previous one's imports.
        with tempfile.NamedTemporaryFile(prefix="distft-tokenizer-", suffix=".pkl", delete=False) as f:
            pickle.dump(tokenizer, f)
        self._tokenizer_file = f.name
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start_worker, initargs=(self._tokenizer_file, cfg))

    def map(self, chunks: list[list]):
        from concurrent.futures.process import BrokenProcessPool

        try:
            yield from self._pool.map(_worker_chunk, chunks)
        except BrokenProcessPool:
            raise DataError(
                f"a tokenizing process (data.num_proc={self.processes}) ended before its work was done. If distft "
                "runs from a script of your own: Python starts these processes by running that script again, so the "
                "code that calls distft must sit under `if __name__ == \"__main__\":`. Otherwise the process was "
                "killed (out of memory?). data.num_proc=1 tokenizes in this process instead") from None

    def close(self) -> None:
        import os

        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            os.unlink(self._tokenizer_file)
        except FileNotFoundError:
            pass


_WORKER: dict = {}


def _start_worker(tokenizer_file: str, cfg: DataConfig) -> None:
    import os
    import pickle

    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with open(tokenizer_file, "rb") as f:
        _WORKER.update(tokenizer=pickle.load(f), cfg=cfg)


def _worker_chunk(values: list) -> list:
    return _clean_chunk(values, _WORKER["cfg"], _WORKER["tokenizer"])


PARALLEL_ROWS = 50_000  # data.num_proc=0 tokenizes in one process per core from this many rows


def tokenizing_processes(cfg: DataConfig, rows: int) -> int:
    """data.num_proc, or for 0: one process per core this process may use when there are at least
    PARALLEL_ROWS rows (below that, starting the processes costs more than they save), else 1."""
    import os

    if cfg.num_proc:
        return cfg.num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if rows >= PARALLEL_ROWS and cores > 1 else 1


def _fit_piece(sample: tuple, cfg: DataConfig) -> tuple[tuple, bool]:
    """`_fit` of an (ids, targets) sample."""
    ids, targets = sample
    n = len(ids)
    if n <= cfg.max_seq_len:
        return sample, False
    if cfg.drop_overlong:
        size = f"{n} tokens > data.max_seq_len={cfg.max_seq_len}" if n > cfg.max_seq_len + 1 else (
            f"more than data.max_seq_len={cfg.max_seq_len} tokens")
        raise RejectedRow("overlong", f"{size} (or data.drop_overlong=false)")
    ids, targets = ids[: cfg.max_seq_len], targets[: cfg.max_seq_len]
    if not targets.any():
        raise RejectedRow("overlong", f"the prompt alone fills data.max_seq_len={cfg.max_seq_len}; nothing to learn")
    return (ids, targets), True


def _clean_row(value: Any, cfg: DataConfig, tokenizer, seen: set) -> tuple[Example, bool, tuple]:
    """(example, whether it was truncated, its dedup key), or RejectedRow(rule, why)."""
    kind, row = to_canonical(value, cfg.format, cfg)
    _check_not_empty(kind, row)
    key = _dedup_key(kind, row)
    if key in seen:
        raise RejectedRow("duplicate", "the same prompt and response as an earlier row")
    sample, truncated = _fit_piece(piece(**tokenize_row(row, kind, cfg, tokenizer)), cfg)
    return Example(kind, row, sample), truncated, key


def _why_none_left(raw: list[RawRow], cfg: DataConfig, tokenizer, seen: set) -> str:
    """Why the first row was dropped, for the message when cleaning dropped every row."""
    if raw:
        try:
            _clean_row(raw[0].value, cfg, tokenizer, seen)
        except RejectedRow as rejected:
            return f"the first, {raw[0].where}, is {rejected.rule}: {rejected.reason}"
    return "check data.format and the fields"


# ---------------------------------------------------------------------------------------------
# Split (before augmentation, so the eval split is never augmented) and augmentation.


def split(examples: list[Example], cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval), both in source order; which rows are held out depends only on data.seed."""
    n = len(examples)
    if cfg.eval_size is not None:
        size, key = cfg.eval_size, f"data.eval_size={cfg.eval_size}"
    else:
        size, key = int(n * cfg.eval_fraction), f"data.eval_fraction={cfg.eval_fraction}"
        size = max(size, 1) if cfg.eval_fraction > 0 and n > 1 else size
    if size >= n:
        raise DataError(f"{key} holds out {size} of the {n} rows left after cleaning, leaving none to train on")
    held = set(random.Random(cfg.seed).sample(range(n), size))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _locate(target: str) -> Callable:
    module_name, _, name = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise DataError(
            f"data.augment.functions: _target_={target!r} cannot be imported ({err}); give the dotted path of a "
            f"function {AUGMENT_CALL} in a module on the Python path"
        ) from None
    if not callable(fn):
        raise DataError(f"data.augment.functions: _target_={target!r} is not a function")
    return fn


def resolve_functions(specs: list) -> list[tuple[str, Callable]]:
    """`{_target_: "pkg.mod.fn", **kwargs}` entries -> (target, fn bound to kwargs)."""
    resolved = []
    for i, spec in enumerate(specs):
        spec = {"_target_": spec} if isinstance(spec, str) else dict(spec)
        target = spec.pop("_target_", None)
        spec.pop("_partial_", None)
        if not isinstance(target, str):
            raise DataError(f"data.augment.functions[{i}] has no _target_; write {{_target_: pkg.mod.fn, ...kwargs}}")
        fn = _locate(target)
        resolved.append((target, functools.partial(fn, **spec) if spec else fn))
    return resolved


def augment(train: list[Example], cfgs: list[DataConfig], tokenizer, report: DataReport,
            rng: random.Random) -> list[Example]:
    """Apply `data.augment.functions` in order, then template_variation, to each training row.

    validate() has checked that each function imports and takes (row, rng, **kwargs); an exception
    it raises on a row is the user's to fix, so it ends the run as one DataError naming the
    function and the row (its index in the training split), not as a traceback. `cfgs`: data.*
    as each source reads it (sources.parts), by Example.source."""
    cfg = cfgs[0]
    functions = resolve_functions(list(cfg.augment.functions))
    probability = cfg.augment.template_variation
    out = []
    for index, example in enumerate(train):
        produced = [(example.kind, example.row)]
        for position, (target, fn) in enumerate(functions):
            after = []
            for _, row in produced:
                try:
                    result = fn(copy.deepcopy(row), rng)
                except Exception as err:  # noqa: BLE001 - the user's function: one message naming it and the row
                    raise DataError(
                        f"data.augment.functions[{position}]: {target} raised {type(err).__name__} "
                        f"({' '.join(str(err).split())[:200]}) on training row {index} (after the split); fix the "
                        f"function, it is called as {AUGMENT_CALL}"
                    ) from err
                for new in [] if result is None else result if isinstance(result, list) else [result]:
                    try:
                        after.append(to_canonical(new, "auto", DataConfig()))
                    except RejectedRow as err:
                        raise DataError(f"data.augment.functions: {target} returned a malformed row: {err}") from None
            produced = after
        if not produced:
            report.augment_dropped += 1
        for kind, row in produced:
            variant = 0
            if (probability > 0 and kind == "alpaca" and cfgs[example.source].template in HEADER_TEMPLATES
                    and rng.random() < probability):
                variant = rng.randrange(1, len(HEADERS))
            if kind == example.kind and row == example.row and variant == 0:
                out.append(example)
                continue
            try:
                _check_not_empty(kind, row)
                own = cfgs[example.source]
                sample, truncated = _fit_piece(piece(**tokenize_row(row, kind, own, tokenizer, variant)), own)
            except RejectedRow:
                report.augment_dropped += 1
                continue
            report.truncated += truncated
            report.augmented += 1
            out.append(Example(kind, row, sample, variant, example.source))
    return out


# ---------------------------------------------------------------------------------------------
# The whole pipeline.


def prepare_data(cfg: DataConfig, tokenizer, seed: int = 0, rows: Optional[tuple] = None) -> PreparedData:
    """Cleaned, split, augmented, tokenized data; identical on every rank for the same inputs.

    The eval split depends only on data.seed (so runs with different training seeds are scored on
    the same rows); augmentation draws from data.seed and `seed` together. `rows`: (train, eval)
    raw rows already loaded (the planner's sample), instead of load_rows(cfg).
    `data.chat_template`, when set, is installed on `tokenizer` (so checkpoints save it).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the tokenizer ({type(tokenizer).__name__}) is a slow (Python) tokenizer; distft masks "
                        "prompts by character offsets, which only fast tokenizers give: point model.tokenizer at a "
                        "directory with a tokenizer.json (any Hugging Face tokenizer saved with transformers >= 4)")
    use_chat_template(tokenizer, cfg.chat_template)
    try:
        stop_ids = stop_token_ids(tokenizer, cfg.stop_tokens)
    except TemplateError as err:
        raise DataError(str(err)) from None
    report = DataReport()
    sources = parts(cfg)
    cfgs = [part.cfg for part in sources]
    seen: set = set()  # shared, so an eval row that repeats a training row is dropped as a duplicate
    lengths: list[int] = []  # every row's tokens at the length check: what data.max_seq_len keeps them
    pool: Optional[TokenizerPool] = None
    train: list[Example] = []
    held_out: list[Example] = []
    try:
        for index, part in enumerate(sources):
            train_raw, eval_raw = rows if rows is not None else load_rows(part.cfg, part.key)
            if pool is None and index == 0:
                processes = tokenizing_processes(cfg, len(train_raw) + len(eval_raw or ()))
                pool = TokenizerPool(processes, cfg, tokenizer) if processes > 1 else None
            kept = clean(train_raw, part.cfg, tokenizer, report, seen, pool, index, lengths)
            if not kept:
                what = "the synthetic data" if part.cfg.source == "synthetic" else f"{part.key}={part.cfg.path}"
                raise DataError(
                    f"no training rows left after cleaning {what}: {report.summary()}; "
                    f"{_why_none_left(train_raw, part.cfg, tokenizer, seen)}"
                )
            train += kept
            if eval_raw is not None:
                kept = clean(eval_raw, part.cfg, tokenizer, report, seen, pool, index, lengths)
                if not kept:
                    what = (f"data.eval_path={cfg.eval_path}" if cfg.eval_path else
                            f"the eval split of {part.key}={part.cfg.path}")
                    raise DataError(
                        f"no eval rows left after cleaning {what}: {report.summary()}; "
                        f"{_why_none_left(eval_raw, part.cfg, tokenizer, seen)}"
                    )
                held_out += kept
        if cfg.sources and cfg.eval_path:  # one eval file for the whole mix
            eval_raw = read_eval_path(cfg)
            held_out += clean(eval_raw, dataclasses.replace(cfg, template=cfgs[0].template), tokenizer, report, seen, pool,
                              lengths=lengths)
            if not held_out:
                raise DataError(f"no eval rows left after cleaning data.eval_path={cfg.eval_path}: {report.summary()}")
    finally:
        if pool is not None:
            pool.close()
    if not held_out:
        train, held_out = split(train, cfg)
    report.kept, report.eval = len(train) + len(held_out), len(held_out)
    report.max_seq_len_p90, report.max_seq_len_all = lengths_that_keep(lengths)
    if cfg.augment.functions or cfg.augment.template_variation > 0:
        train = augment(train, cfgs, tokenizer, report, random.Random(cfg.seed * 1_000_003 + seed))
        if not train:
            raise DataError("data.augment.functions dropped every training row")
    train_samples = TokenSamples.from_pieces(e.sample for e in train)
    train_sources, mix = None, []
    if cfg.sources:
        train_sources = np.fromiter((e.source for e in train), dtype=np.int32, count=len(train))
        counts = np.bincount(train_sources, minlength=len(sources))
        mix = [{"name": p.name, "weight": p.weight, "samples": int(n)} for p, n in zip(sources, counts)]
        empty = [p.name for p, n in zip(sources, counts) if n == 0]
        if empty:
            raise DataError(f"data.sources: {', '.join(empty)} kept no training rows after the eval split; give it "
                            "more rows, or lower data.eval_fraction / data.eval_size")
    eval_samples = TokenSamples.from_pieces(e.sample for e in held_out)
    eval_rows = [entry for entry in (eval_row(e, cfgs[e.source], tokenizer) for e in held_out) if entry is not None]
    report.train = len(train)
    report.train_tokens = train_samples.token_count
    report.train_target_tokens = train_samples.target_count
    count_sequences(report, cfg, train_samples, eval_samples)
    report.sources = mix
    report.formats = rendered_formats(train, sources)
    report.chat_template_unused = (
        bool(getattr(tokenizer, "chat_template", None)) and not cfg.chat_template
        and tokenizer.chat_template != HEADERS_CHAT_TEMPLATE  # the built-in tokenizer's: no model was tuned on it
        and any(f["format"] not in ("chat", "text") for f in report.formats)
        and not any(f["format"] == "chat" for f in report.formats))
    return PreparedData(train_samples, eval_samples, eval_rows, report, stop_ids, train_sources,
                        [cfg.packing, cfg.pack_strategy])


def rendered_formats(examples: list[Example], sources: list) -> list[dict]:
    """DataReport.formats: how many training rows of each source were rendered in which format."""
    counts: dict[tuple[int, str], int] = {}
    for e in examples:
        fmt = "chat" if e.kind == "chat" else "text" if e.kind == "text" else sources[e.source].cfg.template
        counts[(e.source, fmt)] = counts.get((e.source, fmt), 0) + 1
    return [{"source": sources[i].name, "format": fmt, "rows": n} for (i, fmt), n in sorted(counts.items())]


def eval_row(example: Example, cfg: DataConfig, tokenizer) -> Optional[dict]:
    """What a generation eval asks of a held-out row: `prompt_ids`, the ids of its training sample
    before the last target (the row encoded again, untruncated), `prompt` (that text, for the
    report) and `reference` (the last answer); `task` when the row names one. None for text rows,
    and for a row whose prompt alone is far longer than data.max_seq_len.

    A row that cleaning encoded in a batch kept its prompt_len: its prompt ids are the head of its
    sample (truncation keeps the head), so only the text is rendered again, not tokenized."""
    if example.kind == "text":
        return None  # nothing to generate from: the whole text is the target
    if example.prompt_len is not None and example.prompt_len <= len(example.sample[0]):
        rendered = render_row(example.row, example.kind, cfg.template, tokenizer, example.variant)
        prompt_ids = example.sample[0][: example.prompt_len].tolist()
    else:
        encoded, rendered = encode(example.row, example.kind, cfg, tokenizer, example.variant)
        if encoded.prompt_len is None:
            return None
        prompt_ids = encoded.input_ids[: encoded.prompt_len]
    entry = {"prompt": rendered.prompt, "prompt_ids": prompt_ids, "reference": rendered.reference}
    if isinstance(example.row.get("task"), str):
        entry["task"] = example.row["task"]
    return entry


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
