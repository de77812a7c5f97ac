"""Dry run: exact parameter counts and per-GPU memory for a config on a cluster, before submitting.

    python -m distft.plan +experiment=qlora_13b cluster=a100_40g_8x launcher.nproc_per_node=4
    python -m distft.plan model=llama_65b parallel=zero3 launcher.nnodes=2 launcher.nproc_per_node=8 plan.format=json

(work in progress, issue 6: parameter counts and model-state memory; activations, fit advice and
time estimates follow.)

Parameters are counted on a model built on the meta device from the preset's architecture (no
memory, no download: a hub id's own config.json is not fetched), with the technique applied the
way training applies it (PEFT adapters or virtual tokens on the meta device too). QLoRA's 4-bit
layers cannot be built on meta: the base is counted unquantised and the weights bitsandbytes
would quantise (every nn.Linear of the decoder layers; the output head stays in the compute
dtype) are reported as `params_quantized`.

Model-state bytes per GPU, by engine (P all parameters, T trainable, W ranks sharing the state,
L the largest decoder layer's parameters, b the bytes of the model dtype: 2 for bf16, 4 for fp32):
- DDP: weights P·b, gradients T·b, AdamW moments 2·T·b (torch keeps them in the parameter dtype;
  distft trains bf16 models without fp32 masters under DDP and FSDP).
- FSDP: the same, divided by W; plus one layer gathered for compute (L·b, params; its gradient
  is reduce-scattered as it is produced).
- ZeRO (DeepSpeed keeps fp32 masters and fp32 optimizer state with bf16 params; its accounting in
  `estimate_zero{2,3}_model_states_mem_needs`): ZeRO-1 weights 2P, grads 2T + 4T/W, optimizer
  12T/W; ZeRO-2 weights 2P, grads 6T/W, optimizer 12T/W (2P + 18T/W for full fine-tuning, as
  DeepSpeed's estimator); ZeRO-3 weights 2P/W + 4L (the gathered working layer, params and
  gradients), grads 4T/W, optimizer 12T/W (4L + 18P/W, as DeepSpeed's). Offload moves the
  optimizer (and with offload_param the weights) to host memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from distft.config import Config, world_size

# bitsandbytes 4-bit: half a byte per weight plus the block scales (blocksize 64): one fp32 absmax
# per block, or with double quantisation one byte per block plus one fp32 per 256 blocks.
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class ParameterCounts:
    total: int  # every parameter of the trained model (base + adapter or virtual tokens)
    trainable: int
    frozen: int
    quantized: int  # frozen base weights stored in 4 bits (QLoRA), part of `frozen`
    largest_layer: int  # parameters of the largest decoder layer (ZeRO-3 / FSDP gather unit)


def build_meta_model(cfg: Config):
    """The model training would build, on the meta device (adapters included)."""
    import torch
    from transformers import LlamaForCausalLM

    from distft.model import llama_config
    from distft.techniques import peft_config

    config = llama_config(cfg.model)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        peft = peft_config(cfg.technique)
        if peft is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft)
    if cfg.technique.name == "full":
        model.requires_grad_(True)
    return model


def count_parameters(cfg: Config) -> ParameterCounts:
    import torch

    model = build_meta_model(cfg)
    unique = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    quantized = 0
    if cfg.technique.name == "qlora":
        quantized = sum(module.weight.numel() for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear) and ".layers." in name and not module.weight.requires_grad
                        and not _is_adapter(name))
    layers = [m for name, m in model.named_modules() if type(m).__name__ == "LlamaDecoderLayer"]
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    return ParameterCounts(total, trainable, total - trainable, quantized, largest)


def _is_adapter(name: str) -> bool:
    return any(part in name for part in ("lora_", "magnitude_vector"))


def param_bytes(cfg: Config) -> int:
    """Bytes per parameter of the model dtype on the cluster's accelerators (auto: bf16 on GPUs)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        return 2 if cfg.cluster.gpus_per_node > 0 else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def model_state_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer state (see the module docstring)."""
    strategy, ws = cfg.parallel.strategy, world_size(cfg)
    p, t, q, largest = counts.total, counts.trainable, counts.quantized, counts.largest_layer
    b = param_bytes(cfg)
    quant = NF4_DOUBLE_QUANT_BYTES if cfg.technique.double_quant else NF4_BYTES
    unquantized = p - q
    if strategy in ("single", "ddp"):
        weights, grads, optimizer = unquantized * b + q * quant, t * b, 2 * t * b
    elif strategy == "fsdp":
        shard = ws if not cfg.parallel.fsdp.hybrid_shard else (cfg.parallel.fsdp.shard_size or cfg.launcher.nproc_per_node)
        weights = (unquantized * b + q * quant) / shard + largest * b
        grads, optimizer = t * b / shard, 2 * t * b / shard
        if cfg.parallel.fsdp.cpu_offload:
            weights, grads, optimizer = largest * b, 0, 0
    else:  # DeepSpeed ZeRO, bf16 params with fp32 masters and optimizer state
        ds = cfg.parallel.deepspeed
        stored = unquantized * 2 + q * quant
        if strategy == "zero1":
            weights, grads, optimizer = stored, 2 * t + 4 * t / ws, 12 * t / ws
        elif strategy == "zero2":
            weights, grads, optimizer = stored, 6 * t / ws, 12 * t / ws
        else:
            weights, grads, optimizer = stored / ws + 4 * largest, 4 * t / ws, 12 * t / ws
            if ds.offload_param:
                weights = 4 * largest
        if ds.offload_optimizer:
            optimizer = 0
            grads = 0 if strategy != "zero1" else 2 * t
    return {"weights": int(weights), "grads": int(grads), "optimizer": int(optimizer)}


def plan(cfg: Config) -> dict:
    counts = count_parameters(cfg)
    states = model_state_bytes(cfg, counts)
    per_gpu = {**states, "total": sum(states.values())}
    capacity = int(cfg.cluster.gpu_memory_gb * 1024**3) if cfg.cluster.gpu_memory_gb else None
    return {
        "model": cfg.model.name, "technique": cfg.technique.name, "parallel": cfg.parallel.strategy,
        "world_size": world_size(cfg), "cluster": cfg.cluster.name,
        "params_total": counts.total, "params_trainable": counts.trainable, "params_frozen": counts.frozen,
        "params_quantized": counts.quantized, "largest_layer_params": counts.largest_layer,
        "per_gpu_bytes": per_gpu,
        "gpu_memory_bytes": capacity,
        "fits": None if capacity is None else per_gpu["total"] <= capacity,
        "counts": asdict(counts),
    }


def main(argv: Optional[list[str]] = None) -> int:  # pragma: no cover - thin CLI, tested through plan()
    import json
    import sys

    from distft.preflight import format_errors, preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    fmt = "text"
    rest = []
    for arg in argv:
        if arg.startswith("plan.format="):
            fmt = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    cfg, errors = preflight(rest)
    if errors:
        print(format_errors(errors), file=sys.stderr)
        return 2
    result = plan(cfg)
    if fmt == "json":
        print(json.dumps(result, indent=2))
        return 0
    gib = 1024**3
    print(f"{result['model']} {result['technique']} on {result['parallel']} x {result['world_size']} ranks "
          f"({result['cluster']})")
    print(f"  parameters: {result['params_total']:,} total, {result['params_trainable']:,} trainable, "
          f"{result['params_quantized']:,} quantized")
    for key, value in result["per_gpu_bytes"].items():
        print(f"  {key:>10}: {value / gib:8.2f} GiB per GPU")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
