"""Loading data files: every source becomes a list of RawRow; unparsable records are kept (and later counted
as malformed) so that on_bad_rows=fail can point at the exact line. A record with bytes that are
not UTF-8 is one malformed row, with the byte offset, in every text format (a .json or .csv file
is not refused for one bad cell, as a .jsonl file is not for one bad line), and so is a JSON
record nested more than MAX_NESTING levels deep. A UTF-8 byte-order mark is skipped; a problem of
the whole file (not a regular file, unreadable, UTF-16, no rows, broken JSON, a broken CSV quote
or a CSV header naming a column twice) is one DataError naming the file.

Nothing here opens a data file, or a file of a dataset directory, that is not a regular file: a
named pipe would block the reader (`data_file_problem`, `dataset_files`, `open_data_file`). What
comes out is raw: `distft.data.pipeline` cleans, templates and tokenizes it. `data_file_problem` is also
what preflight asks on the launching machine, so both say the same thing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Optional

from distft.config import DataConfig
from distft.data.synthetic import generate
from distft.errors import DataError
from distft.files import NotAFile, file_kind, open_regular


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


MAX_NESTING = 100  # arrays and objects within each other in one row; real rows nest a few levels


def _too_deep(where: str = "") -> Unparsable:
    return Unparsable(f"arrays or objects nested more than {MAX_NESTING} levels deep{where}; distft reads rows "
                      f"nested at most {MAX_NESTING} levels (deeper ones would overflow Python's stack later)")


def nested_too_deep(value: Any) -> bool:
    """Whether `value` nests lists and dicts more than MAX_NESTING levels, walked without
    recursion. Such a row is malformed even where json.loads could parse it: copying it or
    pickling it to a tokenizing process recurses once per level and fails near 500."""
    todo = [(value, 1)] if isinstance(value, (dict, list)) else []
    while todo:
        item, depth = todo.pop()
        if depth > MAX_NESTING:
            return True
        children = item.values() if isinstance(item, dict) else item
        todo.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _brackets(text) -> int:
    """Opening brackets in `text` (bytes or str): a row nests no deeper, so most need no walk."""
    if isinstance(text, str):
        return text.count("[") + text.count("{")
    return text.count(b"[") + text.count(b"{")


def _parse_line(line: bytes, offset: int) -> Any:
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        return Unparsable(_not_utf8(line[err.start], offset + err.start))
    except json.JSONDecodeError as err:
        return Unparsable(f"invalid JSON: {err.msg} at column {err.colno}")
    except RecursionError:  # deeper than the parser goes (~1000 levels)
        return _too_deep()
    return _too_deep() if _brackets(line) > MAX_NESTING and nested_too_deep(value) else value


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
    """A JSON list of rows. Parsed whole; when a row nests deeper than the parser goes, the list is
    parsed one element at a time instead, so that such a row costs itself, not the file."""
    skip = _skip_bom(f, path, key)
    data = f.read()
    try:
        text, escaped = data.decode("utf-8"), False
    except UnicodeDecodeError:  # parse anyway: the rows holding such bytes are malformed, the others kept
        text, escaped = data.decode("utf-8", "surrogateescape"), True
    listed = text.lstrip().startswith("[")
    try:
        try:
            value = json.loads(text)
        except RecursionError:
            value = [element for _, _, element in _elements(text)] if listed else _DEEP
    except json.JSONDecodeError as err:
        if not listed:
            f.seek(0)
            return _read_jsonl(f, path, key)  # JSON Lines saved as .json
        raise _not_json(err, text, skip, path, key) from None
    if value is _DEEP:  # one record nested too deep, or JSON Lines: each line its own row
        f.seek(0)
        return _read_jsonl(f, path, key)
    if not isinstance(value, list):
        raise DataError(
            f"{key}={path} holds a JSON {json_type(value)}, not a list of rows; "
            "write a JSON list of objects (or JSON Lines with data.source=jsonl)"
        )
    rows = [RawRow(v, f"row {i} of {path}") for i, v in enumerate(value)]
    may_nest = _brackets(text) > MAX_NESTING  # else no row can: nothing to walk
    deep = [v is _DEEP or may_nest and nested_too_deep(v) for v in value]
    if escaped or any(deep):
        _mark_malformed(rows, deep, text, skip, escaped)
    return rows


_DEEP = object()  # _elements: an element nested deeper than the parser goes


def _not_json(err: json.JSONDecodeError, text: str, skip: int, path: str, key: str) -> DataError:
    at = skip + len(text[: err.pos].encode("utf-8", "surrogateescape"))
    bad = _ESCAPED_BYTE.match(text, err.pos)
    why = f"byte 0x{ord(bad.group()) - 0xDC00:02x} is not UTF-8" if bad else err.msg
    return DataError(
        f"{key}={path} is not valid JSON: {why} at line {err.lineno} column {err.colno} (byte offset {at}); "
        "fix it, or save it as JSON Lines (one object per line), where a bad record costs one row, not the file"
    )


def _mark_malformed(rows: list[RawRow], deep: list[bool], text: str, skip: int, escaped: bool) -> None:
    """Make malformed, with the line and byte offset, each row nested too deep and (`escaped`:
    the text holds bytes that are not UTF-8) each row holding such a byte."""
    where = _Locator(text, skip)
    for row, too_deep, (start, end, _) in zip(rows, deep, _elements(text)):
        bad = _ESCAPED_BYTE.search(text, start, end) if escaped else None
        if too_deep:
            line, offset = where(start)
            row.value = _too_deep(f", from line {line} (byte offset {offset})")
        elif bad:
            line, offset = where(bad.start())
            row.value = Unparsable(_not_utf8(ord(bad.group()) - 0xDC00, offset, line))


class _Locator:
    """(line, byte offset) of positions in a surrogateescape-decoded text, asked in increasing order."""

    def __init__(self, text: str, base: int):
        self.text, self.pos, self.line, self.offset = text, 0, 1, base

    def __call__(self, pos: int) -> tuple[int, int]:
        self.line += self.text.count("\n", self.pos, pos)
        self.offset += len(self.text[self.pos : pos].encode("utf-8", "surrogateescape"))
        self.pos = pos
        return self.line, self.offset


_DECODER = json.JSONDecoder()
_BRACKET_OR_QUOTE = re.compile(r'[][{}"]')
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # after the opening quote


def _elements(text: str) -> Iterator[tuple[int, int, Any]]:
    """(start, end, value) of each element of the JSON array `text`, parsed by json's decoder; an
    element nested deeper than the decoder goes is _DEEP, its end found by counting brackets
    instead (`_bracketed_end`). JSONDecodeError for what json.loads would refuse."""
    pos = _JSON_SPACE.match(text, text.index("[") + 1).end()
    while text[pos : pos + 1] != "]":
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except RecursionError:
            value, end = _DEEP, _bracketed_end(text, pos)
        yield pos, end, value
        pos = _JSON_SPACE.match(text, end).end()
        if text[pos : pos + 1] == ",":
            pos = _JSON_SPACE.match(text, pos + 1).end()
        elif text[pos : pos + 1] != "]":
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    if text[pos + 1 :].strip(" \t\n\r"):
        raise json.JSONDecodeError("Extra data", text, _JSON_SPACE.match(text, pos + 1).end())


def _bracketed_end(text: str, pos: int) -> int:
    """Where the array or object opening at `pos` closes, found without recursion (brackets counted
    outside strings), so that one nested 100,000 deep still has an end; what is inside is not
    checked: the row is malformed anyway."""
    depth = 0
    while True:
        found = _BRACKET_OR_QUOTE.search(text, pos)
        if found is None:
            raise json.JSONDecodeError("Expecting ']' or '}' to close what opens", text, len(text))
        pos = found.end()
        if found.group() == '"':
            rest = _STRING_REST.match(text, pos)
            if rest is None:
                raise json.JSONDecodeError("Unterminated string starting at", text, pos - 1)
            pos = rest.end()
        elif found.group() in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos


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
    default 128 KiB would refuse the file for one long document). Read strictly: a quote left open
    (it swallows every line after it) or text after a closing quote (an inner quote not doubled)
    would silently shift cells between columns and rows, so either refuses the file, naming the
    line and the column (`_csv_error`), as does a column name that the header repeats."""
    skip = _skip_bom(f, path, key)
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    consumed: list[tuple[int, str]] = []  # (byte offset, text) of the lines read since the last record

    def lines():
        at = skip
        for line in text:
            consumed.append((at, line))
            at += len(line.encode("utf-8", "surrogateescape"))
            yield line

    reader = csv.DictReader(lines(), restkey="__extra__", restval=_MISSING_CELL, strict=True)
    rows: list[RawRow] = []
    header: Optional[list[str]] = None
    limit = csv.field_size_limit(2**31 - 1)
    try:
        header = _read_csv_header(reader, consumed, path, key)
        consumed.clear()
        for i, record in enumerate(reader):
            problem = _bad_csv_text(consumed)
            consumed.clear()
            if problem is None and ("__extra__" in record or any(v is _MISSING_CELL for v in record.values())):
                problem = f"wrong number of columns for the header {reader.fieldnames}"
            rows.append(RawRow(Unparsable(problem) if problem else record, f"row {i} (line {reader.line_num}) of {path}"))
    except csv.Error as err:
        record = "the header" if header is None else f"row {len(rows)}"
        # reader.reader counts the lines read so far (DictReader's own count stops at the last record).
        first_line = reader.reader.line_num - len(consumed) + 1
        raise _csv_error(err, consumed, first_line, record, header, path, key) from None
    finally:
        csv.field_size_limit(limit)
        text.detach()
    return rows


