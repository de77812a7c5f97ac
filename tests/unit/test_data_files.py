"""Bad data files: each is either read with every good row kept and counted, or refused with one
line naming the key, the file (and the byte offset or line where one applies) and the fix; in
the loader (which runs in every rank) and, for what a stat and a trial open can tell, in preflight.
Real files, a real FIFO, a real unprivileged process; nothing may hang or raise a traceback.

The tests that start a process: tests/cli/test_data_files.py."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
from pathlib import Path

import pytest

from distft.config import Config, DataConfig
from distft.data.pipeline import DataError, load_rows, prepare_data, tokenize_row
from distft.model.build import build_offline_tokenizer
from distft.preflight import path_problems

BOM = b"\xef\xbb\xbf"


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": "Count the letters.", "input": "x" * (i % 5 + 1), "output": str(i)}
            for i in range(start, start + n)]


def jsonl(records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def csv_bytes(records, eol: bytes = b"\n") -> bytes:
    lines = [b"instruction,input,output"] + [f"{r['instruction']},{r['input']},{r['output']}".encode() for r in records]
    return b"".join(line + eol for line in lines)


def parquet_bytes(records) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), out)
    return out.getvalue()


GOOD = {"jsonl": jsonl, "json": lambda r: json.dumps(r).encode(), "csv": csv_bytes, "parquet": parquet_bytes}


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def values(raw) -> list:
    return [r.value for r in raw]


def cfg_for(path, source="jsonl", **kw) -> DataConfig:
    kw.setdefault("template", "alpaca_short")
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(source=source, path=path, **kw)


@pytest.fixture(scope="module")
def tok():
    return build_offline_tokenizer()


@contextlib.contextmanager
def deadline(seconds: int):
    """A read that blocks (a FIFO with no writer) fails the test instead of hanging the suite."""

    def expire(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refusal(cfg: DataConfig) -> str:
    with deadline(10), pytest.raises(DataError) as err:
        load_rows(cfg)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------
# Read: every good row kept


def test_a_utf8_byte_order_mark_is_skipped_in_every_text_format(tmp_path, tok):
    good = rows(3)
    files = {
        "jsonl": write(tmp_path / "bom.jsonl", BOM + jsonl(good)),
        "json": write(tmp_path / "bom.json", BOM + json.dumps(good, indent=1).encode()),
        "csv": write(tmp_path / "bom.csv", BOM + csv_bytes(good)),
    }
    for source, path in files.items():
        train, _ = load_rows(cfg_for(path, source))
        assert values(train) == good, source
    lines_as_json = write(tmp_path / "lines.json", BOM + jsonl(good))  # JSON Lines saved as .json
    assert values(load_rows(cfg_for(lines_as_json, "json"))[0]) == good
    # `cat a.jsonl b.jsonl`, both with a mark: the second one starts line 4
    joined = write(tmp_path / "joined.jsonl", BOM + jsonl(good) + BOM + jsonl(rows(2, start=3)))
    train, _ = load_rows(cfg_for(joined))
    assert values(train) == good + rows(2, start=3)
    assert train[3].where == f"row 3 (line 4) of {joined}"
    # as data.eval_path too, and through the whole pipeline
    data = prepare_data(cfg_for(files["jsonl"], eval_path=write(tmp_path / "eval.jsonl", BOM + jsonl(rows(2, 10)))), tok)
    assert (data.report.loaded, data.report.malformed, data.report.train, data.report.eval) == (5, 0, 3, 2)


def test_bytes_that_are_not_utf8_make_one_malformed_row_with_their_byte_offset(tmp_path, tok):
    good = rows(3)
    latin1 = {"instruction": "Caf\xe9 au lait", "input": "", "output": "yes"}  # é as Latin-1: byte 0xe9
    files = {
        "jsonl": jsonl([good[0], json.dumps(latin1, ensure_ascii=False).encode("latin-1"), good[1], good[2]]),
        "json": json.dumps([good[0], latin1, good[1], good[2]], ensure_ascii=False, indent=1).encode("latin-1"),
        "csv": csv_bytes([good[0], latin1, good[1], good[2]]).replace("é".encode(), b"\xe9"),
    }
    for source, data in files.items():
        path = write(tmp_path / f"latin1.{source}", data)
        offset = data.index(b"\xe9")
        train, _ = load_rows(cfg_for(path, source))
        assert [v for v in values(train) if isinstance(v, dict)] == good, source
        report = prepare_data(cfg_for(path, source), tok).report
        assert (report.loaded, report.malformed, report.kept) == (4, 1, 3), source
        message = refusal_of_rows(cfg_for(path, source, on_bad_rows="fail"), tok)
        line = {"jsonl": " (line 2)", "json": "", "csv": " (line 3)"}[source]
        assert f"row 1{line} of {path} is malformed" in message, message
        assert f"not valid UTF-8: byte 0xe9 at byte offset {offset}" in message, (source, message)
        assert message.endswith("data.on_bad_rows=drop to skip such rows (they are counted in the data report)")
    # in the middle of a .jsonl line, with a BOM first: the offset counts the mark
    data = BOM + jsonl([good[0]]) + b'{"instruction": "a\xffb", "output": "c"}\n' + jsonl([good[1]])
    path, offset = write(tmp_path / "mid.jsonl", data), data.index(b"\xff")
    assert f"byte 0xff at byte offset {offset}" in values(load_rows(cfg_for(path))[0])[1].reason


def refusal_of_rows(cfg: DataConfig, tok) -> str:
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tok)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_crlf_and_lone_cr_line_endings_keep_every_row(tmp_path):
    good = rows(3)
    for eol in (b"\r\n", b"\r"):
        name = "crlf" if eol == b"\r\n" else "cr"
        path = write(tmp_path / f"{name}.jsonl", jsonl(good).replace(b"\n", eol))
        train, _ = load_rows(cfg_for(path))
        assert values(train) == good, name
        assert train[2].where == f"row 2 (line 3) of {path}", name
        path = write(tmp_path / f"{name}.csv", csv_bytes(good, eol))
        assert values(load_rows(cfg_for(path, "csv"))[0]) == good, name
        path = write(tmp_path / f"{name}.json", json.dumps(good, indent=1).encode().replace(b"\n", eol))
        assert values(load_rows(cfg_for(path, "json"))[0]) == good, name


def test_nul_bytes_and_lone_surrogates_are_malformed_rows_not_crashes(tmp_path, tok):
    good = rows(3)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\udfff"}]}
    lines = [good[0], b'{"instruction": "a\x00", "output": "b"}', b'{"instruction": "half \\ud800 pair", "output": "b"}',
             good[1], json.dumps(chat).encode(), good[2]]
    path = write(tmp_path / "odd.jsonl", jsonl(lines))
    report = prepare_data(cfg_for(path), tok).report
    assert (report.loaded, report.malformed, report.kept) == (6, 3, 3)
    message = refusal_of_rows(cfg_for(write(tmp_path / "sur.jsonl", jsonl([good[0], lines[2]])), on_bad_rows="fail"), tok)
    assert "row 1 (line 2) of" in message and "lone surrogate \\ud800" in message
    data = csv_bytes(good).replace(b"xx,1", b"x\x00x,1")
    path = write(tmp_path / "nul.csv", data)
    report = prepare_data(cfg_for(path, "csv"), tok).report
    assert (report.loaded, report.malformed, report.kept) == (3, 1, 2)
    message, offset = refusal_of_rows(cfg_for(path, "csv", on_bad_rows="fail"), tok), data.index(b"\x00")
    assert f"row 1 (line 3) of {path} is malformed: holds a NUL byte at byte offset {offset}" in message


def test_json_that_is_not_a_list_of_objects(tmp_path, tok):
    good = rows(2)
    path = write(tmp_path / "mixed.json", json.dumps([1, good[0], "text", None, good[1]]).encode())
    train, _ = load_rows(cfg_for(path, "json"))
    assert [v for v in values(train) if isinstance(v, dict)] == good
    report = prepare_data(cfg_for(path, "json"), tok).report
    assert (report.loaded, report.malformed, report.kept) == (5, 3, 2)
    message = refusal_of_rows(cfg_for(path, "json", on_bad_rows="fail"), tok)
    assert f"row 0 of {path} is malformed: a JSON number, expected an object" in message
    for text, kind in (("{}", "object"), ("null", "null"), ("7", "number"), ('"rows"', "string")):
        message = refusal(cfg_for(write(tmp_path / "scalar.json", text.encode()), "json"))
        assert f"holds a JSON {kind}, not a list of rows" in message, message


def test_no_rows_left_names_the_file_and_why_the_first_was_dropped(tmp_path, tok):
    path = write(tmp_path / "wrong_fields.jsonl", jsonl([{"question": "q", "answer": str(i)} for i in range(3)]))
    message = refusal_of_rows(cfg_for(path), tok)
    assert message.startswith(f"no training rows left after cleaning data.path={path}: data: loaded 3 rows")
    assert f"; the first, row 0 (line 1) of {path}, is malformed: none of the fields" in message
    train = write(tmp_path / "train.jsonl", jsonl(rows(3)))
    eval_path = write(tmp_path / "eval.jsonl", jsonl(rows(2)))  # both repeat training rows
    message = refusal_of_rows(cfg_for(train, eval_path=eval_path), tok)
    assert message.startswith(f"no eval rows left after cleaning data.eval_path={eval_path}: ")
    assert f"the first, row 0 (line 1) of {eval_path}, is duplicate" in message


class CountingTokenizer:
    """The real tokenizer, noting how many characters each encoding call was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, []

    def encode(self, text, **kw):
        self.encoded.append(len(text))
        return self.tokenizer.encode(text, **kw)

    def __call__(self, text, **kw):
        self.encoded.append(len(text))
        return self.tokenizer(text, **kw)

    def __len__(self):
        return len(self.tokenizer)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_row_is_dropped_or_cut_without_encoding_all_of_it(tmp_path, tok):
    huge = {"instruction": "Repeat.", "input": "", "output": "ab " * 200_000}  # 600k characters, one line
    path = write(tmp_path / "huge.jsonl", jsonl([rows(1)[0], huge, rows(1, start=1)[0]]))
    counting = CountingTokenizer(tok)
    report = prepare_data(cfg_for(path, max_seq_len=128), counting).report
    assert (report.loaded, report.overlong, report.kept) == (3, 1, 2)
    assert max(counting.encoded) < 20_000  # a prefix, not the 600k characters
    message = refusal_of_rows(cfg_for(path, max_seq_len=128, on_bad_rows="fail"), tok)
    assert "row 1 (line 2)" in message and "is overlong: more than data.max_seq_len=128 tokens" in message
    # cut instead of dropped: exactly the first 128 tokens of the whole encoding
    cut = prepare_data(cfg_for(path, max_seq_len=128, drop_overlong=False, packing=False), tok)
    whole = tokenize_row(huge, "alpaca", cfg_for(path, max_seq_len=10**9), tok)
    assert cut.report.truncated == 1
    assert cut.train[1] == {k: v[:128] for k, v in whole.items()}
    # a cell longer than csv's default limit (128 KiB) is a row like any other
    data = csv_bytes(rows(2)).replace(b",x,", b"," + b"y" * 200_000 + b",", 1)
    train, _ = load_rows(cfg_for(write(tmp_path / "big_cell.csv", data), "csv"))
    assert len(train) == 2 and len(train[0].value["input"]) == 200_000


