"""The best checkpoint on 2 real ranks (issue 19, item 2): after early stopping, every engine
loads its best checkpoint's sharded state back and the final evaluation scores those weights."""

from __future__ import annotations

import json
import os

import pytest

from tests.distributed.helpers import ZERO3_PARTITION_ALL, run_cli, run_dir_of, summary_of


@pytest.mark.parametrize("parallel", ["fsdp", "zero3"])
def test_early_stopping_on_two_ranks_scores_the_best_checkpoint(parallel, tmp_path):
    extra = [ZERO3_PARTITION_ALL] if parallel == "zero3" else []
    proc = run_cli("+experiment=tiny_lora", f"parallel={parallel}", "launcher.nproc_per_node=2", "train.max_steps=50",
                   "train.eval_every=2", "train.early_stopping_patience=2", "train.early_stopping_min_delta=100",
                   "checkpoint.keep_last=1", "eval.num_samples=2", "eval.max_new_tokens=2", "eval.compare_base=false",
                   f"run.root={tmp_path}", "tracking.progress_bar=false", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = run_dir_of(proc)
    summary = summary_of(run_dir)
    assert (summary["world_size"], summary["steps"], summary["best_step"]) == (2, 6, 2)
    assert summary["evaluated_checkpoint"].endswith("step_000002")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["best.json", "latest", "step_000002",
                                                                       "step_000006"]
    evals = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval_perplexity" in record:
                evals[record["step"]] = record["eval_loss"]
    # The sharded state of step 2, loaded on both ranks, scores exactly as it did at step 2.
    assert summary["eval_after"]["loss"] == pytest.approx(evals[2], rel=1e-6)
    assert summary["eval_after"]["loss"] != pytest.approx(evals[6], rel=1e-6)