def _read_csv_header(reader: csv.DictReader, consumed: list[tuple[int, str]], path: str, key: str) -> list[str]:
    """The column names: refused when the header is not text or names a column twice (DictReader
    would keep the last of the two cells and drop the other without a word)."""
    names = reader.fieldnames or []
    problem = _bad_csv_text(consumed)
    if problem:
        raise DataError(f"{key}={path}: the header line is {problem}")
    first: dict[str, int] = {}
    for column, name in enumerate(names, 1):
        if name in first and name.strip():  # unnamed columns (a spreadsheet's trailing commas) are read by no one
            raise DataError(f"{key}={path}: the header (line {reader.line_num}) names column {column} {name!r}, "
                            f"like column {first[name]}; DictReader would keep one of the two cells, so give "
                            "every column its own name")
        first.setdefault(name, column)
    return list(names)


_CSV_MARK = re.compile(r'[",\r\n]')


def _csv_error(err: csv.Error, consumed: list[tuple[int, str]], first_line: int, record: str,
               fieldnames: Optional[list], path: str, key: str) -> DataError:
    """The DataError for csv's strict-mode error in the record read from `consumed` (its physical
    lines, the first being line `first_line`): where the broken quoted field opens and why."""
    found = _broken_quote("".join(line for _, line in consumed))
    if found is None:
        return DataError(f"{key}={path} line {first_line + max(len(consumed) - 1, 0)} is not CSV ({err}); fix that line")
    column, opened, closed = found
    name = f" {fieldnames[column]!r}" if fieldnames and column < len(fieldnames) else ""
    line = first_line + _line_index(consumed, opened)
    where = f"{record} (line {line}, column {column + 1}{name})"
    if closed is None:
        rest = first_line + len(consumed) - line
        return DataError(
            f"{key}={path}: the quoted field opened in {where} is never closed, so the rest of the file ({rest} "
            f"line{'' if rest == 1 else 's'} from there) would be read as one cell; close the quote, or write a "
            'quote inside a quoted field as two ("")')
    return DataError(
        f"{key}={path}: the quoted field opened in {where} closes on line {first_line + _line_index(consumed, closed)} "
        f"and text follows its closing quote; write a quote inside a quoted field as two (\"\"), or quote the whole "
        "cell")