# ------------------------------------------------------------------------------------------------
# Refused: one line naming the key, the file and the fix

WHOLE_FILE = [  # (id, source, content, what the message says)
    ("empty-jsonl", "jsonl", b"", "is empty (0 bytes); set {key} to the file that holds the data"),
    ("empty-json", "json", b"", "is empty (0 bytes)"),
    ("empty-csv", "csv", b"", "is empty (0 bytes)"),
    ("empty-parquet", "parquet", b"", "is empty (0 bytes)"),
    ("blank-lines-jsonl", "jsonl", b"\n  \r\n\n", "holds no rows"),
    ("empty-list-json", "json", b"[ ]\n", "holds no rows"),
    ("header-only-csv", "csv", b"instruction,input,output\n", "holds no rows"),
    ("utf16-jsonl", "jsonl", jsonl(rows(2)).decode().encode("utf-16"), "is UTF-16 or UTF-32 text"),
    ("utf16-csv", "csv", csv_bytes(rows(2)).decode().encode("utf-16"), "save it as UTF-8, e.g. iconv -f UTF-16"),
    ("missing-comma-json", "json", b'[{"instruction": "a", "output": "b"}\n {"instruction": "c", "output": "d"}]',
     "is not valid JSON: Expecting ',' delimiter at line 2 column 2 (byte offset 38); fix it"),  # where the 2nd { is
    ("bad-byte-in-json-syntax", "json", b'[{"instruction": "a", "output": "b"},\xff]',
     "is not valid JSON: byte 0xff is not UTF-8 at line 1 column 38 (byte offset 37)"),
    ("bad-byte-in-csv-header", "csv", b"instr\xffuction,input,output\na,b,c\n",
     "the header line is not valid UTF-8: byte 0xff at byte offset 5; save the file as UTF-8"),
    ("unclosed-csv-quote", "csv", b'instruction,input,output\na,"b,c\nd,e,f\ng,h,i\n',
     "the quoted field opened in row 0 (line 2, column 2 'input') is never closed, so the rest of the file (3 lines "
     "from there) would be read as one cell; close the quote"),
    # Issue 34: a quote left open on the last line (one line, no further quote) was one malformed row.
    ("unclosed-csv-quote-last-line", "csv", b'instruction,input,output\na,b,c\nd,e,"f\n',
     "the quoted field opened in row 1 (line 3, column 3 'output') is never closed, so the rest of the file (1 "
     "line from there)"),
    # An inner quote not doubled: csv (not strict) closed the field there and glued on what followed, quotes lost.
    ("csv-text-after-closing-quote", "csv", b'instruction,input,output\na,b,c\nd,"He said "hi" twice",f\n',
     "the quoted field opened in row 1 (line 3, column 2 'input') closes on line 3 and text follows its closing "
     'quote; write a quote inside a quoted field as two ("")'),
    ("csv-quote-closed-lines-later", "csv", b'instruction,input,output\na,"b,c\nd,e,f\ng,"h,i\n',
     "the quoted field opened in row 0 (line 2, column 2 'input') closes on line 4 and text follows"),
    ("csv-header-unclosed-quote", "csv", b'instruction,"input,output\na,b,c\n',
     "the quoted field opened in the header (line 1, column 2) is never closed"),
    # Two columns of one name: DictReader kept the second cell and dropped the first without a word.
    ("csv-duplicate-column", "csv", b"instruction,output,output\na,b,c\n",
     "the header (line 1) names column 3 'output', like column 2; DictReader would keep one of the two cells, so "
     "give every column its own name"),
    ("not-parquet", "parquet", b"PAR1 but not really", "is not a readable parquet file"),
    ("directory", "jsonl", "dir", "is a directory; data.source=jsonl reads one file"),
    ("fifo", "jsonl", "fifo", "is a named pipe (FIFO), not a regular file"),
    ("device", "csv", "/dev/null", "is a character device, not a regular file"),
    ("missing", "json", "missing", "does not exist"),
]


