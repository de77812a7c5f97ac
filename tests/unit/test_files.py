"""distft.files against hostile directories (issue 34): planted links, FIFOs and devices where
distft writes or reads, and a lock held by another local user. Real files, links, pipes and
processes; nothing is mocked.

The tests that start a process: tests/cli/test_files.py."""

from __future__ import annotations

import json
import os
import time

import pytest

from distft import files
from distft.errors import OutputError, UnsafePathError


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    return str(path)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def test_a_link_planted_as_the_file_is_replaced_never_written_through(run_dir, victim):
    """write_text renames its own new file over the name: the planted link goes, its target stays."""
    path = os.path.join(run_dir, "summary.json")
    os.symlink(victim, path)
    files.write_json(path, {"a": 1})
    assert victim.read_text() == "precious\n"
    assert not os.path.islink(path) and json.load(open(path)) == {"a": 1}


def test_a_dangling_link_as_the_file_does_not_create_its_target(run_dir, tmp_path):
    """The review's old hole: a dangling link to a missing ~/.bash_profile was created by the append."""
    target = tmp_path / "missing_profile"
    path = os.path.join(run_dir, "ratings.jsonl")
    os.symlink(target, path)
    with pytest.raises(UnsafePathError) as caught:
        files.append_line(path, '{"label": "tuned$(touch MARK)"}', "the ratings", root=run_dir)
    assert str(caught.value).startswith(f"refusing to write the ratings {path}: {path} is a symbolic link (to {target})")
    files.write_text(path, "x\n", root=run_dir)
    assert not target.exists()


@pytest.mark.parametrize("depth", [1, 2])
def test_a_directory_on_the_way_that_is_a_link_is_refused(run_dir, tmp_path, depth):
    """`evals -> elsewhere` (or a link one level further down): refused with a message naming the
    link, and nothing appears at its target, whichever writer it is."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    parent = os.path.join(run_dir, "evals")
    if depth == 2:
        os.makedirs(parent)
        parent = os.path.join(parent, "step_000008")
    os.symlink(elsewhere, parent)
    path = os.path.join(run_dir, "evals", "step_000008", "eval_report.md")
    for write in (lambda: files.write_text(path, "report", root=run_dir),
                  lambda: files.write_bytes(path, b"png", root=run_dir),
                  lambda: files.append_line(path, "{}", root=run_dir),
                  lambda: files.make_dirs(os.path.join(os.path.dirname(path), "more"), run_dir)):
        with pytest.raises(UnsafePathError) as caught:
            write()
        assert isinstance(caught.value, OutputError)  # one line and exit 2 on every command line
        assert f"{parent} is a symbolic link (to {elsewhere})" in str(caught.value)
    assert os.listdir(elsewhere) == []


def test_missing_directories_are_made_and_a_path_outside_the_root_is_refused(run_dir, tmp_path):
    files.write_text(os.path.join(run_dir, "a", "b", "c.txt"), "hi", root=run_dir)
    assert open(os.path.join(run_dir, "a", "b", "c.txt")).read() == "hi"
    assert os.listdir(os.path.join(run_dir, "a", "b")) == ["c.txt"]  # no temporary file left
    with pytest.raises(UnsafePathError, match="lies outside"):
        files.write_text(str(tmp_path / "outside.txt"), "x", root=run_dir)
    assert not (tmp_path / "outside.txt").exists()


def test_the_temporary_name_is_new_each_time_and_never_an_existing_link(run_dir, victim):
    """The name before issue 34 was `<path>.tmp-<pid>`: a link planted there for the writer's pid
    was opened and written through. Links planted for every name that scheme could give this
    process stay untouched now."""
    path = os.path.join(run_dir, "eval_report.md")
    os.symlink(victim, f"{path}.tmp-{os.getpid()}")
    files.write_text(path, "report")
    assert victim.read_text() == "precious\n" and open(path).read() == "report"
    assert sorted(os.listdir(run_dir)) == ["eval_report.md", f"eval_report.md.tmp-{os.getpid()}"]


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_reading_refuses_what_is_not_a_regular_file_without_blocking(run_dir, kind):
    path = os.path.join(run_dir, "meta.json")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        os.mkdir(path)
    started = time.monotonic()
    with pytest.raises(files.NotAFile) as caught:
        files.read_json(path)
    assert time.monotonic() - started < 5
    expected = {"fifo": "a named pipe (FIFO)", "dev_zero": "a symbolic link (to /dev/zero)", "directory": "a directory"}
    assert str(caught.value).startswith(f"{path} is {expected[kind]}, not a regular file")
    if kind == "dev_zero":  # a data file the user named may be a link, but only to a regular file
        with pytest.raises(files.NotAFile, match="is a character device, not a regular file"):
            files.read_json(path, follow_links=True)


def test_a_fifo_planted_as_an_appended_file_is_refused(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # with a reader, the open itself would succeed
    try:
        with pytest.raises(UnsafePathError, match="is a named pipe \\(FIFO\\), not a regular file"):
            files.append_line(path, "{}", root=run_dir)
    finally:
        os.close(reader)
    with pytest.raises(UnsafePathError, match="named pipe"):  # and without one
        files.append_line(path, "{}", root=run_dir)


def test_deep_json_is_a_value_error_and_a_torn_line_is_skipped(run_dir, distft_warnings):
    deep = os.path.join(run_dir, "deep.json")
    with open(deep, "w") as f:
        f.write("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        files.read_json(deep)
    lines = os.path.join(run_dir, "ratings.jsonl")
    with open(lines, "w") as f:
        f.write('{"a": 1}\n' + "[" * 200_000 + "\n" + '{"a": 2}\n{"index": 3, "pa')
    assert files.read_json_lines(lines) == [{"a": 1}, {"a": 2}]
    assert distft_warnings == [
        f"{lines}: line 2 is not a JSON record (the file was damaged or edited); skipped",
        f"{lines}: line 4 is torn (cut short by a crash or a full disk while it was written); skipped"]