def _broken_quote(text: str) -> Optional[tuple[int, int, Optional[int]]]:
    """(column index, position of its opening quote, position of its closing quote or None when
    it never closes) of the first quoted field of CSV `text` that is broken: never closed, or
    closed and followed by text rather than a comma or the line's end. As csv reads it: a quote
    opens a quoted field only as the field's first character, and "" inside it is a quote."""
    column, field_start, pos = 0, 0, 0
    while (found := _CSV_MARK.search(text, pos)) is not None:
        at = found.start()
        if found.group() != '"':
            column = column + 1 if found.group() == "," else 0
            field_start = pos = at + 1
            continue
        pos = at + 1
        if at != field_start:
            continue  # a quote inside an unquoted field is text
        closed = _closing_quote(text, at + 1)
        if closed is None or text[closed + 1 : closed + 2] not in ("", ",", "\r", "\n"):
            return column, at, closed
        pos = closed + 1
    return None


def _closing_quote(text: str, pos: int) -> Optional[int]:
    while (quote := text.find('"', pos)) >= 0:
        if text[quote + 1 : quote + 2] != '"':
            return quote
        pos = quote + 2
    return None


def _line_index(lines: list[tuple[int, str]], pos: int) -> int:
    """Which of `lines` (joined) holds character `pos`."""
    for index, (_, line) in enumerate(lines):
        if pos < len(line):
            return index
        pos -= len(line)
    return max(len(lines) - 1, 0)


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
        problem = data_file_problem(key, os.path.expanduser(path), source)  # a local dataset directory's files
        if problem:
            raise DataError(problem)
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
        with open_data_file(key, path, source) as f:
            rows, split_eval = _READERS[source](f, path, key), None
    if not rows:
        what = "an empty dataset" if source == "hf_disk" else (
            f"{os.path.getsize(path)} bytes: only blank lines, an empty list, a header line or an empty table")
        raise DataError(f"{key}={path} holds no rows ({what}); set {key} to the file that holds the data")
    return rows, split_eval


