"""Hub datasets by name (issue 18, scope 4), offline: a dataset directory that datasets.load_dataset
reads as a Hub repository would be read (its train and validation splits), fingerprinted by what
datasets made of it; a name that cannot be reached is one message naming the way out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


def write(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_data(args, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.data", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", **env})


def test_a_dataset_directory_loads_with_its_splits_and_an_unreachable_name_is_one_message(tmp_path):
    repo = tmp_path / "alpaca_like"
    repo.mkdir()
    write(repo / "train.jsonl", [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(120)])
    write(repo / "validation.jsonl", [{"instruction": f"Echo {i}.", "input": "", "output": str(i)} for i in range(7)])
    env = {"HF_HOME": str(tmp_path / "hf")}
    proc = run_data(["data=hub", f"data.path={repo}", "data.max_seq_len=256"], tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert "loaded 127 rows" in out[0] and "kept 127; train 120 rows" in out[0] and "eval 7;" in out[0], out[0]
    assert out[1].startswith("cache: built ")
    again = run_data(["data=hub", f"data.path={repo}", "data.max_seq_len=256"], tmp_path, **env)
    found = again.stdout.splitlines()[1]
    assert found.startswith("cache: found ") and found.split()[2] == out[1].split()[2]  # the same cache
    # One row changed: another fingerprint, another cache.
    write(repo / "train.jsonl", [{"instruction": f"Say {i}.", "input": "", "output": str(i + (i == 3))}
                                 for i in range(120)])
    changed = run_data(["data=hub", f"data.path={repo}", "data.max_seq_len=256"], tmp_path, **env)
    assert changed.stdout.splitlines()[1].startswith("cache: built ")
    assert changed.stdout.splitlines()[1].split()[2] != out[1].split()[2]

    missing = run_data(["data=hub", "data.path=distft-test/no-such-dataset"], tmp_path, **env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr[-3000:]
    errors = [line for line in missing.stderr.splitlines() if line.startswith("distft: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "distft: data.path=distft-test/no-such-dataset: the Hugging Face Hub dataset cannot be reached"), errors
    assert "download it first where there is one" in errors[0]


def test_a_named_pipe_in_a_dataset_directory_is_refused_without_blocking(tmp_path):
    """Issue 34: a FIFO among the files of a local dataset directory hung `python -m distft.data`
    (the data fingerprint of the cache key opened every file, and datasets would have read it).
    Preflight does not look at Hub datasets; the fingerprint and the loader refuse it, naming it."""
    repo = tmp_path / "alpaca_like"
    repo.mkdir()
    write(repo / "train.jsonl", [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(40)])
    os.mkfifo(repo / "validation.jsonl")
    proc = subprocess.run([sys.executable, "-m", "distft.data", "data=hub", f"data.path={repo}"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distft: ")]
    assert errors == [f"distft: data.path={str(repo)!r} holds {repo / 'validation.jsonl'}, a named pipe (FIFO), not a "
                      "regular file: datasets reads every file of a dataset directory; remove it from there"], errors
    # What each rank asks (training takes the fingerprint's refusal for "unknown", then loads).
    from distft.config import DataConfig
    from distft.data.pipeline import DataError, load_rows

    def expire(*_):
        raise TimeoutError("load_rows still blocked after 60 s")

    previous = signal.signal(signal.SIGALRM, expire)  # a blocked open fails the test instead of hanging it
    signal.alarm(60)
    try:
        load_rows(DataConfig(source="hub", path=str(repo)))
    except DataError as err:
        assert f"holds {repo / 'validation.jsonl'}, a named pipe (FIFO)" in str(err)
    else:
        raise AssertionError("a dataset directory holding a FIFO was loaded")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
