"""Loading data files: every source becomes a list of RawRow; unparsable records are kept (and later counted
as malformed) so that on_bad_rows=fail can point at the exact line. A record with bytes that are
not UTF-8 is one malformed row, with the byte offset, in every text format (a .json or .csv file
is not refused for one bad cell, as a .jsonl file is not for one bad line). A UTF-8 byte-order
mark is skipped; a problem of the whole file (not a regular file, unreadable, UTF-16, no rows,
broken JSON, an unclosed CSV quote) is one DataError naming the file.

What comes out is raw: `distft.data` cleans, templates and tokenizes it. `data_file_problem` is
also what preflight asks on the launching machine, so both say the same thing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Optional

from distft.config import DataConfig
from distft.errors import DataError


@dataclass
class RawRow:
    value: Any  # a dict when the record parsed as an object; anything else is malformed
    where: str  # "row 3 (line 4) of /data/train.jsonl", for messages


@dataclass
class Unparsable:
    reason: str


_BOM = b"\xef\xbb\xbf"
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8
SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_CSV_TEXT = re.compile("[\x00\udc80-\udcff]")  # a NUL is a row's fault too (JSON forbids it raw)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_bom(f, path: str, key: str) -> int:
    """Bytes of a UTF-8 byte-order mark at the start of the file (now skipped); UTF-16/32 refused."""
    head = f.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head == b"\x00\x00\xfe\xff":
        raise DataError(
            f"{key}={path} is UTF-16 or UTF-32 text (it starts with that byte-order mark); save it as UTF-8, "
            f"e.g. iconv -f UTF-16 -t UTF-8 {path} > utf8_{os.path.basename(path)}"
        )
    skip = len(_BOM) if head.startswith(_BOM) else 0
    f.seek(skip)
    return skip


def _not_utf8(byte: int, offset: int, line: Optional[int] = None) -> str:
    where = f"byte offset {offset}" + (f", line {line}" if line else "")
    return f"not valid UTF-8: byte 0x{byte:02x} at {where}; save the file as UTF-8"


def _parse_line(line: bytes, offset: int) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return Unparsable(_not_utf8(line[err.start], offset + err.start))
    except json.JSONDecodeError as err:
        return Unparsable(f"invalid JSON: {err.msg} at column {err.colno}")


def _read_jsonl(f, path: str, key: str) -> list[RawRow]:
    """One record per line, read as bytes so that one undecodable line is one malformed row, not a
    crash. Lines end in \\n or \\r\\n; a line that does not parse and holds lone \\r (classic Mac
    OS line ends) is read as several lines. A byte-order mark is skipped at the start of the file
    and of any line (files joined with cat)."""
    rows = []
    offset = _skip_bom(f, path, key)
    line_no = 0
    for raw in f:
        start, offset = offset, offset + len(raw)
        body = raw[:-1] if raw.endswith(b"\n") else raw
        body = body[:-1] if body.endswith(b"\r") else body
        lines = [(body, start)]
        if b"\r" in body and isinstance(_parse_line(body, start), Unparsable):
            lines, at = [], start
            for piece in body.split(b"\r"):
                lines.append((piece, at))
                at += len(piece) + 1
        for line, at in lines:
            line_no += 1
            if line.startswith(_BOM):
                line, at = line[len(_BOM) :], at + len(_BOM)
            if line.strip():
                rows.append(RawRow(_parse_line(line, at), f"row {len(rows)} (line {line_no}) of {path}"))
    return rows


def json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _read_json(f, path: str, key: str) -> list[RawRow]:
    skip = _skip_bom(f, path, key)
    data = f.read()
    try:
        text, escaped = data.decode("utf-8"), False
    except UnicodeDecodeError:  # parse anyway: the rows holding such bytes are malformed, the others kept
        text, escaped = data.decode("utf-8", "surrogateescape"), True
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if not text.lstrip().startswith("["):
            f.seek(0)
            return _read_jsonl(f, path, key)  # JSON Lines saved as .json
        at = skip + len(text[: err.pos].encode("utf-8", "surrogateescape"))
        bad = _ESCAPED_BYTE.match(text, err.pos)
        why = f"byte 0x{ord(bad.group()) - 0xDC00:02x} is not UTF-8" if bad else err.msg
        raise DataError(
            f"{key}={path} is not valid JSON: {why} at line {err.lineno} column {err.colno} (byte offset {at}); "
            "fix it, or save it as JSON Lines (one object per line), where a bad record costs one row, not the file"
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"{key}={path} holds a JSON {json_type(value)}, not a list of rows; "
            "write a JSON list of objects (or JSON Lines with data.source=jsonl)"
        )
    rows = [RawRow(v, f"row {i} of {path}") for i, v in enumerate(value)]
    if escaped:
        where = _Locator(text, skip)
        for row, (start, end) in zip(rows, _element_spans(text)):
            bad = _ESCAPED_BYTE.search(text, start, end)
            if bad:
                line, offset = where(bad.start())
                row.value = Unparsable(_not_utf8(ord(bad.group()) - 0xDC00, offset, line))
    return rows


class _Locator:
    """(line, byte offset) of positions in a surrogateescape-decoded text, asked in increasing order."""

    def __init__(self, text: str, base: int):
        self.text, self.pos, self.line, self.offset = text, 0, 1, base

    def __call__(self, pos: int) -> tuple[int, int]:
        self.line += self.text.count("\n", self.pos, pos)
        self.offset += len(self.text[self.pos : pos].encode("utf-8", "surrogateescape"))
        self.pos = pos
        return self.line, self.offset


def _element_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each element of the JSON array `text` (known to parse)."""
    decoder = json.JSONDecoder()
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    spans: list[tuple[int, int]] = []
    while text[pos] != "]":
        _, end = decoder.raw_decode(text, pos)
        spans.append((pos, end))
        pos = _JSON_SPACE.match(text, end).end()
        if text[pos] == ",":
            pos = _JSON_SPACE.match(text, pos + 1).end()
    return spans


