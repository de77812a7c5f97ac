"""Dry run: exact parameter counts and per-GPU memory for a config on a cluster, before submitting.

    python -m distft.plan +experiment=qlora_13b cluster=a100_40g_8x launcher.nproc_per_node=4
    python -m distft.plan model=llama_65b parallel=zero3 launcher.nnodes=2 launcher.nproc_per_node=8 plan.format=json

Prints parameter counts, per-GPU (and per-node) weights, gradients, optimizer state,
activations and a fixed overhead, whether that fits the cluster's GPUs with `plan.margin`
headroom, and when it does not the single changes that make it fit; tokens/s and step time from
the cluster's peak FLOP/s at an assumed `plan.mfu`. `plan.format=json` for scripts. The SLURM
launcher runs the same plan before submitting (launchers/slurm.py). Not yet measured against
real runs: the activation formula's tolerance is issue 6's next step.

Parameters are counted on a model built on the meta device from the preset's architecture (no
memory, no download: a hub id's own config.json is not fetched), with the technique applied the
way training applies it (PEFT adapters or virtual tokens on the meta device too). QLoRA's 4-bit
layers cannot be built on meta: the base is counted unquantised and the weights bitsandbytes
would quantise (every nn.Linear of the decoder layers; the output head stays in the compute
dtype) are reported as `params_quantized`.

Model-state bytes per GPU, by engine (P all parameters, T trainable, W ranks sharing the state,
L the largest FSDP unit's parameters, b the bytes of the model dtype: 2 for bf16, 4 for fp32):
- DDP: weights P·b, gradients T·b, AdamW moments 2·T·b (torch keeps them in the parameter dtype;
  distft trains bf16 models without fp32 masters under DDP and FSDP).
- FSDP: the same, divided by W; plus the largest unit gathered for compute (L·b: a decoder layer,
  or the root's embeddings, norm and head; gradients are reduce-scattered as they are produced).
- ZeRO (DeepSpeed keeps fp32 masters and fp32 optimizer state with bf16 params; its accounting in
  `estimate_zero{2,3}_model_states_mem_needs`): ZeRO-1 weights 2P, grads 2T + 4T/W, optimizer
  12T/W; ZeRO-2 weights 2P, grads 6T/W, optimizer 12T/W (2P + 18T/W for full fine-tuning, as
  DeepSpeed's estimator); ZeRO-3 weights 2P/W + 4M (M: the most parameters one module holds,
  DeepSpeed's "largest layer"; gathered params and grads), grads 4T/W, optimizer 12T/W
  (4M + 18P/W, as DeepSpeed's). Offload moves the
  optimizer (and with offload_param the weights) to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    largest_layer: int  # FSDP's largest gather unit: a decoder layer, or the root (embeddings, norm, head)
    largest_module: int  # the most parameters one module holds itself (ZeRO-3 gathers module by module)


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
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in unique if id(p) not in in_layers)
    largest = max([root, *(sum(p.numel() for p in layer.parameters()) for layer in layers)])
    # DeepSpeed's own definition (deepspeed.runtime.zero.stage3.model_to_params).
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCounts(total, trainable, total - trainable, quantized, largest, largest_module)


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
    p, t, q = counts.total, counts.trainable, counts.quantized
    b = param_bytes(cfg)
    quant = NF4_DOUBLE_QUANT_BYTES if cfg.technique.double_quant else NF4_BYTES
    unquantized = p - q
    if strategy in ("single", "ddp"):
        weights, grads, optimizer = unquantized * b + q * quant, t * b, 2 * t * b
    elif strategy == "fsdp":
        shard = ws if not cfg.parallel.fsdp.hybrid_shard else (cfg.parallel.fsdp.shard_size or cfg.launcher.nproc_per_node)
        gathered = counts.largest_layer * b
        weights = (unquantized * b + q * quant) / shard + gathered
        grads, optimizer = t * b / shard, 2 * t * b / shard
        if cfg.parallel.fsdp.cpu_offload:
            weights, grads, optimizer = gathered, 0, 0
    else:  # DeepSpeed ZeRO, bf16 params with fp32 masters and optimizer state
        ds = cfg.parallel.deepspeed
        stored = unquantized * 2 + q * quant
        if strategy == "zero1":
            weights, grads, optimizer = stored, 2 * t + 4 * t / ws, 12 * t / ws
        elif strategy == "zero2":
            weights, grads, optimizer = stored, 6 * t / ws, 12 * t / ws
        else:
            working = 4 * counts.largest_module  # the module being computed: params and grads, 16-bit
            weights, grads, optimizer = stored / ws + working, 4 * t / ws, 12 * t / ws
            if ds.offload_param:
                weights = working
        if ds.offload_optimizer:
            optimizer = 0
            grads = 0 if strategy != "zero1" else 2 * t
    return {"weights": int(weights), "grads": int(grads), "optimizer": int(optimizer)}


def activation_bytes(cfg: Config, counts: ParameterCounts) -> int:
    """Per-GPU activations kept for backward in one micro-batch (m sequences of s tokens).

    Per decoder layer, in the model dtype (b bytes), what autograd keeps with SDPA/flash
    attention (no s x s score matrix): the two norms' inputs and outputs (4h), q, k, v and the
    rotated q, k (2h + 3k), the attention output (h), the MLP's gate, up, activation and product
    (4i): m·s·(7h + 3k + 4i)·b. LoRA/DoRA add their dropout's copy of each adapted input when
    dropout > 0 (~ m·s·(6h + i)·b per layer). Gradient checkpointing keeps only each layer's
    input (m·s·h·b) plus one layer recomputed at a time. The output head adds the logits in the
    model dtype, their fp32 copy for the loss and its gradient: m·s·V·(b + 8).
    An estimate: kernels' workspaces are in plan.overhead_gb.
    """
    from distft.model import llama_config

    model = llama_config(cfg.model)  # the preset's architecture, defaults filled in
    m, s, b = cfg.train.micro_batch_size, cfg.data.max_seq_len, param_bytes(cfg)
    if cfg.technique.name in ("prefix", "prompt"):
        s += cfg.technique.num_virtual_tokens
    h, i = model.hidden_size, model.intermediate_size
    k = h * model.num_key_value_heads // model.num_attention_heads
    per_layer = m * s * (7 * h + 3 * k + 4 * i) * b
    if cfg.technique.name in ("lora", "qlora", "dora") and cfg.technique.dropout > 0:
        per_layer += m * s * (6 * h + i) * b
    layers = model.num_hidden_layers
    kept = (layers * m * s * h * b + per_layer) if cfg.train.gradient_checkpointing else layers * per_layer
    return int(kept + m * s * model.vocab_size * (b + 8))


def per_gpu_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    states = model_state_bytes(cfg, counts)
    out = {**states, "activations": activation_bytes(cfg, counts), "overhead": int(cfg.plan.overhead_gb * 1024**3)}
    out["total"] = sum(out.values())
    return out


def _fits(cfg: Config, total: int) -> Optional[bool]:
    capacity = cfg.cluster.gpu_memory_gb * 1024**3
    return None if not capacity else total <= capacity * (1 - cfg.plan.margin)


def advice(cfg: Config, counts: ParameterCounts) -> list[dict]:
    """When the plan does not fit: single changes that make it fit, cheapest first (what they
    cost: recomputation, smaller steps, more communication, host memory, precision, GPUs)."""
    candidates: list[tuple[str, list[str]]] = []
    if not cfg.train.gradient_checkpointing:
        candidates.append(("recompute activations in backward (~30% slower steps)", ["train.gradient_checkpointing=true"]))
    for mb in (cfg.train.micro_batch_size // 2, 1):
        if 0 < mb < cfg.train.micro_batch_size:
            candidates.append((f"micro-batch {mb} (more accumulation, same global batch)", [f"train.micro_batch_size={mb}"]))
    ladder = ["ddp", "zero1", "zero2", "fsdp", "zero3"]
    strategy = cfg.parallel.strategy if cfg.parallel.strategy in ladder else "ddp"
    for stronger in ladder[ladder.index(strategy) + 1:]:
        candidates.append((f"shard more state ({stronger})", [f"parallel={stronger}"]))
    candidates.append(("optimizer state in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true"]))
    candidates.append(("weights and optimizer in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true",
                                                                "parallel.deepspeed.offload_param=true"]))
    if cfg.technique.name in ("full", "lora", "dora"):
        candidates.append(("4-bit base with LoRA (QLoRA)", ["technique=qlora"]))
    for factor in (2, 4, 8, 16):
        candidates.append((f"{factor}x the nodes", [f"launcher.nnodes={cfg.launcher.nnodes * factor}"]))
    found = []
    for why, overrides in candidates:
        changed = _apply(cfg, overrides)
        if changed is None:
            continue
        changed_counts = counts if not any(o.startswith("technique") for o in overrides) else count_parameters(changed)
        total = per_gpu_bytes(changed, changed_counts)["total"]
        if _fits(changed, total):
            found.append({"change": " ".join(overrides), "why": why, "per_gpu_total_bytes": total})
    return found[:5]


def _apply(cfg: Config, overrides: list[str]) -> Optional[Config]:
    """cfg with dotted overrides applied (group choices for parallel/technique re-read from conf/)."""
    from omegaconf import OmegaConf

    from distft.config import to_config

    node = OmegaConf.structured(cfg)
    for override in overrides:
        key, value = override.split("=", 1)
        if key in ("parallel", "technique"):
            group = OmegaConf.load(_conf_path(key, value))
            node[key] = OmegaConf.merge(node[key], group)
        else:
            OmegaConf.update(node, key, OmegaConf.create({"v": _yaml_value(value)})["v"], merge=True)
    try:
        changed = to_config(node)
    except Exception:
        return None
    from distft.validation import validate

    return changed if not validate(changed) else None


def _conf_path(group: str, option: str) -> str:
    from distft.config import conf_dir

    return str(conf_dir() / group / f"{option}.yaml")


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def throughput(cfg: Config, counts: ParameterCounts) -> dict:
    """tokens/s and time estimates from the cluster's peak FLOP/s and an assumed MFU."""
    from distft.tracking import flops_per_token

    flops = flops_per_token(counts.total, cfg.model.num_hidden_layers, cfg.model.hidden_size, cfg.data.max_seq_len,
                            full=cfg.technique.name == "full")
    if cfg.cluster.peak_tflops <= 0:
        return {"flops_per_token": flops, "tokens_per_s": None, "step_time_s": None, "time_for_max_steps_s": None}
    tokens_per_s = world_size(cfg) * cfg.cluster.peak_tflops * 1e12 * cfg.plan.mfu / flops
    step_tokens = cfg.train.global_batch_size * cfg.data.max_seq_len
    step = step_tokens / tokens_per_s
    return {"flops_per_token": flops, "tokens_per_s": tokens_per_s, "step_time_s": step,
            "time_for_max_steps_s": step * cfg.train.max_steps, "assumed_mfu": cfg.plan.mfu}


