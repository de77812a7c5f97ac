"""The planner against what training allocates on the real SmolLM2-135M-Instruct and at a Llama-3
vocabulary (issue 36, section 2): tests/distributed/test_memory.py's measurement (every rank's
tensor allocations counted by torch's profiler, `tracking.cpu_memory_steps=2`) on the cells where
toy vocabularies hid the gap: before, the plan was 13-60% under on SmolLM2 (its 49k-token logits,
and weights the profiler did not see being loaded on transformers' thread pool) and counted a
3.2 GB loss at 128k against 4.15 GB measured.

Cells: LoRA on one process, LoRA on ZeRO-2 over 2 ranks (DeepSpeed's reduce bucket, allocated at
full size whatever the model), full fine-tuning on one process and on DDP and FSDP over 2 ranks,
and one 2048-token row at 128,256 tokens of vocabulary under tiny layers (the loss is the step).
bench/plan_accuracy.py measures these and more (LoRA on DDP and FSDP, full fine-tuning on ZeRO-2,
DoRA, ZeRO-3) at 4 x 256 tokens. Not yet within 15% there: ZeRO-3 LoRA (5.48 GiB against 4.48),
and FSDP full fine-tuning's rank 1 when activations are small (2 x 64 tokens: 1.91 GiB against
1.43 planned, rank 0 1.52).

Stated tolerance: 15% of the measured peak, every rank (measured: -7% to +9.4%, bench/RESULTS.md).
"""

from __future__ import annotations

import pytest

from distft.model.pretrained import smollm2_dir
from tests.distributed.helpers import declare_run, summary_of

SHARED_RUNS = "real-memory"
TOLERANCE = 0.15
PROFILED = ["train.max_steps=2", "eval.num_samples=1", "eval.max_new_tokens=1", "eval.compare_base=false",
            "train.eval_max_batches=1", "tracking.cpu_memory_steps=2", "checkpoint.save_every=0",
            "data.synthetic.num_examples=200", "tracking.plot=false", "tracking.wandb.mode=disabled"]
SMOLLM2 = [f"model.name_or_path={smollm2_dir() or 'SmolLM2-135M-Instruct-is-not-prepared'}", "data.max_seq_len=128",
           "train.micro_batch_size=4"]
CASES = {
    "smollm2-lora-single": ([*SMOLLM2, "technique=lora", "train.global_batch_size=4"], 1),
    "smollm2-lora-zero2": ([*SMOLLM2, "technique=lora", "parallel=zero2", "launcher.nproc_per_node=2",
                            "train.global_batch_size=8"], 2),
    # Full fine-tuning (fp32 master weights, the tied head's gradient made in forward) on one
    # process, and on 2 ranks: DDP's buckets beside the replicas, FSDP2's shards filled from rank 0.
    "smollm2-full-single": ([*SMOLLM2, "technique=full", "train.global_batch_size=4"], 1),
    "smollm2-full-ddp": ([*SMOLLM2, "technique=full", "parallel=ddp", "launcher.nproc_per_node=2",
                          "train.global_batch_size=8"], 2),
    "smollm2-full-fsdp": ([*SMOLLM2, "technique=full", "parallel=fsdp", "launcher.nproc_per_node=2",
                           "train.global_batch_size=8"], 2),
    "vocab128k-full-single": (["+experiment=tiny_full", "model.vocab_size=128256", "data.max_seq_len=2048",
                               "model.max_position_embeddings=2048", "train.micro_batch_size=1",
                               "train.global_batch_size=1"], 1),
}
for _name, (_args, _ranks) in CASES.items():
    declare_run(f"memory-{_name}", [*_args, *PROFILED], ranks=_ranks, share=SHARED_RUNS)


@pytest.fixture(scope="module")
def runs(smollm2, trainings):
    """The module's runs (one launch per rank count, the first time a test reads them); fails when
    SmolLM2 is missing."""
    return trainings


def within_plan(memory: dict, ranks: int) -> None:
    assert memory["kind"] == "cpu_tensors" and memory["cpu_profiled_steps"] == 2
    assert len(memory["training_gb_per_rank"]) == ranks
    for rank, measured in enumerate(memory["training_gb_per_rank"]):
        assert abs(memory["planned_gb"] / measured - 1) <= TOLERANCE, (rank, measured, memory["planned"])


@pytest.mark.parametrize("case", list(CASES))
def test_the_plan_is_within_15_percent_of_the_measured_peak(runs, case):
    run_dir, log = runs.finished(f"memory-{case}")
    memory = summary_of(run_dir)["memory"]
    within_plan(memory, CASES[case][1])
    assert f"GiB measured (live tensors), {memory['planned_gb']:.3f} GiB planned (" in log  # the run's one sentence
    if case.startswith("smollm2"):
        # SmolLM2's 135M weights, counted (fp32; FSDP: half of them and the gathered embedding)
        assert memory["planned"]["weights"] > (0.3 if case.endswith("fsdp") else 0.4)
        assert min(memory["training_gb_per_rank"]) > memory["planned"]["weights"]  # ... and measured
    if case == "smollm2-lora-zero2":
        assert memory["planned"]["comm"] > 1.8  # DeepSpeed's reduce bucket: 5e8 fp32 elements
    if case in ("smollm2-full-single", "smollm2-full-ddp"):
        # Fully replicated: fp32 weights and AdamW's two moments of 134.5M parameters, and the
        # buckets; the gradients are made as backward frees the activations (plan.memory's
        # step_gradient_bytes): only the tied head's, made in forward, is counted beside them.
        planned = memory["planned"]
        assert planned["optimizer"] == pytest.approx(2 * planned["weights"], rel=0.01)
        assert planned["comm"] == pytest.approx(planned["weights"] if case.endswith("ddp") else 0, rel=0.01)
        assert planned["grads"] == pytest.approx(49152 * 576 * 4 / 2**30, rel=0.01)
    if case == "smollm2-full-fsdp":
        # Each rank holds half of the fp32 weights, gradients and moments, and the largest gathered
        # layer (the tied embedding: 49152 x 576 fp32); rank 0's full copy for the fill is gone.
        planned = memory["planned"]
        assert planned["weights"] == pytest.approx(0.25 + 49152 * 576 * 4 / 2**30, rel=0.02)
        assert planned["optimizer"] == pytest.approx(0.5, rel=0.02)
        assert summary_of(run_dir)["model_build"] == "meta"
    if case == "vocab128k-full-single":
        # 4.15 GB before (the plan said 3.20); a 2048 x 128256 fp32 logits tensor alone is 0.98 GiB
        assert memory["training_gb_per_rank"][0] <= 1.0
