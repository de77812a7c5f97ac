"""Preference tuning (objective=dpo) on 2 real ranks of every engine against one process, in the
session's shared launches (helpers.declare_run, share "dpo", its own pytest-xdist worker): the same
pairs in the same optimizer steps give the same per-step loss, rewards and log-probs on DDP, FSDP
and ZeRO-3 (LoRA) and on ZeRO-2 and FSDP (full fine-tuning); the reference's log-probs are the same
bits whichever ranks computed them (each rank scores its share of the pairs through the sharded
model, every rank as many forwards); the held-out preference metrics agree; and a run stopped
after its step-3 checkpoint on ZeRO-3 or FSDP resumes to the same bits as the run never stopped.

Tolerance: relative 1e-4 (SFT's equivalence uses 1e-5). The ranks differ only in the order of float
sums, as for SFT, but a reward is a difference of two summed log-probs of ~30 nats each: float32's
~1e-7 of those is ~3e-6 absolute on rewards of ~0.1, so the per-step drift measured here reaches
2.5e-5 relative (DDP, step 6's margins; FSDP 1.9e-6, ZeRO-3 6.2e-6 on rewards/chosen); any real
error (a rank's pairs, the reference, the per-pair weighting) moves them by more than 1e-2."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import (
    ZERO3_PARTITION_ALL,
    declare_run,
    final_weights,
    step_metrics,
    summary_of,
)

SHARED_RUNS = "dpo"
STEPS, SAVE = 6, 3
COMMON = ["+experiment=tiny_dpo", "data.synthetic.num_examples=200", "data.eval_size=8", f"train.max_steps={STEPS}",
          "train.warmup_steps=2", "train.log_every=1", "eval.num_samples=2", "eval.max_new_tokens=2",
          f"checkpoint.save_every={SAVE}", "checkpoint.keep_last=0"]
TECHNIQUE = {"lora": ["technique=lora", "technique.dropout=0.0", "train.lr=1e-2"], "full": ["train.lr=1e-3"]}
# (technique, parallel) on 2 ranks, each against its technique's one-process run.
CELLS = [("lora", "ddp"), ("lora", "fsdp"), ("lora", "zero3"), ("full", "zero2"), ("full", "fsdp"),
         ("lora", "zero3-live")]  # objective.reference=live: each step's reference forward through ZeRO-3's shards
RESUMED = [("lora", "zero3"), ("full", "fsdp")]  # stopped after step SAVE's checkpoint, started again


def _args(technique: str, parallel: str) -> list[str]:
    args = [*COMMON, *TECHNIQUE[technique]]
    if parallel.endswith("-live"):
        parallel = parallel.removesuffix("-live")
        args.append("objective.reference=live")
    if parallel != "single":
        args += [f"parallel={parallel}", "launcher.nproc_per_node=2"]
    if parallel == "zero3":
        args.append(ZERO3_PARTITION_ALL)  # every parameter partitioned, as a real model's layers are
    return args


def _name(technique: str, parallel: str) -> str:
    return f"dpo-{technique}-{parallel}"


for _technique in TECHNIQUE:
    declare_run(_name(_technique, "single"), _args(_technique, "single"), ranks=1, share=SHARED_RUNS)
for _technique, _parallel in CELLS:
    _a = declare_run(_name(_technique, _parallel), _args(_technique, _parallel), share=SHARED_RUNS)
    if (_technique, _parallel) in RESUMED:
        declare_run(_a + "-resumed", _args(_technique, _parallel), resume_from=(_a, SAVE), share=SHARED_RUNS)


@pytest.mark.parametrize("technique, parallel", CELLS)
def test_dpo_on_two_ranks_matches_one_process(trainings, technique, parallel):
    single, _ = trainings.finished(_name(technique, "single"))
    run, _ = trainings.finished(_name(technique, parallel))
    assert summary_of(run)["world_size"] == 2
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
        a, b = step_metrics(single, key), step_metrics(run, key)
        assert len(a) == len(b) == STEPS
        for step, (x, y) in enumerate(zip(a, b), start=1):
            assert y == pytest.approx(x, rel=1e-4, abs=1e-7), f"step {step} {key}: single {x} vs {parallel} {y}"
    assert step_metrics(single)[-1] < step_metrics(single)[0]  # it learns
    ref_single = load_file(f"{single}/reference_logps.safetensors")
    ref_run = load_file(f"{run}/reference_logps.safetensors")
    for name in ref_run:  # each rank scored half the chunks; gathered, the same bits (live: eval only)
        assert torch.equal(ref_run[name], ref_single[name]), name
    a, b = summary_of(single)["eval_after"], summary_of(run)["eval_after"]
    for key in ("preference_accuracy", "reward_accuracy"):
        assert a[key] == b[key], key
    assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-4)
    assert b["reward_margin"] > 0.5  # the tuned model prefers the chosen answers more than the reference does


@pytest.mark.parametrize("technique, parallel", RESUMED)
def test_dpo_resumes_exactly_on_a_sharded_engine(trainings, technique, parallel):
    """The resumed run takes the reference's log-probs from the run directory (computed from the
    model as built, never from the trained weights it loads) and ends bit for bit where the run
    never stopped ends."""
    a, _ = trainings.finished(_name(technique, parallel))
    b, log = trainings.finished(_name(technique, parallel) + "-resumed")
    assert summary_of(b)["resumed_from"].endswith(f"step_{SAVE:06d}")
    assert f"step {SAVE + 1}/{STEPS} " in log and f"step {SAVE}/{STEPS} " not in log  # trained from step 4 only
    for key in ("loss", "rewards/margins", "grad_norm"):
        assert step_metrics(b, key) == step_metrics(a, key), key
    a_weights, b_weights = final_weights(a), final_weights(b)
    assert a_weights and set(a_weights) == set(b_weights)
    assert all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)
