"""The tokenized-data cache (issue 18; distft/data/cache.py) across processes: one rank builds while
another waits, and a killed build leaves no half cache and the next build recovers.

The in-process tests: tests/unit/test_data_cache.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from distft.data.cache import prepared
from distft.data.pipeline import prepare_data
from tests.unit.test_data_cache import rows, same, write_jsonl


def test_a_rank_waits_for_rank_0s_build_and_reads_the_same_cache(tmp_path):
    cfg = {"path": write_jsonl(tmp_path / "train.jsonl", rows(3000)), "cache_dir": str(tmp_path / "cache")}
    script = """
import json, sys, time, hashlib
from distft.config import DataConfig
from distft.data.pipeline import prepare_data
from distft.data.cache import prepared
from distft.model.build import build_offline_tokenizer
rank, cfg = int(sys.argv[1]), json.loads(sys.argv[2])
def slow_build(c, tok, seed):  # rank 0's build takes >= 3 s, so rank 1 is seen waiting
    time.sleep(3)
    return prepare_data(c, tok, seed)
c = DataConfig(source="jsonl", template="alpaca_short", max_seq_len=64, **cfg)
result = prepared(c, build_offline_tokenizer(), 0, ".", slow_build, rank=rank)
digest = hashlib.sha256(result.data.train.tokens.tobytes() + result.data.eval.tokens.tobytes()).hexdigest()
print(json.dumps({"built": result.built, "path": result.path, "seconds": result.seconds, "digest": digest}))
"""
    def start(rank):
        return subprocess.Popen([sys.executable, "-c", script, str(rank), json.dumps(cfg)], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "RANK": str(rank)})

    waiter = start(1)  # first: it finds no cache and must wait, not build
    time.sleep(0.5)
    builder = start(0)
    outs = [p.communicate(timeout=240) for p in (builder, waiter)]
    assert [p.returncode for p in (builder, waiter)] == [0, 0], [o[1][-2000:] for o in outs]
    built, waited = (json.loads(o[0].splitlines()[-1]) for o in outs)
    assert built["built"] and not waited["built"] and built["path"] == waited["path"]
    assert waited["seconds"] >= 3 and built["digest"] == waited["digest"]


@pytest.mark.parametrize("fault", ["kill_cache_write:0", "kill_cache_publish:0"])
def test_a_killed_build_leaves_no_half_cache_and_the_next_build_recovers(tmp_path, fault):
    from distft.model.build import load_tokenizer
    from distft.preflight import preflight

    path = write_jsonl(tmp_path / "train.jsonl", rows(300))
    cache = tmp_path / "cache"
    overrides = ["data.source=jsonl", f"data.path={path}", "data.template=alpaca_short", "data.max_seq_len=64",
                 f"data.cache_dir={cache}"]
    proc = subprocess.run(
        [sys.executable, "-m", "distft.data", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "DISTFT_FAULTS": fault})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = sorted(os.listdir(cache))
    tmp = [n for n in left if ".tmp-" in n]
    assert len(left) == 2 and len(tmp) == 1 and any(n.endswith(".lock") for n in left), left  # no cache directory
    key = tmp[0].split(".")[0]
    assert not (cache / key).exists()
    assert (cache / tmp[0] / "manifest.json").exists() == (fault == "kill_cache_publish:0")
    # The next build (the same host, the killer's pid dead: its lock is stale) takes over and cleans up.
    cfg, errors = preflight(overrides, run_here=False)
    tok = load_tokenizer(cfg.model)
    result = prepared(cfg.data, tok, cfg.data.seed, str(tmp_path), prepare_data)
    assert result.built and os.path.basename(result.path) == key and os.listdir(cache) == [key]
    assert same(result.data, prepare_data(cfg.data, tok, cfg.data.seed))