_MISSING_CELL = object()


def _bad_csv_text(lines: list[tuple[int, str]]) -> Optional[str]:
    """Why the physical lines [(byte offset, text)] of a CSV record are not text, or None."""
    for offset, line in lines:
        found = _NOT_CSV_TEXT.search(line)
        if found:
            at = offset + len(line[: found.start()].encode("utf-8", "surrogateescape"))
            if found.group() == "\x00":
                return f"holds a NUL byte at byte offset {at}; is it a binary or UTF-16 file?"
            return _not_utf8(ord(found.group()) - 0xDC00, at)
    return None


def _read_csv(f, path: str, key: str) -> list[RawRow]:
    """A header line, then one row per record. Decoded with surrogateescape so that bytes that are
    not UTF-8 make their row malformed (with the byte offset) rather than the file unreadable;
    the physical lines of each record are kept to say where. No limit on a cell's length (csv's
    default 128 KiB would refuse the file for one long document)."""
    skip = _skip_bom(f, path, key)
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    consumed: list[tuple[int, str]] = []  # (byte offset, text) of the lines read since the last record

    def lines():
        at = skip
        for line in text:
            consumed.append((at, line))
            at += len(line.encode("utf-8", "surrogateescape"))
            yield line

    reader = csv.DictReader(lines(), restkey="__extra__", restval=_MISSING_CELL)
    rows: list[RawRow] = []
    record_lines: list[tuple[int, str]] = []
    limit = csv.field_size_limit(2**31 - 1)
    try:
        reader.fieldnames  # noqa: B018  (reads the header line)
        problem = _bad_csv_text(consumed)
        if problem:
            raise DataError(f"{key}={path}: the header line is {problem}")
        consumed.clear()
        for i, record in enumerate(reader):
            record_lines = consumed[:]
            consumed.clear()
            problem = _bad_csv_text(record_lines)
            if problem is None and ("__extra__" in record or any(v is _MISSING_CELL for v in record.values())):
                problem = f"wrong number of columns for the header {reader.fieldnames}"
            value = Unparsable(problem) if problem else record
            rows.append(RawRow(value, f"row {i} (line {reader.line_num}) of {path}"))
        if len(record_lines) > 1:  # the last record ran over lines: a quote left open swallows the rest
            try:
                list(csv.reader((line for _, line in record_lines), strict=True))
            except csv.Error as err:
                if "unexpected end of data" in str(err):
                    first = reader.line_num - len(record_lines) + 1
                    raise DataError(
                        f"{key}={path}: the quoted field opened in row {len(rows) - 1} (line {first}) is never "
                        f"closed, so the {len(record_lines)} lines from there were read as one cell; close the "
                        'quote, or write a quote inside a quoted field as two ("")'
                    ) from None
    except csv.Error as err:
        raise DataError(f"{key}={path} line {reader.line_num} is not CSV ({err}); fix that line") from None
    finally:
        csv.field_size_limit(limit)
        text.detach()
    return rows


def _read_parquet(f, path: str, key: str) -> list[RawRow]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(f).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{key}={path} is not a readable parquet file: {err}") from None
    return [RawRow(v, f"row {i} of {path}") for i, v in enumerate(records)]


