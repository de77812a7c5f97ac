"""Several data sources mixed with weights (issue 18, scope 4): each epoch holds the stated share of
samples from each source (up- and down-sampled), a pure function of (seed, epoch); each source is
read and templated as its entry says; bad entries are one message each; the cache keeps the mix."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from distft.config import DataConfig
from distft.data.batching import TrainBatches, mix_counts, mixed_order
from distft.data.cache import prepared
from distft.data.pipeline import DataError, prepare_data
from distft.data.sources import source_problems
from distft.model.build import build_offline_tokenizer


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def two_sources(tmp_path, weights=(3.0, 1.0)) -> DataConfig:
    a = write(tmp_path / "math.jsonl", [{"instruction": f"Add {i} and 1.", "output": str(i + 1)} for i in range(300)])
    b = write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Hi {i}"},
                                                      {"role": "assistant", "content": f"Hello {i}"}]}
                                        for i in range(100)])
    return DataConfig(sources=[{"path": a, "weight": weights[0], "template": "alpaca_short"},
                               {"path": b, "weight": weights[1], "name": "greetings"}],
                      max_seq_len=128, eval_size=20, cache_dir=str(tmp_path / "cache"))


def test_each_epoch_holds_the_weighted_share_of_each_source(tmp_path):
    tok = build_offline_tokenizer()
    cfg = two_sources(tmp_path)
    data = prepare_data(cfg, tok)
    names = [s["name"] for s in data.report.sources]
    assert names == ["math", "greetings"]
    available = [s["samples"] for s in data.report.sources]
    assert sum(available) == len(data.train) == 380  # 400 rows, 20 held out
    counts = mix_counts(available, [3.0, 1.0])
    assert counts == [285, 95]  # 3:1 of 380
    for epoch in range(3):
        order = mixed_order(data.train_sources, [3.0, 1.0], seed=0, epoch=epoch)
        per_source = Counter(int(data.train_sources[i]) for i in order)
        assert per_source == {0: 285, 1: 95}
    # Upsampling: weight 1:3 asks 285 of the ~95 greetings: each one whole times over, then a draw for the rest.
    up = mixed_order(data.train_sources, [1.0, 3.0], seed=0, epoch=0)
    per_sample = Counter(i for i in up if data.train_sources[i] == 1)
    whole = 285 // available[1]
    assert sum(per_sample.values()) == 285 and len(per_sample) == available[1] and whole >= 2
    assert Counter(per_sample.values()) == {whole: available[1] - 285 % available[1], whole + 1: 285 % available[1]}
    assert mixed_order(data.train_sources, [3.0, 1.0], 0, 1) != mixed_order(data.train_sources, [3.0, 1.0], 0, 2)
    # Each source templated as its entry says: math with alpaca_short, greetings as a chat.
    texts = [tok.decode(data.train[i]["input_ids"]) for i in range(len(data.train))]
    assert sum("### Instruction:" in t or "Add " in t for t in texts) == available[0]
    assert any("Hello" in t for t in texts)
    assert any(m.startswith(f"data: mix per epoch: math 285 of 380 samples (75%, weight 3; "
                            f"{285 / available[0]:.2f}x its {available[0]} samples); greetings 95 of 380")
               for _, m in data.report.notes(cfg)), data.report.notes(cfg)


def test_training_batches_draw_the_mix_and_resume_exactly(tmp_path):
    tok = build_offline_tokenizer()
    data = prepared(two_sources(tmp_path, (1.0, 1.0)), tok, 0, str(tmp_path), prepare_data).data
    assert data.train_sources is not None and data.report.sources[1]["weight"] == 1.0  # through the cache

    def batches(**kw):
        return TrainBatches(data.train, 4, 128, False, tok.pad_token_id, seed=0, sources=data.train_sources,
                            weights=[1.0, 1.0], **kw)

    whole = batches()
    assert whole.rows_per_epoch == len(data.train) == 380 and whole.batches_per_epoch == 95  # nothing trimmed
    seen = [next(whole)["input_ids"] for _ in range(whole.batches_per_epoch)]
    greetings = sum("Hello" in tok.decode(row.tolist()) for b in seen for row in b)
    assert greetings == 190  # 1:1 of the epoch, though only ~95 greetings exist: each drawn twice
    resumed = batches()
    resumed.load_state_dict({"epoch": 0, "rows_consumed": 40})
    assert all((next(resumed)["input_ids"] == seen[10 + k]).all() for k in range(5))


def test_bad_source_entries_are_one_message_each(tmp_path):
    problems = source_problems(DataConfig(path="x.jsonl", sources=[
        {"path": "a.jsonl", "weight": 0}, "b.jsonl", {"weight": 1}, {"path": "c.csv", "colour": "red"},
        {"path": "d", "source": "xml"}]))
    assert len(problems) == 6, problems
    assert problems[0].startswith("data.path='x.jsonl' and data.sources are both set")
    assert "data.sources[0].weight=0 must be a finite number > 0" in problems[1]
    assert problems[2].startswith("data.sources[1] is a str; write {path: FILE, weight: 1.0}")
    assert problems[3] == "data.sources[2] has no path; every source names its file (or datasets directory)"
    assert problems[4].startswith("data.sources[3] has unknown keys ['colour']")
    assert problems[5].startswith("data.sources[4].source='xml' is not one of jsonl, json")


def test_a_source_that_keeps_no_rows_is_named(tmp_path):
    tok = build_offline_tokenizer()
    good = write(tmp_path / "good.jsonl", [{"instruction": f"Q{i}", "output": f"A{i}"} for i in range(50)])
    bad = write(tmp_path / "bad.jsonl", [{"instruction": "", "output": ""}] * 3)
    with pytest.raises(DataError, match=r"no training rows left after cleaning data.sources\[1\].path=.*bad.jsonl"):
        prepare_data(DataConfig(sources=[{"path": good}, {"path": bad}], eval_size=5), tok)
