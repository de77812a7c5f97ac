"""Batched and parallel tokenization (issue 18, scope 3): `clean` tokenizes rows a chunk at a time
(encoding.encode_rows) and, with data.num_proc > 1, in spawned processes; every sample, every
count and the first dropped row of each kind must be exactly what the row-by-row path gives
(`_clean_row`, which encodes each row with encode_row), with every tokenizer family, every
template, special-token text in the data, rows far over max_seq_len, truncation and
train_on_prompt.

The tests that start a process: tests/cli/test_data_parallel.py."""

from __future__ import annotations

import pytest

from distft.config import DataConfig
from distft.data import pipeline
from distft.data.pipeline import DataReport
from distft.data.sources import RawRow
from distft.data.tokenizers import FAMILIES
from tests.families import family_tokenizer

SPECIALS = "<s> </s> <|eot_id|> <|begin_of_text|>"



def raw_rows() -> list[RawRow]:
    from distft.data import synthetic

    values = list(synthetic.generate(120, seed=5))
    values += [values[3], {"instruction": "  ", "output": "x"}, "not an object", {"unrelated": 1}]
    values += [{"instruction": f"Echo {SPECIALS} {i}", "input": "", "output": f"{SPECIALS} ok {i}"} for i in range(4)]
    values += [{"text": f"plain text {i} " * (40 if i % 2 else 1)} for i in range(6)]
    values += [{"instruction": "Long " * 3000, "output": "cut"}, {"instruction": "q", "output": "word " * 400}]
    values += [{"messages": [{"role": "user", "content": f"hi {i} {SPECIALS if i % 2 else ''}"},
                             {"role": "assistant", "content": f"yo {i}"}]} for i in range(6)]
    values += [{"messages": [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "twice"}]}]
    return [RawRow(v, f"row {i} of test") for i, v in enumerate(values)]


def row_by_row(raw: list[RawRow], cfg: DataConfig, tok) -> tuple[list, DataReport]:
    """The reference: each row checked and encoded alone (encode_row), in order."""
    report, seen, kept = DataReport(), set(), []
    for record in raw:
        report.loaded += 1
        try:
            example, truncated, key = pipeline._clean_row(record.value, cfg, tok, seen)
        except pipeline.RejectedRow as rejected:
            setattr(report, rejected.rule, getattr(report, rejected.rule) + 1)
            report.first_dropped.setdefault(rejected.rule, f"{record.where}: {rejected.reason}")
            continue
        seen.add(key)
        report.truncated += truncated
        kept.append(example)
    return kept, report


def as_lists(examples) -> list:
    return [(e.kind, e.row, e.sample[0].tolist(), e.sample[1].tolist()) for e in examples]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", [
    {"template": "alpaca"},
    {"template": "alpaca_short", "train_on_prompt": True},
    {"template": "plain", "drop_overlong": False, "max_seq_len": 96},
])
def test_chunked_tokenization_is_row_for_row_the_single_row_encoding(family, settings, monkeypatch):
    tok = family_tokenizer(family)
    settings = {"max_seq_len": 128, **settings}
    if family == "char":  # a token per character
        settings["max_seq_len"] *= 4
    cfg = DataConfig(**settings)
    raw = raw_rows()
    expected, expected_report = row_by_row(raw, cfg, tok)
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 7)  # many chunks, duplicates across their borders
    report = DataReport()
    got = pipeline.clean(raw, cfg, tok, report, set())
    assert as_lists(got) == as_lists(expected)
    assert report == expected_report
    # a generation eval's prompt: from the batch's prompt_len, exactly what encoding the row again gives
    assert sum(e.prompt_len is not None for e in got) > 100 and all(e.prompt_len is None for e in expected)
    assert [pipeline.eval_row(e, cfg, tok) for e in got] == [pipeline.eval_row(e, cfg, tok) for e in expected]
    # what the rows hold really varies: drops of several kinds, special-token text, cut rows
    assert report.duplicate == 1 and report.malformed >= 2 and report.empty == 1 and len(got) > 100
    assert report.overlong > 0 and (report.truncated > 0) == (not cfg.drop_overlong)
