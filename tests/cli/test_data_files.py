"""Bad data files through processes: a row pickled to a tokenizing process (data.num_proc=2), an
unreadable file as an unprivileged process sees it, and `python -m distft` / `python -m distft.data`
refusing a Latin-1 file and a named pipe in one line, without blocking.

The in-process tests: tests/unit/test_data_files.py."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from distft.config import Config
from distft.data.pipeline import DataError, load_rows, prepare_data
from distft.data.sources import Unparsable
from distft.preflight import path_problems
from tests.unit import test_data_files as unit
from tests.unit.test_data_files import (
    cfg_for,
    dataset_with_a_pipe,
    deadline,
    jsonl,
    refusal,
    refusal_of_rows,
    rows,
    values,
    write,
)

tok = unit.tok  # tests/unit/test_data_files.py's module-scoped fixture, set up again for this module

REPO = Path(__file__).resolve().parents[2]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_a_row_nested_too_deep_is_one_malformed_row_with_its_line(tmp_path, tok):
    """Issue 34: 100,000 nested brackets, even in a field no template reads, ended the run with a
    RecursionError from json's parser (the whole .json file with it), and 600 levels, which json
    parses, with one when the row was pickled to a tokenizing process (num_proc=2). Each such row
    is now one malformed row, counted, with its line; the other rows are kept."""
    good = rows(4)
    records = [json.dumps(good[0]), json.dumps({**good[1], "junk": 0}).replace("0}", nested(100_000) + "}"),
               json.dumps(good[2]), json.dumps({**good[3], "junk": 0}).replace("0}", nested(600) + "}"),
               json.dumps({"instruction": "q", "output": "a", "ok": 0}).replace("0}", nested(99) + "}")]
    jsonl_path = write(tmp_path / "deep.jsonl", "\n".join(records).encode() + b"\n")
    json_text = "[\n" + ",\n".join(records) + "\n]\n"
    json_path = write(tmp_path / "deep.json", json_text.encode())
    reason = "is malformed: arrays or objects nested more than 100 levels deep"
    for path, source, num_proc in ((jsonl_path, "jsonl", 2), (json_path, "json", 1)):
        with deadline(120):
            report = prepare_data(cfg_for(path, source, num_proc=num_proc), tok).report
        assert (report.loaded, report.malformed, report.kept) == (5, 2, 3), source
        where = f"row 1 (line 2) of {path}" if source == "jsonl" else f"row 1 of {path}"
        assert report.first_dropped["malformed"].startswith(f"{where}: {reason[len('is malformed: '):]}"), source
        message = refusal_of_rows(cfg_for(path, source, on_bad_rows="fail"), tok)
        assert message.startswith(f"{where} {reason}"), message
    offset = len(json_text[: json_text.index(records[1])].encode())
    assert f"more than 100 levels deep, from line 3 (byte offset {offset})" in message
    # A .json document that is one deep record (no list) is read as JSON Lines: one malformed row.
    only = write(tmp_path / "only.json", ('{"instruction": "q", "output": ' + nested(100_000) + "}").encode())
    assert [type(v) for v in values(load_rows(cfg_for(only, "json"))[0])] == [Unparsable]
    # The element-by-element parse refuses what json.loads refuses, where it would.
    broken = write(tmp_path / "broken.json", json_text.replace(",\n" + records[2], "\n" + records[2]).encode())
    assert "is not valid JSON: Expecting ',' delimiter at line 4 column 1" in refusal(cfg_for(broken, "json"))


def as_nobody(fn) -> str:
    """fn() in a forked child that first drops to the user nobody when this process is root (root
    may read any file whatever its mode); what it returned, or the exception it raised, as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's teardown
        result = "the child failed before running fn"
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            result = json.dumps(fn())
        except BaseException as err:  # noqa: BLE001  (any failure is the answer)
            result = f"{type(err).__name__}: {err}"
        finally:
            os.write(write_end, result.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_an_unreadable_file_is_one_message_in_the_loader_and_in_preflight():
    # Under /tmp with mode 0755 (pytest's tmp_path is 0700: nobody could not reach anything in it).
    root = tempfile.mkdtemp(prefix="distft-unreadable-", dir="/tmp")
    hidden_dir = Path(root) / "private"
    try:
        os.chmod(root, 0o755)
        unreadable = write(Path(root) / "locked.jsonl", jsonl(rows(3)))
        os.chmod(unreadable, 0o000)
        hidden_dir.mkdir(mode=0o700)
        hidden = write(hidden_dir / "train.jsonl", jsonl(rows(3)))
        os.chmod(hidden_dir, 0o000)

        def check() -> list[str]:
            out = []
            for path in (unreadable, hidden):
                try:
                    load_rows(cfg_for(path))
                    out.append("read")
                except DataError as err:
                    out.append(str(err))
                problems = path_problems(dataclasses.replace(Config(), data=cfg_for(path)))
                out += [p for p in problems if p.startswith("data.")]  # not run.root, which nobody cannot write
            return out

        answer = as_nobody(check)
        assert answer.startswith("["), answer  # not "PermissionError: ..."
        loader, preflight, loader_hidden, preflight_hidden = json.loads(answer)
        assert loader == preflight == (
            f"data.path={unreadable!r} cannot be read: permission denied; make it readable by the user running "
            f"distft (chmod a+r {unreadable}) or run as its owner")
        assert loader_hidden == preflight_hidden
        assert loader_hidden.startswith(f"data.path={hidden!r} cannot be reached: permission denied on a directory")
    finally:
        if hidden_dir.exists():
            os.chmod(hidden_dir, 0o755)
        shutil.rmtree(root)


def test_python_m_distft_refuses_a_latin1_file_in_one_line_and_exit_2(tmp_path):
    """The loader runs in the rank process: its DataError must end the run with one line, exit 2."""
    latin1 = [{"instruction": f"R\xe9sum\xe9 {i}", "input": "", "output": "ok"} for i in range(4)]
    data = json.dumps(latin1, ensure_ascii=False).encode("latin-1")
    path = write(tmp_path / "latin1.json", data)
    args = [sys.executable, "-m", "distft", "data=json", f"data.path={path}", "train.max_steps=1",
            f"run.root={tmp_path / 'runs'}", "tracking.wandb.mode=disabled"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"distft: no training rows left after cleaning data.path={path}: ")
    offset = data.index(b"\xe9")
    assert (f"the first, row 0 of {path}, is malformed: not valid UTF-8: byte 0xe9 at byte offset {offset}, "
            "line 1; save the file as UTF-8") in lines[0]


PIPES = {  # case: (overrides, the file named), for tmp_path
    "data.path": lambda tmp: (["data=jsonl", f"data.path={tmp / 'pipe.jsonl'}"], str(tmp / "pipe.jsonl")),
    "data.eval_path": lambda tmp: (["data=jsonl", f"data.path={write(tmp / 'good.jsonl', jsonl(rows(30)))}",
                                    f"data.eval_path={tmp / 'pipe.jsonl'}"], str(tmp / "pipe.jsonl")),
    "in-hf_disk": lambda tmp: (["data=hf_disk", f"data.path={dataset_with_a_pipe(tmp)[0]}"], str(tmp / "dataset" /
                                                                                                 "extra.arrow")),
}


@pytest.mark.parametrize("case", list(PIPES))
@pytest.mark.parametrize("command", ["distft", "distft.data"])
def test_a_named_pipe_is_refused_by_both_commands_without_blocking(tmp_path, command, case):
    """Issue 34: a FIFO given as data.path or data.eval_path, or one inside a save_to_disk
    directory, hung both commands (preflight's peek at the first JSON Lines record and the data
    fingerprint opened it, and an open waits for a writer). Now: exit 2 at once, one line naming
    the file and what it is."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    overrides, named = PIPES[case](tmp_path)
    proc = subprocess.run([sys.executable, "-m", command, *overrides, f"run.root={tmp_path / 'runs'}",
                           "tracking.wandb.mode=disabled"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if named in line]
    assert len(said) == 1 and "a named pipe (FIFO), not a regular file" in said[0], proc.stderr