def make(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content == "/dev/null":
        return "/dev/null"
    elif content != "missing":
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("source,content,says", [case[1:] for case in WHOLE_FILE], ids=[case[0] for case in WHOLE_FILE])
def test_a_bad_file_is_one_message_naming_the_key_and_the_file(tmp_path, source, content, says):
    bad = make(tmp_path, f"bad.{source}", content)
    good = write(tmp_path / f"good.{source}", GOOD[source](rows(3)))
    for key, cfg in (("data.path", cfg_for(bad, source)), ("data.eval_path", cfg_for(good, source, eval_path=bad))):
        message = refusal(cfg)
        assert message.startswith((f"{key}={bad}", f"{key}={bad!r}")), message
        assert says.format(key=key) in message, message


def test_preflight_refuses_what_the_loader_would_before_anything_starts(tmp_path):
    good = write(tmp_path / "good.jsonl", jsonl(rows(3)))
    fifo, empty = make(tmp_path, "fifo.jsonl", "fifo"), write(tmp_path / "empty.jsonl", b"")

    def problems(source="jsonl", path=good, eval_path=None) -> list[str]:
        data = DataConfig(source=source, path=path, eval_path=eval_path)
        with deadline(10):
            return path_problems(dataclasses.replace(Config(), data=data))

    assert problems() == []
    assert problems(path=fifo, eval_path="/dev/null") == [
        f"data.path={fifo!r} is a named pipe (FIFO), not a regular file: every rank reads the data, and again on "
        "resume; save it to a file and set data.path to that file",
        "data.eval_path='/dev/null' is a character device, not a regular file: every rank reads the data, and again "
        "on resume; save it to a file and set data.eval_path to that file",
    ]
    assert problems(eval_path=empty) == [
        f"data.eval_path={empty!r} is empty (0 bytes); set data.eval_path to the file that holds the data"]
    assert problems("hf_disk", path=good) == [
        f"data.path={good!r} is a file; data.source=hf_disk reads a save_to_disk directory"]


def test_an_eval_file_beside_synthetic_data_is_checked_before_anything_starts(tmp_path):
    """data.eval_path with the synthetic source is read (as JSON Lines), so preflight checks it too."""
    from distft.preflight import preflight

    missing, fifo = str(tmp_path / "missing.jsonl"), str(tmp_path / "pipe.jsonl")
    os.mkfifo(fifo)
    for path, expected in ((missing, "does not exist"), (fifo, "is a named pipe (FIFO), not a regular file")):
        _, errors = preflight([f"data.eval_path={path}"])
        assert len(errors) == 1 and errors[0].startswith(f"data.eval_path={path!r}") and expected in errors[0], errors


def dataset_with_a_pipe(tmp_path: Path) -> tuple[str, str]:
    """(a save_to_disk directory, the named pipe planted in it)."""
    from datasets import Dataset

    directory = tmp_path / "dataset"
    Dataset.from_list(rows(12)).save_to_disk(str(directory))
    os.mkfifo(directory / "extra.arrow")
    return str(directory), str(directory / "extra.arrow")


def test_the_loader_and_the_fingerprint_refuse_a_pipe_in_a_dataset_directory(tmp_path):
    """What ranks ask of an hf_disk directory (load_rows) and what the cache key and checkpoints
    record of it (data_fingerprint) refuse a planted FIFO without opening it; a link to a regular
    file is followed, as the user's own data path may be one."""
    from distft.data.sources import data_fingerprint

    directory, pipe = dataset_with_a_pipe(tmp_path)
    cfg = cfg_for(directory, "hf_disk")
    expected = f"data.path={directory!r} holds {pipe}, a named pipe (FIFO), not a regular file"
    assert refusal(cfg).startswith(expected)
    with deadline(10), pytest.raises(DataError, match=re.escape(expected)):
        data_fingerprint(cfg)
    os.remove(pipe)
    before = data_fingerprint(cfg)["data.path"]
    link = tmp_path / "linked.jsonl"
    link.symlink_to(write(tmp_path / "real.jsonl", jsonl(rows(3))))
    assert data_fingerprint(cfg_for(str(link)))["data.path"]["bytes"] == len(jsonl(rows(3)))
    assert values(load_rows(cfg_for(str(link)))[0]) == rows(3)
    os.mkfifo(tmp_path / "dataset" / "late.arrow")
    with deadline(10), pytest.raises(DataError, match="late.arrow, a named pipe"):
        data_fingerprint(cfg)
    os.remove(tmp_path / "dataset" / "late.arrow")
    assert data_fingerprint(cfg)["data.path"] == before


def test_a_dataset_with_no_held_out_rows_is_one_message_before_training(tmp_path):
    """hf_disk with only a train split and data.eval_fraction=0 passes validation (the dataset's own
    validation split could have served), but leaves nothing to score: one DataError, not a
    traceback from the evaluation."""
    from datasets import Dataset

    from distft.preflight import preflight
    from distft.train import train

    Dataset.from_list(rows(12)).save_to_disk(str(tmp_path / "dd"))
    cfg, errors = preflight(["+experiment=tiny_lora", "data=hf_disk", f"data.path={tmp_path / 'dd'}",
                             "data.eval_fraction=0", f"run.root={tmp_path / 'out'}"])
    assert not errors, errors
    with pytest.raises(DataError, match="no held-out rows: .*set data.eval_size / data.eval_fraction above 0, or "
                                        "data.eval_path"):
        train(cfg)


def test_sharegpt_conversations_train_as_the_same_chat_messages(tmp_path, tok):
    """ShareGPT rows (`conversations` of `from`/`value`: human, gpt, system) give exactly the
    samples of the same conversations as `messages` (role/content): the same tokens, loss on the
    assistant turns only; an unknown speaker is a malformed row that names it and the known ones."""
    turns = [[("system", "Be brief."), ("human", f"What is {i} plus {i}?"), ("gpt", str(2 * i)),
              ("human", "And doubled?"), ("gpt", str(4 * i))] for i in range(40)]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    sharegpt = [{"id": f"c{i}", "conversations": [{"from": f, "value": v} for f, v in t]} for i, t in enumerate(turns)]
    chat = [{"id": f"c{i}", "messages": [{"role": roles[f], "content": v} for f, v in t]} for i, t in enumerate(turns)]
    bad = {"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "upon"}]}
    a = prepare_data(cfg_for(write(tmp_path / "sharegpt.jsonl", jsonl(sharegpt + [bad]))), tok)
    b = prepare_data(cfg_for(write(tmp_path / "chat.jsonl", jsonl(chat))), tok)
    assert list(a.train) + list(a.eval) == list(b.train) + list(b.eval) and len(a.train) + len(a.eval) == 40
    labels = a.train[0]["labels"]
    assert 0 < sum(label != -100 for label in labels) < len(labels)  # only the replies are targets
    assert a.report.malformed == 1 and a.report.first_dropped["malformed"].endswith(
        "conversations[0].from is 'narrator', not a ShareGPT speaker (assistant, bard, bing, chatgpt, gpt, human, "
        "model, system, user)")