def _read_hf_disk(path: str, key: str) -> tuple[list[RawRow], Optional[list[RawRow]]]:
    """A `save_to_disk` directory: a Dataset, or a DatasetDict whose validation/test split is eval."""
    from datasets import load_from_disk

    try:
        data = load_from_disk(path)
    except Exception as err:
        raise DataError(f"{key}={path} is not a datasets.save_to_disk directory: {err}") from None
    return _dataset_rows(data, path, key)


def load_hub(name: str, cfg: DataConfig, key: str):
    """`datasets.load_dataset(name, data.hub_config, revision=data.hub_revision)` (a DatasetDict),
    or one DataError saying why it could not be had: offline, unknown or gated, or unreadable."""
    import datasets

    try:
        return datasets.load_dataset(name, cfg.hub_config, revision=cfg.hub_revision)
    except ConnectionError as err:
        raise DataError(
            f"{key}={name}: the Hugging Face Hub dataset cannot be reached ({' '.join(str(err).split())[:200]}); on a "
            "machine without network (HF_DATASETS_OFFLINE=1, or compute nodes), download it first where there is "
            "one (it is then read from the datasets cache, HF_HOME), or save it with save_to_disk and use "
            "data.source=hf_disk") from None
    except FileNotFoundError as err:  # datasets' DatasetNotFoundError too
        raise DataError(
            f"{key}={name} is not a dataset datasets can find ({' '.join(str(err).split())[:200]}); check the name "
            "(org/name on huggingface.co/datasets), data.hub_config, and for a gated dataset your access and "
            "HF_TOKEN") from None
    except Exception as err:  # noqa: BLE001 - a dataset's own loading code may fail in any way
        raise DataError(f"{key}={name} could not be loaded with datasets.load_dataset: {type(err).__name__}: "
                        f"{' '.join(str(err).split())[:300]}") from None


def _dataset_rows(data, path: str, key: str) -> tuple[list[RawRow], Optional[list[RawRow]]]:
    """A datasets Dataset or DatasetDict as rows: its 'train' split, and its validation (or test)
    split as eval; a separate eval dataset (data.eval_path): its held-out split, else its only one."""
    from datasets import Dataset

    def rows(split, name: str) -> list[RawRow]:
        return [RawRow(v, f"row {i} of {path} [{name}]") for i, v in enumerate(split.to_list())]

    if isinstance(data, Dataset):
        return rows(data, "dataset"), None
    eval_name = next((s for s in ("validation", "test") if s in data), None)
    if key == "data.eval_path":  # a separate eval dataset: its held-out split, else its only split
        name = eval_name or next(iter(data))
        return rows(data[name], name), None
    if "train" not in data:
        raise DataError(f"{key}={path} has splits {list(data)} but no 'train' split; save one named 'train'")
    return rows(data["train"], "train"), (rows(data[eval_name], eval_name) if eval_name else None)


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _read(source: str, path: Optional[str], key: str, cfg: Optional[DataConfig] = None
          ) -> tuple[list[RawRow], Optional[list[RawRow]]]:
    if not path:
        raise DataError(
            f"{key} is not set but data.source={source} reads a file; set {key}=/path/to/data.{source} "
            "(or data.source=synthetic for the embedded dataset)"
        )
    if source == "hub":
        rows, split_eval = _dataset_rows(load_hub(path, cfg, key), path, key)
        if not rows:
            raise DataError(f"{key}={path} holds no rows (its train split is empty)")
        return rows, split_eval
    if source != "hf_disk" and source not in _READERS:
        raise DataError(f"data.source={source} is not one of: synthetic, {', '.join(_READERS)}, hf_disk, hub")
    path = os.path.expanduser(path)
    problem = data_file_problem(key, path, source)  # the checks preflight made on the launching machine
    if problem:
        raise DataError(problem)
    if not os.path.exists(path):
        raise DataError(
            f"{key}={path} does not exist (resolved to {os.path.abspath(path)}); set {key} to an existing "
            f"{'directory written by datasets save_to_disk' if source == 'hf_disk' else source + ' file'}, "
            "preferably as an absolute path"
        )
    if source == "hf_disk":
        rows, split_eval = _read_hf_disk(path, key)
    else:
        try:
            with open(path, "rb") as f:
                rows, split_eval = _READERS[source](f, path, key), None
        except OSError as err:  # checked above, so a failing disk or a file changed meanwhile
            raise DataError(f"{key}={path} could not be read ({err.strerror or err}); check the file") from None
    if not rows:
        what = "an empty dataset" if source == "hf_disk" else (
            f"{os.path.getsize(path)} bytes: only blank lines, an empty list, a header line or an empty table")
        raise DataError(f"{key}={path} holds no rows ({what}); set {key} to the file that holds the data")
    return rows, split_eval


