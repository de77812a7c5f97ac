"""Dry run: exact parameter counts and per-GPU memory for a config on a cluster, before submitting.


    python -m distft.plan +experiment=qlora_13b cluster=a100_40g_8x launcher.nproc_per_node=4
    python -m distft.plan model=llama_65b parallel=zero3 launcher.nnodes=2 launcher.nproc_per_node=8 plan.format=json

Prints parameter counts, per-GPU (and per-node) weights, gradients, optimizer state,
activations and a fixed overhead, whether that fits the cluster's GPUs with `plan.margin`
headroom, and when it does not the single changes that make it fit; tokens/s and step time from
the cluster's peak FLOP/s at an assumed `plan.mfu`. `plan.format=json` for scripts. The SLURM
launcher runs the same plan before submitting (launchers/slurm.py). Every run reports its
measured peak next to this estimate (summary.json `memory`); on 2 CPU ranks the two agree within
10% (tests/distributed/test_memory.py; measured 1-4% for DDP, FSDP with LoRA and checkpointing,
ZeRO-3). bf16 on GPUs is derived from the same saved-tensor accounting, not yet measured.

By concern: architecture.py (the model a run will build, its exact parameter counts), memory.py
(per-GPU and per-node bytes, term by term, and whether they fit), timing.py (tokens/s, step and
epoch time), advice.py (the changes that make a plan fit), report.py (the whole plan as text or
JSON, the command line, the launchers' refusal). The names below are the planner's API.
"""

from distft.plan.architecture import PlanInputError, count_parameters, from_fields, with_architecture
from distft.plan.memory import (
    ADAMW_8BIT_BYTES,
    NF4_BYTES,
    NF4_DOUBLE_QUANT_BYTES,
    host_bytes,
    model_state_bytes,
    optimizer_bytes,
    per_gpu_bytes,
    verdict,
)
from distft.plan.report import format_text, main, plan, refusal

__all__ = ["ADAMW_8BIT_BYTES", "NF4_BYTES", "NF4_DOUBLE_QUANT_BYTES", "PlanInputError", "count_parameters",
           "format_text", "from_fields", "host_bytes", "main", "model_state_bytes", "optimizer_bytes",
           "per_gpu_bytes", "plan", "refusal", "verdict", "with_architecture"]
