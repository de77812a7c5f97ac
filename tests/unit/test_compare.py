"""`python -m distft.compare`: several models on the same prompts, one report (issue 19, item 4)."""

from __future__ import annotations

import json
import os

import pytest

from tests.unit.test_train import compose


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two LoRA runs of the tiny job, 3 and 8 steps: the same base, the same held-out split."""
    from distft.train import train

    root = tmp_path_factory.mktemp("runs")
    runs = []
    for steps in (3, 8):
        cfg = compose("+experiment=tiny_lora", f"run.root={root}", f"train.max_steps={steps}", "train.lr=3e-3",
                      "eval.num_samples=6", "eval.max_new_tokens=6", "data.max_seq_len=128",
                      "tracking.progress_bar=false", "tracking.wandb.mode=disabled")
        runs.append(train(cfg))
    return runs


def test_runs_and_their_base_are_scored_as_their_own_reports_scored_them(two_runs, tmp_path, capsys):
    from distft.commands.compare import main

    short, long = two_runs
    out = tmp_path / "cmp"
    assert main([short["run_dir"], long["run_dir"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    labels = [m["label"] for m in summary["models"]]
    assert labels == ["base", "tiny_lora/step_000003", "tiny_lora/step_000008"]
    # The same prompts, weights and decoding as each run's final evaluation: the same numbers.
    for model, run in zip(summary["models"][1:], two_runs):
        for key in ("loss", "exact_match", "f1", "rouge_l"):
            assert model["metrics"][key] == pytest.approx(run["eval_after"][key], rel=1e-6, abs=1e-9), (model, key)
    for key in ("loss", "exact_match", "rouge_l"):
        assert summary["models"][0]["metrics"][key] == pytest.approx(short["eval_before"][key], rel=1e-6, abs=1e-9)
    assert summary["models"][1]["metrics"]["loss"] != pytest.approx(summary["models"][2]["metrics"]["loss"])
    records = [json.loads(line) for line in (out / "compare_report.predictions.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(list(r["outputs"]) == labels for r in records)
    own = [json.loads(line) for line in open(os.path.join(long["run_dir"], "eval_report.predictions.jsonl"))]
    assert [r["outputs"]["tiny_lora/step_000008"]["text"] for r in records] == [r["outputs"]["tuned"]["text"]
                                                                                for r in own]
    report = (out / "compare_report.md").read_text()
    assert report.startswith("# Comparison: base, tiny_lora/step_000003, tiny_lora/step_000008\n")
    assert "| metric | base | tiny_lora/step_000003 | tiny_lora/step_000008 |" in report
    assert "| reference | base output | tiny_lora/step_000003 output | tiny_lora/step_000008 output |" in report
    assert f"- tiny_lora/step_000008: {long['final_checkpoint']} (lora, tiny, 8 steps)" in report
    assert f"tiny_lora/step_000008: loss={summary['models'][2]['metrics']['loss']:.4f}" in printed


def test_a_prompts_file_with_and_without_references(two_runs, tmp_path):
    from distft.evaluation.compare import compare

    short, long = two_runs
    with_refs = tmp_path / "mine.jsonl"
    with_refs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Reverse: abc", "reference": "cba", "task": "reverse"},
        {"instruction": "Uppercase: hello", "input": "", "output": "HELLO"},
        {"messages": [{"role": "user", "content": "Count the letters: aaa"}, {"role": "assistant", "content": "3"}]},
    ]))
    summary = compare([long["run_dir"]], str(tmp_path / "a"), prompts=str(with_refs))
    assert [m["label"] for m in summary["models"]] == ["base", "tiny_lora/step_000008"]
    records = [json.loads(line) for line in open(summary["predictions"])]
    assert [r["reference"] for r in records] == ["cba", "HELLO", "3"]
    assert records[0]["task"] == "reverse" and "Reverse: abc" in records[0]["prompt"]
    tuned = summary["models"][1]["metrics"]
    assert tuned["num_generated"] == 3 and tuned["loss"] is None and tuned["exact_match"] is not None
    assert tuned["exact_match"] == pytest.approx(sum(r["outputs"]["tiny_lora/step_000008"]["exact_match"]
                                                     for r in records) / 3)

    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "Reverse: xyz"}) + "\n" + json.dumps({"prompt": "Add: 2 + 3"}) + "\n")
    summary = compare([short["run_dir"], long["run_dir"]], str(tmp_path / "b"), prompts=str(bare), base=False)
    assert not summary["scored"] and all(m["metrics"]["exact_match"] is None for m in summary["models"])
    report = open(summary["report"]).read()
    assert "The prompts have no references: answers side by side, no metrics." in report
    assert "| metric | tiny_lora/step_000003 | tiny_lora/step_000008 | change |" in report


def test_bad_input_is_one_message(two_runs, tmp_path, capsys):
    from distft.commands.compare import main

    _, long = two_runs
    assert main([long["run_dir"], "--no-base", "--out", str(tmp_path / "x")]) == 2
    assert "compare needs two models or more" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "a", "reference": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    assert main([long["run_dir"], "--prompts", str(mixed), "--out", str(tmp_path / "y")]) == 2
    assert "rows 1 have no reference while others do" in capsys.readouterr().err
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "just text"}) + "\n")
    assert main([long["run_dir"], "--prompts", str(text), "--out", str(tmp_path / "z")]) == 2
    assert "is plain text, which has no prompt to answer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