# What one entry of data.sources may set (the rest of data.* applies to every source).
SOURCE_KEYS = ("path", "weight", "source", "template", "format", "instruction_field", "input_field", "output_field",
               "messages_field", "text_field", "name")


def reader_for(path: str) -> str:
    """The data source that reads a file like `path`, from its extension (jsonl when unknown)."""
    extension = os.path.splitext(path.rstrip("/"))[1].lower().lstrip(".")
    if not extension:
        return "hf_disk" if os.path.isdir(os.path.expanduser(path)) else "jsonl"
    return {"jsonl": "jsonl", "ndjson": "jsonl", "json": "json", "csv": "csv", "parquet": "parquet"}.get(extension, "jsonl")


@dataclass
class Part:
    """One data source of a run: its name, its weight in the mix, and data.* as it reads it."""

    name: str
    weight: float
    cfg: DataConfig
    key: str  # the config key that names its file, for messages: data.path, data.sources[1].path


def source_problems(cfg: DataConfig) -> list[str]:
    """What is wrong with data.sources, one message per problem (validate() reports them all)."""
    if not cfg.sources:
        return []
    errors = []
    if cfg.path:
        errors.append(f"data.path={cfg.path!r} and data.sources are both set; put that file into data.sources "
                      "as one more {path: ..., weight: ...} entry, or unset data.sources")
    for i, spec in enumerate(cfg.sources):
        key = f"data.sources[{i}]"
        if not isinstance(spec, dict):
            errors.append(f"{key} is a {type(spec).__name__}; write {{path: FILE, weight: 1.0}} (keys: "
                          f"{', '.join(SOURCE_KEYS)})")
            continue
        unknown = sorted(set(spec) - set(SOURCE_KEYS))
        if unknown:
            errors.append(f"{key} has unknown keys {unknown}; a source takes {', '.join(SOURCE_KEYS)}")
        if not isinstance(spec.get("path"), str) or not spec.get("path"):
            errors.append(f"{key} has no path; every source names its file (or datasets directory)")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            errors.append(f"{key}.weight={weight!r} must be a number > 0 (its share of each epoch is weight / sum)")
        if "source" in spec and spec["source"] not in DATA_READERS:
            errors.append(f"{key}.source={spec['source']!r} is not one of {', '.join(DATA_READERS)}")
    return errors


DATA_READERS = ("jsonl", "json", "csv", "parquet", "hf_disk", "hub")


def parts(cfg: DataConfig) -> list[Part]:
    """The run's sources: data.sources, each as data.* with its own entries; else data.* itself."""
    import dataclasses

    if not cfg.sources:
        return [Part(cfg.name, 1.0, cfg, "data.path")]
    found = []
    for i, spec in enumerate(cfg.sources):
        spec = dict(spec)
        path = os.path.expanduser(spec["path"])
        overrides = {k: v for k, v in spec.items() if k not in ("path", "weight", "name", "source")}
        part_cfg = dataclasses.replace(cfg, source=spec.get("source") or reader_for(path), path=path, eval_path=None,
                                       sources=[], **overrides)
        name = spec.get("name") or os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        found.append(Part(name, float(spec.get("weight", 1.0)), part_cfg, f"data.sources[{i}].path"))
    return found


def eval_reader(cfg: DataConfig) -> str:
    """How data.eval_path is read: as data.source reads data.path; as JSON Lines next to the
    synthetic data; by its extension next to data.sources."""
    if cfg.sources:
        return reader_for(cfg.eval_path or "")
    return "jsonl" if cfg.source == "synthetic" else cfg.source


def read_eval_path(cfg: DataConfig) -> list[RawRow]:
    return _read(eval_reader(cfg), cfg.eval_path, "data.eval_path", cfg)[0]


def load_rows(cfg: DataConfig, key: str = "data.path") -> tuple[list[RawRow], Optional[list[RawRow]]]:
    """(training rows, separate eval rows or None when eval is to be split off the training rows).
    `key`: what names the file in messages (a source of data.sources: its entry)."""
    if cfg.source == "synthetic":
        from distft.synthetic import generate

        syn = cfg.synthetic
        try:
            rows = generate(syn.num_examples, syn.seed, list(syn.tasks))
        except ValueError as err:
            raise DataError(f"data.synthetic.tasks: {err}") from None
        train, split_eval = [RawRow(r, f"synthetic row {i}") for i, r in enumerate(rows)], None
    else:
        train, split_eval = _read(cfg.source, cfg.path, key, cfg)
    if cfg.eval_path:
        return train, read_eval_path(cfg)
    return train, split_eval


