"""Dry run: exact parameter counts and per-GPU memory for a config on a cluster, before submitting.


    python -m distft.plan +experiment=qlora_13b cluster=a100_40g_8x launcher.nproc_per_node=4 parallel=ddp
    python -m distft.plan model=llama_65b parallel=zero3 launcher.nnodes=2 launcher.nproc_per_node=8 \\
        train.micro_batch_size=1 cluster=a100_80g_8x plan.format=json

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
JSON, the launchers' refusal); the command line is distft/commands/plan.py. The names below are
the planner's API, imported on first use.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distft.plan.architecture import count_parameters, from_fields, with_architecture
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
    from distft.plan.report import format_text, plan, refusal

# name -> the module defining it, imported when first asked for (PEP 562): `python -m distft.plan
# --help` runs this package's __main__ without importing torch (the meta build's modules).
_API = {
    **dict.fromkeys(("count_parameters", "from_fields", "with_architecture"), "distft.plan.architecture"),
    **dict.fromkeys(("ADAMW_8BIT_BYTES", "NF4_BYTES", "NF4_DOUBLE_QUANT_BYTES", "host_bytes", "model_state_bytes",
                     "optimizer_bytes", "per_gpu_bytes", "verdict"), "distft.plan.memory"),
    **dict.fromkeys(("format_text", "plan", "refusal"), "distft.plan.report"),
}

__all__ = ["ADAMW_8BIT_BYTES", "NF4_BYTES", "NF4_DOUBLE_QUANT_BYTES", "count_parameters", "format_text", "from_fields",
           "host_bytes", "model_state_bytes", "optimizer_bytes", "per_gpu_bytes", "plan", "refusal", "verdict",
           "with_architecture"]
assert sorted(__all__) == sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
