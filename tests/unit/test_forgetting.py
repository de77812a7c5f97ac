"""The forgetting check (issue 19, item 3): general text scored as perplexity before and after
training, and a warning when the tuned model lost too much of it.

The tests that start a process: tests/cli/test_forgetting.py."""

from __future__ import annotations

import json
import math
import random

import pytest

from distft.errors import DataError
from distft.preflight import preflight

WORDS = ("the river runs past an old mill where children play in summer and the town keeps its market on "
         "friday while rain falls on the hills and people talk about the weather").split()


def corpus(path, docs: int = 12, seed: int = 0) -> str:
    rng = random.Random(seed)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
                       for _ in range(docs))
    path.write_text(text + "\n")
    return str(path)


def test_general_batches_are_every_token_of_the_corpus_in_windows(tmp_path):
    from distft.evaluation.forgetting import general_batches, read_corpus
    from distft.model.build import IGNORE_INDEX, build_offline_tokenizer

    tokenizer = build_offline_tokenizer()
    path = corpus(tmp_path / "general.txt")
    docs = read_corpus(path)
    assert len(docs) == 12
    ids = [[tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
           for d in docs]
    # Every document in windows of 64 (a 1-token remainder has nothing to predict and is left out).
    expected = [w for doc in ids for w in (doc[i : i + 64] for i in range(0, len(doc), 64)) if len(w) > 1]
    batches = general_batches(path, tokenizer, max_seq_len=64, batch_size=4, max_tokens=10**9)
    rows = [row[mask.bool()].tolist() for b in batches for row, mask in zip(b["input_ids"], b["attention_mask"])]
    assert rows == expected and sum(map(len, expected)) > 0.99 * sum(map(len, ids))
    assert all(bool((b["labels"] == b["input_ids"])[b["attention_mask"].bool()].all()) for b in batches)
    assert all(bool((b["labels"] == IGNORE_INDEX)[~b["attention_mask"].bool()].all()) for b in batches)
    first = batches[0]["input_ids"][0].tolist()
    assert first[0] == tokenizer.bos_token_id and tokenizer.decode(first[1:64]) == docs[0][:63]
    capped = general_batches(path, tokenizer, 64, 4, max_tokens=500)
    assert sum(int(b["attention_mask"].sum()) for b in capped) == 500
    jsonl = tmp_path / "general.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert read_corpus(str(jsonl)) == docs
    for content, message in [("", "holds no text"), ('{"txt": 1}\n', 'line 1 has no "text" string field'),
                             ("not json\n", "line 1 is not JSON")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(DataError, match=message):
            read_corpus(str(bad))
    cfg, errors = preflight([f"eval.general_path={tmp_path / 'missing.txt'}"])
    assert any("eval.general_path=" in e and "is not a file" in e for e in errors), errors


def test_the_warning_fires_above_the_threshold_only():
    from distft.evaluation.forgetting import forgetting_line

    base = {"general_perplexity": 10.0, "general_tokens": 500}
    assert forgetting_line(base, {"general_perplexity": 10.5, "general_tokens": 500}, 0.1).startswith(
        "General capabilities kept: perplexity on general text (eval.general_path, 500 tokens) 10.0000 -> 10.5000 "
        "(+5.0%), within eval.general_warn=10% of the base's.")
    assert forgetting_line(base, {"general_perplexity": 9.0, "general_tokens": 500}, 0.1).endswith(
        "(-10.0%), no higher than the base's.")
    line = forgetting_line(base, {"general_perplexity": 12.0, "general_tokens": 500}, 0.1)
    assert line.startswith("**Forgetting**: perplexity on general text") and "(+20.0%)" in line
    assert "more than eval.general_warn=10% above the base" in line
    assert forgetting_line(base, {"general_perplexity": None}, 0.1) is None


def test_a_run_scores_general_text_before_and_after(tmp_path):
    """The run's base and tuned general perplexity are held_out_loss over the corpus, computed
    here again independently from the base weights and the final checkpoint."""
    from distft.checkpoint.export import load_base, load_model
    from distft.evaluation.evaluate import held_out_loss
    from distft.evaluation.forgetting import general_batches
    from distft.train import train

    path = corpus(tmp_path / "general.txt")
    cfg, errors = preflight(["+experiment=tiny_lora", f"run.root={tmp_path}", "train.max_steps=4", "train.lr=3e-3",
                             f"eval.general_path={path}", "eval.num_samples=2", "eval.max_new_tokens=2",
                             "tracking.progress_bar=false"])
    assert errors == []
    summary = train(cfg)
    before, after = summary["eval_before"], summary["eval_after"]
    _, tuned, tokenizer = load_model(summary["final_checkpoint"])
    batches = general_batches(path, tokenizer, cfg.data.max_seq_len, cfg.eval.batch_size, cfg.eval.general_max_tokens)
    assert before["general_loss"] == pytest.approx(held_out_loss(load_base(cfg, tokenizer=tokenizer), batches,
                                                                 "cpu")["loss"], rel=1e-5)
    assert after["general_loss"] == pytest.approx(held_out_loss(tuned, batches, "cpu")["loss"], rel=1e-5)
    assert after["general_loss"] != pytest.approx(before["general_loss"], rel=1e-6)
    assert after["general_perplexity"] == pytest.approx(math.exp(after["general_loss"]))
    report = open(f"{summary['run_dir']}/eval_report.md").read()
    assert f"| general_perplexity | {before['general_perplexity']:.4f} | {after['general_perplexity']:.4f} |" in report
    change = after["general_perplexity"] / before["general_perplexity"] - 1
    assert f"{before['general_perplexity']:.4f} -> {after['general_perplexity']:.4f} ({change:+.1%})" in report
    assert ("**Forgetting**" in report) == (change > 0.1)
