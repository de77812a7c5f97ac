"""Preference tuning (objective=dpo) on 2 real DDP ranks against one process, in the session's
shared launches (helpers.declare_run): the same pairs in the same optimizer steps give the same
per-step loss and rewards, the reference's log-probs are the same bits whichever ranks computed
them, and the held-out preference metrics agree. FSDP and ZeRO are refused for dpo in this version.

Tolerance: relative 1e-4 (SFT's equivalence uses 1e-5). The ranks differ only in the order of float
sums, as for SFT, but a reward is a difference of two summed log-probs of ~30 nats each: float32's
~1e-7 of those is ~3e-6 absolute on rewards of ~0.1, so the per-step drift measured here reaches
2.5e-5 relative (step 6's margins); any real error (a rank's pairs, the reference, the per-pair
weighting) moves them by more than 1e-2."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import declare_run, step_metrics, summary_of

DPO = ["+experiment=tiny_dpo", "technique=lora", "technique.dropout=0.0", "data.synthetic.num_examples=200",
       "data.eval_size=8", "train.max_steps=6", "train.warmup_steps=2", "train.log_every=1", "eval.num_samples=2",
       "eval.max_new_tokens=2", "train.lr=1e-2"]
SINGLE = declare_run("dpo-lora-single", DPO, ranks=1)
DDP = declare_run("dpo-lora-ddp", [*DPO, "parallel=ddp", "launcher.nproc_per_node=2"], ranks=2)


def test_dpo_on_two_ddp_ranks_matches_one_process(trainings):
    single, _ = trainings.finished(SINGLE)
    ddp, _ = trainings.finished(DDP)
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
        a, b = step_metrics(single, key), step_metrics(ddp, key)
        assert len(a) == len(b) == 6
        for step, (x, y) in enumerate(zip(a, b), start=1):
            assert y == pytest.approx(x, rel=1e-4, abs=1e-7), f"step {step} {key}: single {x} vs ddp {y}"
    assert step_metrics(single)[-1] < step_metrics(single)[0]  # it learns
    ref_single = load_file(f"{single}/reference_logps.safetensors")
    ref_ddp = load_file(f"{ddp}/reference_logps.safetensors")
    for name in ("train", "eval"):  # each rank scored half the chunks; gathered, the same bits
        assert torch.equal(ref_ddp[name], ref_single[name]), name
    a, b = summary_of(single)["eval_after"], summary_of(ddp)["eval_after"]
    assert summary_of(ddp)["world_size"] == 2
    for key in ("preference_accuracy", "reward_accuracy"):
        assert a[key] == b[key], key
    assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-4)
