"""The forgetting check's lm-eval tasks on the tuned model and its base (issue 19, item 3; lm-eval
asks `git` for the commit it records).

The in-process tests: tests/unit/test_forgetting.py."""

from __future__ import annotations

import json

import pytest

from distft.errors import DataError
from distft.preflight import preflight


def lm_eval_task(tmp_path) -> str:
    """An lm-evaluation-harness task of our own, read from local files (no hub): multiple choice
    over the synthetic tasks' answers."""
    tasks = tmp_path / "lm_eval_tasks"
    tasks.mkdir()
    rows = [{"question": f"Uppercase the word.\n{w}\n", "choices": [w.upper(), w[::-1], " ".join([w] * 3)], "answer": 0}
            for w in ("abc", "river", "mill", "town", "hills", "rain")]
    (tasks / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "distft_choice.yaml").write_text(
        "task: distft_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return str(tasks)


def test_lm_eval_tasks_run_on_the_tuned_model_and_its_base(tmp_path):
    """eval.lm_eval_tasks: lm-evaluation-harness's own numbers, the same as a direct run of it on
    the final checkpoint and on the base, in summary.json and the report."""
    from distft.checkpoint.export import load_base, load_model
    from distft.evaluation.forgetting import run_lm_eval
    from distft.train import train

    include = lm_eval_task(tmp_path)
    cfg, errors = preflight(["+experiment=tiny_full", f"run.root={tmp_path}", "train.max_steps=6", "train.lr=3e-3",
                             "eval.lm_eval_tasks=[distft_choice]", f"eval.lm_eval_include_path={include}",
                             "eval.num_samples=2", "eval.max_new_tokens=2", "tracking.progress_bar=false"])
    assert errors == []
    summary = train(cfg)
    before, after = summary["eval_before"]["lm_eval"], summary["eval_after"]["lm_eval"]
    assert set(after["distft_choice"]) == {"acc", "acc_norm"}
    _, tuned, tokenizer = load_model(summary["final_checkpoint"])
    assert run_lm_eval(tuned, tokenizer, ["distft_choice"], include, None, 4, "cpu") == after
    assert run_lm_eval(load_base(cfg, tokenizer=tokenizer), tokenizer, ["distft_choice"], include, None, 4,
                       "cpu") == before
    report = open(f"{summary['run_dir']}/eval_report.md").read()
    acc = (before["distft_choice"]["acc"], after["distft_choice"]["acc"])
    assert f"| distft\\_choice | acc | {acc[0]:.4f} | {acc[1]:.4f} | {acc[1] - acc[0]:+.4f} |" in report

    _, errors = preflight(["+experiment=tiny_prompt", "eval.lm_eval_tasks=[x]"])
    assert any("does not run on technique=prompt" in e for e in errors)
    with pytest.raises(DataError, match="has no task nope"):
        run_lm_eval(tuned, tokenizer, ["nope"], include, None, 4, "cpu")

