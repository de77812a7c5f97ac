"""The tokenized-data cache (issue 18, scope 1 and 2; distft/datacache.py): one byte of data, the
tokenizer or a token-changing setting is a new key; the cached samples are exactly the ones
prepare_data builds; one rank builds while another waits (real processes); a killed build leaves
no half cache and the next build recovers; a damaged cache is set aside and rebuilt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distft.config import DataConfig
from distft.data import DataError, prepare_data
from distft.datacache import prepared
from distft.model import build_offline_tokenizer
from distft.samples import TokenSamples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} " * (1 + i % 5)} for i in range(start, start + n)]


def write_jsonl(path, data) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def cfg_for(path: str, cache_dir, **kw) -> DataConfig:
    return DataConfig(**{"source": "jsonl", "path": path, "template": "alpaca_short", "max_seq_len": 64,
                         "cache_dir": str(cache_dir), **kw})


def same(a, b) -> bool:
    return (list(a.train) == list(b.train) and list(a.eval) == list(b.eval) and a.eval_rows == b.eval_rows
            and a.report.as_dict() == b.report.as_dict() and list(a.stop_ids) == list(b.stop_ids))


def test_the_cache_holds_exactly_what_prepare_data_builds_and_is_found_again(tmp_path):
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(200) + rows(1)), tmp_path / "cache")
    direct = prepare_data(cfg, tok)
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert first.built and first.path.startswith(str(tmp_path / "cache"))
    assert same(first.data, direct) and direct.report.duplicate == 1
    assert isinstance(first.data.train.tokens, np.memmap)  # trained from the memory map, not the lists built
    again = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert not again.built and again.path == first.path and same(again.data, direct)
    # order and batching settings are not in the key: the same cache, the report's packing redone
    unpacked = prepared(cfg_for(cfg.path, tmp_path / "cache", packing=False, shuffle=False), tok, 0, str(tmp_path), prepare_data)
    assert unpacked.path == first.path and not unpacked.built
    assert unpacked.data.report.train_sequences == len(direct.train) and unpacked.data.report.packing_fill is None
    assert os.listdir(tmp_path / "cache") == [os.path.basename(first.path)]  # no lock, no tmp left


def test_one_changed_byte_a_setting_or_another_tokenizer_is_a_new_cache(tmp_path):
    from distft.config import ModelConfig
    from distft.model import load_tokenizer
    from distft.tokenizer_families import save_tokenizer

    tok = build_offline_tokenizer()
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows(100))
    cfg = cfg_for(str(path), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    text = path.read_text()
    path.write_text(text.replace("Repeat 7.", "Repeat 8.", 1))  # one byte
    changed = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert changed.built and changed.path != first.path
    assert list(changed.data.train) + list(changed.data.eval) != list(first.data.train) + list(first.data.eval)
    path.write_text(text)  # back: the first cache again
    assert prepared(cfg, tok, 0, str(tmp_path), prepare_data).path == first.path
    longer = prepared(cfg_for(str(path), tmp_path / "cache", max_seq_len=80), tok, 0, str(tmp_path), prepare_data)
    assert longer.built and longer.path != first.path
    llama2 = load_tokenizer(ModelConfig(tokenizer=str(save_tokenizer("llama2", tmp_path / "tok"))))
    other = prepared(cfg, llama2, 0, str(tmp_path), prepare_data)
    assert other.built and other.path != first.path and same(other.data, prepare_data(cfg, llama2))
    assert len(os.listdir(tmp_path / "cache")) == 4


def test_a_rank_waits_for_rank_0s_build_and_reads_the_same_cache(tmp_path):
    cfg = {"path": write_jsonl(tmp_path / "train.jsonl", rows(3000)), "cache_dir": str(tmp_path / "cache")}
    script = """
import json, sys, time, hashlib
from distft.config import DataConfig
from distft.data import prepare_data
from distft.datacache import prepared
from distft.model import build_offline_tokenizer
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
    from distft.model import load_tokenizer
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


def test_a_damaged_cache_is_set_aside_and_rebuilt(tmp_path, caplog):
    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(200)), tmp_path / "cache")
    first = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    tokens = os.path.join(first.path, "train.tokens.npy")
    with open(tokens, "r+b") as f:
        f.truncate(os.path.getsize(tokens) - 8)
    with caplog.at_level("WARNING", logger="distft"):
        again = prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    assert again.built and same(again.data, prepare_data(cfg, tok))
    assert any("is damaged (train.tokens.npy is" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    aside = [n for n in os.listdir(tmp_path / "cache") if ".damaged-" in n]
    assert len(aside) == 1  # kept, not deleted: it is the user's disk to clean


def test_a_waiting_rank_gives_up_with_a_message(tmp_path, monkeypatch):
    import distft.datacache as datacache
    from distft.runlock import try_take

    tok = build_offline_tokenizer()
    cfg = cfg_for(write_jsonl(tmp_path / "train.jsonl", rows(50)), tmp_path / "cache", cache_wait_s=1)
    # No builder anywhere (rank 0 on another node with a node-local cache_dir): a clear message.
    monkeypatch.setattr(datacache, "NO_BUILDER_S", 0.5)
    with pytest.raises(DataError, match=r"rank 1 on .* has seen no data cache at .* must be a directory every rank sees"):
        prepared(cfg, tok, 0, str(tmp_path), prepare_data, rank=1)
    # A live builder that takes too long: rank 0 of another job waits data.cache_wait_s, then says so.
    key = os.path.basename(prepared(cfg_for(cfg.path, tmp_path / "probe"), tok, 0, str(tmp_path), prepare_data).path)
    lock, _ = try_take(str(tmp_path / "cache" / f"{key}.lock"), "test")
    try:
        with pytest.raises(DataError, match=r"waited \d+ s for pid \d+ on .* to build the data cache .*data.cache_wait_s=1"):
            prepared(cfg, tok, 0, str(tmp_path), prepare_data)
    finally:
        lock.release()


def test_token_samples_round_trip_and_refuse_labels_that_are_not_their_tokens(tmp_path):
    samples = TokenSamples.from_samples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                         {"input_ids": [9], "labels": [-100]}])
    samples.save(str(tmp_path), "x")
    loaded = TokenSamples.load(str(tmp_path), "x")
    assert loaded == samples and loaded[0] == {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    assert list(loaded.lengths) == [3, 1] and loaded.token_count == 4 and loaded.target_count == 2
    with pytest.raises(ValueError, match="each be its token or -100"):
        TokenSamples.from_samples([{"input_ids": [5, 6], "labels": [-100, 7]}])