def data_file_problem(key: str, path: str, source: str) -> Optional[str]:
    """Why `path` cannot be data.source's input, judged from its file type, its size and a trial
    open, or None (also when it does not exist: each caller words that itself). `_read` asks the
    same in every rank that preflight asked on the launching machine, so both say the same thing.

    Nothing is read and nothing blocks: a named pipe, a device or a socket is refused before it is
    opened (opening a FIFO waits for a writer; and every rank reads the data, again on resume, so a
    stream would be drained by the first reader). Root is not exempt from every denial (a directory
    on NFS with root squash, a write-only /sys file), hence the trial open rather than os.access."""

    try:
        mode = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return (f"{key}={path!r} cannot be reached: permission denied on a directory on its way; make the "
                "directories above it searchable (chmod a+x) by the user running distft, or move the file")
    except OSError as err:
        return f"{key}={path!r} cannot be read ({err.strerror}); check the file system it is on"
    if source == "hf_disk":
        if not stat.S_ISDIR(mode.st_mode):
            return f"{key}={path!r} is a file; data.source=hf_disk reads a save_to_disk directory"
    elif stat.S_ISDIR(mode.st_mode):
        return f"{key}={path!r} is a directory; data.source={source} reads one file"
    elif not stat.S_ISREG(mode.st_mode):
        kinds = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                 (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
        kind = next((name for test, name in kinds if test(mode.st_mode)), "a special file")
        return (f"{key}={path!r} is {kind}, not a regular file: every rank reads the data, and again on resume; "
                f"save it to a file and set {key} to that file")
    elif mode.st_size == 0:
        return f"{key}={path!r} is empty (0 bytes); set {key} to the file that holds the data"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except PermissionError:
        return (f"{key}={path!r} cannot be read: permission denied; make it readable by the user running "
                f"distft (chmod a+r {path}) or run as its owner")
    except OSError as err:
        return f"{key}={path!r} cannot be opened ({err.strerror}); check the file and the file system it is on"
    return None


def _hub_fingerprint(name: str, cfg: DataConfig, key: str) -> dict:
    """A Hub dataset by what datasets made of it: the fingerprints of its splits (they follow the
    dataset's revision and data files), its size; loaded from the datasets cache once downloaded."""
    import hashlib

    data = load_hub(name, cfg, key)
    digest = hashlib.sha256(json.dumps({k: v._fingerprint for k, v in data.items()}, sort_keys=True).encode())
    size = sum(int(v.data.nbytes) for v in data.values())
    return {"path": f"{name} (Hub, config {cfg.hub_config}, revision {cfg.hub_revision or 'main'})",
            "bytes": size, "sha256": digest.hexdigest()}


def data_fingerprint(cfg: DataConfig) -> dict:
    """What a run's data files are, by content: `{key: {"path", "bytes", "sha256"}}` for
    data.path and data.eval_path (a `hf_disk` directory: every file in it, by relative name).
    Empty for the synthetic data, which the config alone defines. Stored with every checkpoint
    and in summary.json, so a run is never resumed (or called complete) on other data than it
    trained on (distft.checkpoint.data_changes)."""
    import hashlib

    files = [(p.key, p.cfg.path, p.cfg) for p in parts(cfg) if p.cfg.source != "synthetic"]
    files.append(("data.eval_path", cfg.eval_path, cfg))
    found = {}
    for key, path, part in files:
        if not path:
            continue
        if part.source == "hub" and key != "data.eval_path" and not os.path.exists(os.path.expanduser(path)):
            found[key] = _hub_fingerprint(path, part, key)
            continue
        path = os.path.abspath(os.path.expanduser(path))
        files = ([os.path.join(root, name) for root, _, names in sorted(os.walk(path)) for name in sorted(names)]
                 if os.path.isdir(path) else [path])
        digest, size = hashlib.sha256(), 0
        for name in files:
            if len(files) > 1:
                digest.update(os.path.relpath(name, path).encode() + b"\0")
            try:
                with open(name, "rb") as f:
                    while chunk := f.read(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
            except OSError as err:
                raise DataError(f"{key}={path} could not be read ({err.strerror or err}); check the file") from None
        found[key] = {"path": path, "bytes": size, "sha256": digest.hexdigest()}
    return found