@contextlib.contextmanager
def open_data_file(key: str, path: str, source: str) -> Iterator[IO[bytes]]:
    """`path` opened for reading only if it is a regular file (`files.open_regular`: non-blocking,
    then fstat, so a file swapped for a pipe after `data_file_problem` looked still cannot block;
    links followed: the user's own path may be one). A failure is one DataError naming `key`."""
    try:
        f = open_regular(path, "rb", follow_links=True)
    except NotAFile as err:
        raise DataError(data_file_problem(key, path, source) or f"{key}={path!r}: {err}") from None
    except OSError as err:
        raise DataError(f"{key}={path} could not be read ({err.strerror or err}); check the file") from None
    with f:
        try:
            yield f
        except OSError as err:  # checked when opened, so a failing disk
            raise DataError(f"{key}={path} could not be read ({err.strerror or err}); check the file") from None


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
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            errors.append(f"{key}.weight={weight!r} must be a finite number > 0, such as 1 or 2.5 (its share of each "
                          "epoch is weight / sum of the weights)")
        if "source" in spec and spec["source"] not in DATA_READERS:
            errors.append(f"{key}.source={spec['source']!r} is not one of {', '.join(DATA_READERS)}")
    weights = [s.get("weight", 1.0) for s in cfg.sources if isinstance(s, dict)]
    if not errors and not math.isfinite(sum(weights)):  # each finite, the sum not: shares would be nan
        errors.append(f"data.sources: the weights sum to {sum(weights)}; scale them down (only their ratios count)")
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
    stream would be drained by the first reader). A dataset directory (hf_disk, or a local `hub`
    one) is refused for any such file in it, since datasets opens them all. Root is not exempt
    from every denial (a directory on NFS with root squash, a write-only /sys file), hence the
    trial open rather than os.access."""

    try:
        mode = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError:
        return (f"{key}={path!r} cannot be reached: permission denied on a directory on its way; make the "
                "directories above it searchable (chmod a+x) by the user running distft, or move the file")
    except OSError as err:
        return f"{key}={path!r} cannot be read ({err.strerror}); check the file system it is on"
    if stat.S_ISDIR(mode.st_mode):
        if source in ("hf_disk", "hub"):
            return dataset_files(key, path)[1]
        return f"{key}={path!r} is a directory; data.source={source} reads one file"
    if source == "hf_disk":
        return f"{key}={path!r} is a file; data.source=hf_disk reads a save_to_disk directory"
    if not stat.S_ISREG(mode.st_mode):
        return (f"{key}={path!r} is {file_kind(mode.st_mode)}, not a regular file: every rank reads the data, and "
                f"again on resume; save it to a file and set {key} to that file")
    if mode.st_size == 0:
        return f"{key}={path!r} is empty (0 bytes); set {key} to the file that holds the data"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except PermissionError:
        return (f"{key}={path!r} cannot be read: permission denied; make it readable by the user running "
                f"distft (chmod a+r {path}) or run as its owner")
    except OSError as err:
        return f"{key}={path!r} cannot be opened ({err.strerror}); check the file and the file system it is on"
    return None


def dataset_files(key: str, directory: str) -> tuple[list[str], Optional[str]]:
    """(every file below a dataset directory, in the fingerprint's order: by folder, then name;
    why the directory cannot be read, or None). Links are followed, as datasets follows them, each
    real folder once; anything but a regular file or a folder (a named pipe would block datasets,
    and the fingerprint, on its first read) is refused, naming it."""
    files: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    folders = [directory]
    while folders:
        folder = folders.pop()
        try:
            info = os.stat(folder)
            names = os.listdir(folder)
        except OSError as err:
            return [], f"{key}={directory!r}: {folder} cannot be read ({err.strerror}); check the dataset directory"
        if (info.st_dev, info.st_ino) in seen:  # a link back to a folder already walked
            continue
        seen.add((info.st_dev, info.st_ino))
        for name in names:
            path = os.path.join(folder, name)
            try:
                mode = os.stat(path).st_mode
            except OSError as err:  # a dangling link, a link loop
                return [], f"{key}={directory!r} holds {path}, which cannot be read ({err.strerror}); remove it"
            if stat.S_ISDIR(mode):
                folders.append(path)
            elif stat.S_ISREG(mode):
                files.append((folder, name))
            else:
                return [], (f"{key}={directory!r} holds {path}, {file_kind(mode)}, not a regular file: datasets reads "
                            "every file of a dataset directory; remove it from there")
    return [os.path.join(folder, name) for folder, name in sorted(files)], None


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
    trained on (distft.checkpoint.store.data_changes)."""
    files = [(p.key, p.cfg.path, p.cfg.source, p.cfg) for p in parts(cfg) if p.cfg.source != "synthetic"]
    files.append(("data.eval_path", cfg.eval_path, eval_reader(cfg), cfg))
    found = {}
    for key, path, source, part in files:
        if not path:
            continue
        if source == "hub" and key != "data.eval_path" and not os.path.exists(os.path.expanduser(path)):
            found[key] = _hub_fingerprint(path, part, key)
            continue
        found[key] = _content_fingerprint(key, os.path.abspath(os.path.expanduser(path)), source)
    return found


def _content_fingerprint(key: str, path: str, source: str) -> dict:
    """sha256 and size of a data file, or of every file of a dataset directory (with its relative
    name). Checked first as the loader checks it (`data_file_problem`: no pipe in the directory
    either), then each file opened only if it still is a regular file: nothing here blocks."""
    import hashlib

    problem = data_file_problem(key, path, source)
    if problem:
        raise DataError(problem)
    names = dataset_files(key, path)[0] if os.path.isdir(path) else [path]
    digest, size = hashlib.sha256(), 0
    for name in names:
        if len(names) > 1:
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        try:
            with open_regular(name, "rb", follow_links=True) as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as err:  # NotAFile too: swapped for a pipe since it was looked at
            raise DataError(f"{key}={path} could not be read ({err.strerror or err}); check the file") from None
    return {"path": path, "bytes": size, "sha256": digest.hexdigest()}