def plan(cfg: Config) -> dict:
    counts = count_parameters(cfg)
    per_gpu = per_gpu_bytes(cfg, counts)
    capacity = int(cfg.cluster.gpu_memory_gb * 1024**3) if cfg.cluster.gpu_memory_gb else None
    fits = _fits(cfg, per_gpu["total"])
    return {
        "model": cfg.model.name, "technique": cfg.technique.name, "parallel": cfg.parallel.strategy,
        "world_size": world_size(cfg), "nodes": cfg.launcher.nnodes, "cluster": cfg.cluster.name,
        "params_total": counts.total, "params_trainable": counts.trainable, "params_frozen": counts.frozen,
        "params_quantized": counts.quantized, "largest_layer_params": counts.largest_layer,
        "largest_module_params": counts.largest_module,
        "per_gpu_bytes": per_gpu,
        "per_node_bytes": {k: v * cfg.launcher.nproc_per_node for k, v in per_gpu.items()},
        "gpu_memory_bytes": capacity, "margin": cfg.plan.margin,
        "fits": fits,
        "advice": advice(cfg, counts) if fits is False else [],
        "throughput": throughput(cfg, counts),
    }


def format_text(result: dict) -> str:
    gib = 1024**3
    lines = [f"{result['model']} / {result['technique']} / {result['parallel']} on {result['world_size']} GPU(s), "
             f"{result['nodes']} node(s) of {result['cluster']}",
             f"  parameters: {result['params_total']:,} total, {result['params_trainable']:,} trainable, "
             f"{result['params_frozen']:,} frozen ({result['params_quantized']:,} in 4 bits)",
             "  per GPU:"]
    for key, value in result["per_gpu_bytes"].items():
        lines.append(f"    {key:<12}{value / gib:9.2f} GiB")
    if result["gpu_memory_bytes"]:
        verdict = "fits" if result["fits"] else "does NOT fit"
        lines.append(f"  {verdict} in {result['gpu_memory_bytes'] / gib:.0f} GiB with {result['margin']:.0%} headroom")
    for item in result["advice"]:
        lines.append(f"    would fit: {item['change']}  ({item['why']}; {item['per_gpu_total_bytes'] / gib:.1f} GiB)")
    t = result["throughput"]
    if t["tokens_per_s"]:
        lines.append(f"  ~{t['tokens_per_s']:,.0f} tokens/s at MFU {t['assumed_mfu']:.0%}: {t['step_time_s']:.2f} s per step, "
                     f"{t['time_for_max_steps_s'] / 3600:.1f} h for train.max_steps")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m distft.plan [overrides]`: the same command line as a run, nothing started."""
    import json
    import sys

    from distft.preflight import format_errors, preflight

    cfg, errors = preflight(list(sys.argv[1:] if argv is None else argv))
    if errors:
        print(format_errors(errors), file=sys.stderr)
        return 2
    result = plan(cfg)
    print(json.dumps(result, indent=2) if cfg.plan.format == "json" else format_text(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
