"""DeepSpeed ZeRO-1/2/3 on 2 real gloo ranks on the CPU: whole runs in the session's shared launches
(helpers.engine_run: each rank runs `distft.train.train` as the launcher's rank processes do).

Equivalence is the backbone: the same seed and global batch give the same step losses on one
process (the plain engine) and on ZeRO-2 and ZeRO-3 over 2 ranks, for full fine-tuning and LoRA.
Tolerance: relative 1e-5 on each of the 10 step losses, 2e-4 on the grad norms (fp32). The runs
see the same rows in the same optimizer steps and differ only in the order of float sums: ZeRO
reduces each micro-batch's gradients into partitions and accumulates there (sum over ranks, then
over micro-batches), the plain engine the other way round, and DeepSpeed sums the norm per
partition. Measured worst case over 10 Adam steps: losses 2e-7 relative; grad norms 5e-7 (full)
and 2.2e-5 (LoRA on ZeRO-3, step 10; 1.6e-6 for DDP), because at LoRA's lr the step's gradient is
a sum of per-token terms that largely cancel, which magnifies rounding differences in the norm,
not in the update (the losses stay within 2e-7). Why norms are compared too: a constant factor on
the gradient (divided by the accumulation steps again, averaged instead of summed over ranks)
barely changes Adam's update, but moves the logged norm by that factor (x0.5 here) and changes
clipping; a norm over one partition moves it by ~30%. An update per micro-batch or a rank seeing
other data moves the losses by >1e-3 from step 2. LoRA runs with technique.dropout=0: dropout
masks come from each rank's own RNG.

The matrix (every technique on every ZeRO preset) runs in one 2-rank launch of
matrix_worker.py, one process group for all cells, to keep start-up costs out of CI.

zero3_offload runs DeepSpeed's CPU Adam, a C++ op DeepSpeed compiles on first use (~40 s on 2
cores) into ~/.cache/torch_extensions; `make setup` compiles it while pip installs the rest.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.distributed.helpers import (
    TECHNIQUES,
    ZERO3_PARTITION_ALL,
    check_matrix_cell,
    engine_run,
    launch_matrix,
    summary_of,
)

PARTITION_ALL = ZERO3_PARTITION_ALL  # every parameter of the tiny model partitioned, as a real model's layers are
RTOL = 1e-5  # losses, eval losses
GRAD_NORM_RTOL = 2e-4
PRESETS = ("zero1", "zero2", "zero3", "zero3_offload")
# The matrix's steps: the presets' global batch (16 rows) as one micro-batch of 8 per rank. Each
# micro-batch costs ZeRO-3 a round of parameter fetches in its forward and backward whatever its
# size, so this halves the matrix's time; accumulation itself is checked where it is exact, in
# test_zero_on_two_ranks_matches_one_process (2 micro-batches per rank on ZeRO-2 and ZeRO-3).
ONE_MICRO_BATCH = ["train.micro_batch_size=8"]
# (preset, technique) -> a fragment of validate()'s message. Every combination trains today; a rule
# that starts rejecting one must be added here with its reason, and a cell listed here must be refused.
EXPECTED_REJECTIONS: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------- config, no processes


def _config(*overrides: str):
    from distft.preflight import preflight

    cfg, errors = preflight(list(overrides))
    return cfg, errors


def test_deepspeed_config_is_derived_from_ours():
    import torch

    from distft.engines.deepspeed import deepspeed_config

    cfg, errors = _config(
        "+experiment=tiny_lora", "parallel=zero3_offload", "launcher.nproc_per_node=2",
        "train.global_batch_size=32", "train.micro_batch_size=2", "train.grad_clip=0.5", "train.precision=bf16",
        "+parallel.deepspeed.overrides.zero_optimization={offload_optimizer:{pin_memory:true},"
        "stage3_prefetch_bucket_size:1000}",
        "+parallel.deepspeed.overrides.steps_per_print=7", "+parallel.deepspeed.overrides.wall_clock_breakdown=true",
    )
    assert errors == []
    ds = deepspeed_config(cfg, torch.device("cpu"))
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 8  # 32 / (2 per rank x 2 ranks)
    assert ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    # Overrides merge into nested sections key by key and replace scalars.
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu"},
        "stage3_prefetch_bucket_size": 1000,
    }
    assert ds["steps_per_print"] == 7 and ds["wall_clock_breakdown"] is True
    assert "optimizer" not in ds and "scheduler" not in ds  # ours are passed to deepspeed.initialize

    cfg, errors = _config("+experiment=tiny_full", "parallel=zero2", "launcher.nproc_per_node=2")
    assert errors == []
    ds = deepspeed_config(cfg, torch.device("cpu"))  # precision auto on the CPU: fp32
    assert "bf16" not in ds and "fp16" not in ds
    assert ds["zero_optimization"] == {"stage": 2}
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    cfg.train.precision = "fp16"
    assert deepspeed_config(cfg, torch.device("cpu"))["fp16"] == {"enabled": True}
    cfg.parallel.strategy = "zero1"
    cfg.parallel.deepspeed.offload_optimizer = True
    cfg.parallel.deepspeed.offload_param = True  # stage 1 has no weights to offload (validate refuses it)
    assert deepspeed_config(cfg, torch.device("cpu"))["zero_optimization"] == {
        "stage": 1, "offload_optimizer": {"device": "cpu"}}


def test_validation_refuses_what_deepspeed_cannot_do_or_would_configure_twice():
    _, errors = _config(
        "+experiment=tiny_full", "parallel=zero2", "launcher.nproc_per_node=2", "train.device=cpu",
        "train.precision=fp16",
        "+parallel.deepspeed.overrides.train_batch_size=64", "+parallel.deepspeed.overrides.optimizer={type:Adam}",
        "+parallel.deepspeed.overrides.zero_optimization={stage:3,offload_param:{device:cpu}}",
    )
    text = "\n".join(errors)
    assert "DeepSpeed's CPU accelerator has no fp16" in text
    assert "parallel.deepspeed.overrides.train_batch_size is derived from the config; set train.global_batch_size" in text
    assert "parallel.deepspeed.overrides.optimizer is derived" in text
    assert "parallel.deepspeed.overrides.zero_optimization.stage is derived" in text
    assert "zero_optimization.offload_param needs parallel.deepspeed.offload_param=true" in text
    assert len(errors) == 5, errors
    _, errors = _config("+experiment=tiny_full", "parallel=zero2", "launcher.nproc_per_node=2",
                        "parallel.deepspeed.offload_param=true")
    assert errors == ["parallel.deepspeed.offload_param=true needs parallel=zero3 (got zero2)"]
    # Refining an enabled offload is what overrides are for.
    _, errors = _config("+experiment=tiny_full", "parallel=zero3_offload", "launcher.nproc_per_node=2",
                        "+parallel.deepspeed.overrides.zero_optimization={offload_param:{pin_memory:true}}")
    assert errors == []


# ---------------------------------------------- equivalence: whole runs in the shared launches

for _technique in ("full", "lora"):
    for _parallel in ("single", "zero2", "zero3"):
        engine_run(_technique, _parallel)


def _run(trainings, technique: str, parallel: str) -> str:
    """Run dir of `+experiment=tiny_<technique> parallel=<parallel>` (helpers.engine_run), each rank logging."""
    run_dir, _ = trainings.finished(engine_run(technique, parallel))
    if parallel != "single":
        logs = trainings[engine_run(technique, parallel)]["logs"]
        assert "[rank0]" in logs[0] and "[rank1]" in logs[1]
    return run_dir


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("technique", ["full", "lora"])
@pytest.mark.parametrize("parallel", ["zero2", "zero3"])
def test_zero_on_two_ranks_matches_one_process(trainings, technique, parallel):
    single_dir = _run(trainings, technique, "single")
    zero_dir = _run(trainings, technique, parallel)
    a, b = _metrics(single_dir), _metrics(zero_dir)
    assert len(a) == len(b) == 10
    assert b[-1]["loss"] < b[0]["loss"] * 0.95  # it learns
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert y["loss"] == pytest.approx(x["loss"], rel=RTOL), f"step {step}: single {x['loss']} vs {parallel} {y['loss']}"
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=GRAD_NORM_RTOL), f"step {step}: grad norm"
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-12), f"step {step}: lr"
    summary = summary_of(zero_dir)
    assert (summary["parallel"], summary["world_size"]) == (parallel, 2)
    # Held-out loss and generation after training ran on every rank in lockstep (ZeRO-3 gathers
    # the weights in its forward hooks) and give the one-process numbers.
    single = summary_of(single_dir)
    assert summary["eval_after"]["loss"] == pytest.approx(single["eval_after"]["loss"], rel=RTOL)
    assert summary["eval_before"]["loss"] == pytest.approx(single["eval_before"]["loss"], rel=1e-6)
    assert summary["eval_after"]["f1"] == pytest.approx(single["eval_after"]["f1"])


@pytest.mark.parametrize("technique", ["lora", "full"])
def test_checkpoint_saved_from_zero3_reloads_on_one_process(trainings, technique):
    """The checkpoint of a 2-rank ZeRO-3 run (weights gathered from the shards; for LoRA the adapter)
    reproduces the distributed model's held-out loss on one process. Tolerance: relative 1e-6; both
    sides are fp32 forwards of the same weights on the same batches (measured: bit-identical)."""
    import torch
    from safetensors.torch import load_file

    from distft.checkpoint.export import load_model
    from distft.checkpoint.verify import resolve_checkpoint
    from distft.data.batching import eval_batches
    from distft.data.pipeline import pad_token_id, prepare_data
    from distft.evaluation.evaluate import held_out_loss

    run_dir = _run(trainings, technique, "zero3")
    cfg, model, tokenizer = load_model(run_dir)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.data.seed)
    held_out = eval_batches(data.eval, cfg.eval.batch_size, cfg.data.max_seq_len, cfg.data.packing,
                            pad_token_id(tokenizer), cfg.data.pack_strategy)
    if cfg.train.eval_max_batches:
        held_out = held_out[: cfg.train.eval_max_batches]
    loss = held_out_loss(model, held_out, torch.device("cpu"))["loss"]
    summary = summary_of(run_dir)
    assert loss == pytest.approx(summary["eval_after"]["loss"], rel=1e-6)
    assert loss < summary["eval_before"]["loss"] * 0.95  # the reloaded model is the tuned one, not the base
    if technique == "full":
        return
    adapter = load_file(os.path.join(resolve_checkpoint(run_dir), "model", "adapter_model.safetensors"))
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 4 * 7 + 1  # 7 linears in each of 4 layers, and lm_head
    assert all(t.numel() > 0 for t in adapter.values())
    # lora_B starts at zero: non-zero values are the trained update, not placeholders of a shard.
    assert all(float(adapter[k].abs().max()) > 0 for k in lora_b)


# ---------------------------------------------------------------------------------------- matrix


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    return launch_matrix(tmp_path_factory.mktemp("ds-matrix"), PRESETS, [PARTITION_ALL, *ONE_MICRO_BATCH])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_technique_trains_on_zero_or_is_refused_with_the_reason(matrix, preset):
    for technique in TECHNIQUES:
        cell = matrix[f"{preset}/{technique}"]
        where = f"{preset}/{technique}"
        if (preset, technique) in EXPECTED_REJECTIONS:
            assert any(EXPECTED_REJECTIONS[preset, technique] in e for e in cell.get("rejected", [])), (where, cell)
            continue
        check_matrix_cell(cell, where, gathered=preset.startswith("zero3"))


def test_every_zero_preset_takes_the_same_steps(matrix):
    """Partitioning (stages 1-3) and offload (DeepSpeedCPUAdam instead of torch's AdamW) change where
    the optimizer runs, not what it computes: the same technique gives the same losses on each
    preset. Measured over 5 steps: within 1e-7 relative, except QLoRA (1.2e-4): its 4-bit layers
    compute in bf16 (technique.compute_dtype), which turns float-order differences into bf16 ulps."""
    for technique in TECHNIQUES:
        reference = matrix[f"zero1/{technique}"]["losses"]
        for preset in PRESETS[1:]:
            losses = matrix[f"{preset}/{technique}"]["losses"]
            rtol = 1e-3 if technique == "qlora" else RTOL
            assert losses == pytest.approx(reference, rel=rtol), (preset, technique)

