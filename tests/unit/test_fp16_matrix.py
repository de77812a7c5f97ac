"""fp16 weights (`model.dtype=float16`) with every technique in every `train.precision`, on the
single engine (issue 15): each of the 24 pairs either trains, with finite losses and finite
trainable weights that moved, or is refused by validate() with one message naming the keys and
the fix. The decision for each pair and why: distft/validation.py, `_check_fp16_weights`.

The trained pairs run a few real optimizer steps through `train()` on the tiny model, with short
rows and few adapter targets: fp16 arithmetic is slow on CPUs without fp16 instructions."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch

from distft.preflight import preflight

TECHNIQUES = ["full", "lora", "qlora", "dora", "prefix", "prompt"]
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
# Trained for real. QLoRA: PEFT casts every parameter that is not 4-bit to fp32, so fp16 weights
# leave nothing in fp16 (its fp16 precision on the CPU is refused by the QLoRA rule instead).
TRAINED = {("lora", "fp16"), ("dora", "fp16"), ("prefix", "fp16"), ("prompt", "fp16"),
           ("qlora", "auto"), ("qlora", "bf16"), ("qlora", "fp32")}
STEPS = 3
WHY = {"fp32": "no autocast and no loss scaler, so the fp16 base computes and back-propagates in unscaled fp16",
       "bf16": "bf16 autocast rounds the fp16 weights to bf16 in every matmul",
       "auto": "auto computes in bf16 or fp32 (by device), never in fp16"}
FIX = {"fp32": "or model.dtype=float32 for fp32 compute", "bf16": "or model.dtype=bfloat16 for bf16 compute",
       "auto": "or model.dtype=auto to let the device choose both"}
OFFERED_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "auto": "auto"}  # the model.dtype each message offers


def expected_refusal(technique: str, precision: str) -> str:
    if technique == "full":
        return ("model.dtype=float16 with technique=full: fp16 cannot hold AdamW's state (its eps 1e-8 is 0 in fp16, "
                "so an update turns weights into inf/NaN)")
    if technique == "qlora":
        return "train.precision=fp16 with technique=qlora on the CPU is unsupported; use bf16 or fp32"
    return (f"model.dtype=float16 with technique={technique} and train.precision={precision}: {WHY[precision]}")


def overrides(technique: str, precision: str, *extra: str) -> list[str]:
    return [f"+experiment=tiny_{technique}", "model.dtype=float16", f"train.precision={precision}", *extra]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_fp16_weights_train_finite_or_are_refused_with_one_message(technique, precision, tmp_path):
    if (technique, precision) not in TRAINED:
        _, errors = preflight(overrides(technique, precision))
        assert len(errors) == 1, errors
        assert expected_refusal(technique, precision) in errors[0]
        if technique == "qlora":  # the QLoRA rule's own refusal (fp16 compute on the CPU), whatever model.dtype
            return
        if technique == "full":
            assert "leave model.dtype=auto" in errors[0]
            offered = "auto"
        else:
            assert "set train.precision=fp16 (fp16 autocast with a loss scaler" in errors[0] and FIX[precision] in errors[0]
            offered = OFFERED_DTYPE[precision]
        # The refusal is about the fp16 weights: the same run with the dtype the message offers is valid.
        assert preflight(overrides(technique, precision, f"model.dtype={offered}"))[1] == []
        return

    from safetensors.torch import load_file

    from distft.engines import weights_dtype
    from distft.tracking import read_metrics
    from distft.train import train

    # Adapters on an attention, an MLP and the head projection (all seven cost DoRA ~3x the time in fp16).
    targets = ["technique.target_modules=[q_proj,down_proj,lm_head]"] if technique in ("lora", "qlora", "dora") else []
    cfg, errors = preflight(overrides(
        technique, precision, *targets, f"run.root={tmp_path}", f"train.max_steps={STEPS}", "train.warmup_steps=0",
        "train.global_batch_size=2", "train.micro_batch_size=2", "data.max_seq_len=96",
        "data.synthetic.num_examples=40", "data.eval_size=2", "train.log_every=1", "checkpoint.save_every=1",
        "checkpoint.keep_last=0", "eval.num_samples=1", "eval.max_new_tokens=1", "eval.compare_base=false",
        "tracking.progress_bar=false", "tracking.plot=false"))
    assert errors == [], errors
    # The base really is built in fp16 (the trainer builds it in weights_dtype; QLoRA quantises it from there).
    assert weights_dtype(cfg, torch.device("cpu")) == torch.float16
    summary = train(cfg)
    assert summary["steps"] == STEPS and summary["nonfinite_steps"] == 0
    losses = [r["loss"] for r in read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl")) if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    assert math.isfinite(summary["eval_after"]["loss"])
    checkpoints = sorted(glob.glob(os.path.join(summary["run_dir"], "checkpoints", "step_*")))
    assert [os.path.basename(c) for c in checkpoints] == [f"step_{s:06d}" for s in range(1, STEPS + 1)]
    first, final = (load_file(os.path.join(c, "model", "adapter_model.safetensors")) for c in (checkpoints[0],
                                                                                                checkpoints[-1]))
    assert final and first.keys() == final.keys()
    for name, weight in final.items():
        assert weight.dtype == torch.float32, name  # what trains is fp32, over the fp16 (or 4-bit) base
        assert bool(torch.isfinite(weight).all()), name
        assert not torch.equal(weight, first[name]), f"{name} did not move after step 1"
