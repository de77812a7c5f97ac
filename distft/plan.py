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

Parameters are counted on a model built on the meta device from the preset's architecture (no
memory, no download: a hub id's own config.json is not fetched), with the technique applied the
way training applies it (PEFT adapters or virtual tokens on the meta device too). QLoRA's 4-bit
layers cannot be built on meta: the base is counted unquantised and the weights bitsandbytes
would quantise (every nn.Linear of the decoder layers; the output head stays in the compute
dtype) are reported as `params_quantized`.

Model-state bytes per GPU, by engine (P all parameters, T trainable, W ranks sharing the state,
L the largest FSDP unit's parameters, b the bytes of the model dtype: 2 for bf16, 4 for fp32):
- DDP: weights P·a, gradients T·a, AdamW moments 2·T·a (torch keeps them in the parameter dtype;
  a = 4: full fine-tuning keeps fp32 master weights, engines.weights_dtype; 2 with
  train.pure_bf16), and under 16-bit autocast the bf16 copies of the linear weights autograd
  keeps (autocast_copy_bytes); activations in the compute dtype (compute_bytes). PEFT stores adapters and
  virtual tokens in fp32 (T·4 for their weights, gradients, and 2·T·4 moments), and QLoRA's
  preparation the frozen unquantised weights (embeddings, norms, head) too: trainable_bytes(),
  frozen_bytes().
- FSDP: the same, divided by W; plus the largest unit gathered for compute (L·c, c the compute
  dtype's bytes: MixedPrecisionPolicy gathers in it; a decoder layer,
  or the root's embeddings, norm and head; gradients are reduce-scattered as they are produced).
- ZeRO (DeepSpeed keeps fp32 masters and fp32 optimizer state next to the bf16 params; its
  accounting in `estimate_zero{2,3}_model_states_mem_needs`), with b = 2 for bf16: ZeRO-1
  weights bP, grads bT + 4T/W, optimizer 12T/W; ZeRO-2 weights bP, grads (b + 4)T/W,
  optimizer 12T/W (2P + 18T/W for full fine-tuning, as DeepSpeed's estimator); ZeRO-3 weights
  bP/W + 2bM (M: the most parameters one module holds, DeepSpeed's "largest layer"; gathered
  params and grads), grads 4T/W, optimizer 12T/W (4M + 18P/W, as DeepSpeed's). Offload moves
  the optimizer (and with offload_param the weights) to host memory.

Terms beyond the model states (DeepSpeed's estimator has none of them):
- `comm`, communication buffers: DDP's reducer keeps every gradient once more in its buckets
  (T·b; torch's default, gradient_as_bucket_view=False); FSDP reduce-scatters one unit's
  unsharded gradients (the largest unit's trainable parameters · b); DeepSpeed allocates its
  gradient reduce bucket at full size whatever the model (`reduce_bucket_size`, 5e8 elements
  unless parallel.deepspeed.overrides says otherwise: 1 GB in bf16), in the model dtype (ZeRO-1
  with bf16: fp32), twice with ZeRO-1/2's `overlap_comm`; none without `contiguous_gradients`.
- `activations`: see activation_bytes().
- `overhead`: plan.overhead_gb per GPU (CUDA context, allocator fragmentation, kernels'
  workspaces; 1 GiB).

Host memory of one node (`per_node_host_bytes`, checked against cluster.cpu_memory_gb with the
same margin; cluster=local: this machine's memory): see host_bytes(). The classic failure it
catches: eight ranks of a 70B ZeRO-3 job each loading the whole base before DeepSpeed partitions
it (8 x 128 GiB on a 1 TiB node), where FSDP loads one copy per node.

Time: tokens/s = GPUs x peak FLOP/s x plan.mfu / FLOPs per token (the MFU formula of
distft/tracking.py); per step, the data-parallel traffic of one rank (gradient all-reduce,
or ZeRO-3/FSDP's gathers and reduce-scatter) at the profile's bandwidth (the inter-node one
shared by a node's GPUs as soon as there are 2 nodes) is reported too; a step takes the
longer of the two (communication overlaps compute). Time per epoch: the run's data pipeline
on up to plan.epoch_sample_rows rows with the model's own tokenizer (local files only; none:
no epoch estimate), packed into sequences, extrapolated to all rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from distft.config import Config, model_label, world_size
from distft.model import ParameterCounts
from distft.model import count_parameters as count_model_parameters

# bitsandbytes 4-bit: half a byte per weight plus the block scales (blocksize 64): one fp32 absmax
# per block, or with double quantisation one byte per block plus one fp32 per 256 blocks.
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes' 8-bit AdamW: two uint8 moments plus one fp32 absmax per 256-element block for each;
# tensors under BNB_MIN_8BIT_SIZE elements keep two fp32 moments. Its paged optimizers allocate
# state in CUDA unified memory only for tensors of at least BNB_MIN_PAGED_SIZE elements.
ADAMW_8BIT_BYTES = 2 + 2 * 4 / 256


ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")


def model_config_file(name_or_path: Optional[str]) -> Optional[str]:
    """The config.json of a model on local disk: in its directory, or in the Hugging Face cache
    for a hub id (looked up offline: planning never downloads)."""
    import os

    if not name_or_path:
        return None
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: there is nothing cached under it
        return None
    return found if isinstance(found, str) else None


class PlanInputError(ValueError):
    """Something the plan reads besides the config is unusable (a model's config.json)."""


def with_architecture(cfg: Config) -> tuple[Config, str]:
    """cfg with the architecture the run will really build, and where it came from: a model's own
    config.json when it is on local disk (training loads that, whatever the preset's fields say;
    fields it leaves out take transformers' defaults, as they will when it loads), else the
    preset's fields."""
    import json
    import os

    path = model_config_file(cfg.model.name_or_path)
    if path is None:
        if cfg.model.name_or_path is None:
            return cfg, f"model={cfg.model.name} from scratch"
        return cfg, (f"the model={cfg.model.name} preset's fields ({cfg.model.name_or_path!r} has no config.json "
                     "on local disk)")
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError) as err:
        raise PlanInputError(f"model.name_or_path: {path} cannot be read as JSON ({err}); fix or replace it") from err
    from transformers import AutoConfig, LlamaConfig

    model_type = found.get("model_type", "llama")
    try:
        config = (LlamaConfig(**found) if model_type == "llama" else
                  AutoConfig.from_pretrained(os.path.dirname(path), local_files_only=True,
                                             trust_remote_code=cfg.model.trust_remote_code))
    except Exception:  # noqa: BLE001 - a type transformers does not know here: its sizes on LLaMA's defaults
        config = LlamaConfig(**{k: v for k, v in found.items() if k != "model_type"})
    defaults = LlamaConfig()
    fields = {}
    for name in ARCHITECTURE_FIELDS:
        value = getattr(config, name, None)
        fields[name] = value if value is not None else getattr(defaults, name)
    if not getattr(config, "num_key_value_heads", None):
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if model_type == "llama":
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields)), path
    source = f"{path} (model_type {model_type!r}: counted as a LLaMA of its sizes, approximate)"
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields)), source


def count_parameters(cfg: Config) -> ParameterCounts:
    """Exact counts for the configured model. Decoder layers are all alike, so every count is
    linear in their number: meta models of one and of two layers give it exactly (asserted for
    every preset against the published counts), in a fraction of a second where building all 80
    layers of a 65B, adapters included, takes seconds, once more for each piece of advice."""

    layers = cfg.model.num_hidden_layers
    if layers <= 2:
        return _count_built(cfg)
    one, two = (_count_built(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_hidden_layers=n)))
                for n in (1, 2))

    def scaled(field: str) -> int:
        return getattr(one, field) + (layers - 1) * (getattr(two, field) - getattr(one, field))

    return ParameterCounts(scaled("total"), scaled("trainable"), scaled("frozen"), scaled("quantized"),
                           two.largest_layer, two.largest_module, scaled("trainable_below_8bit"),
                           scaled("trainable_below_paging"))


def _count_built(cfg: Config) -> ParameterCounts:
    from distft.techniques import build_meta_model

    model = build_meta_model(from_fields(cfg))
    return count_model_parameters(model, quantized_base=cfg.technique.name == "qlora")


def from_fields(cfg: Config) -> Config:
    """cfg whose model is built from its architecture fields (with_architecture put a local
    model's own there): nothing is read from name_or_path, no attention kernel needs installing."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=None, attn_implementation="sdpa"))


def param_bytes(cfg: Config) -> int:
    """Bytes per parameter of the model dtype on the cluster's accelerators (auto: bf16 on GPUs)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        return 2 if cfg.cluster.gpus_per_node > 0 else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def fp32_masters(cfg: Config) -> bool:
    """Full fine-tuning on single/ddp/fsdp keeps its weights in fp32 (engines.weights_dtype),
    unless train.pure_bf16. (ZeRO keeps its own fp32 masters: its formulas below.)"""
    return (cfg.technique.name == "full" and cfg.parallel.strategy in ("single", "ddp", "fsdp")
            and not cfg.train.pure_bf16)


def amp16(cfg: Config) -> bool:
    """Whether the forward runs under 16-bit autocast (train.precision; auto: bf16 on GPUs)."""
    precision = cfg.train.precision
    return precision in ("bf16", "fp16") or (precision == "auto" and cfg.cluster.gpus_per_node > 0)


def compute_bytes(cfg: Config) -> int:
    """Bytes of the compute dtype: activations, FSDP's gathered units. 2 under 16-bit autocast,
    else the dtype the weights are stored in."""
    if amp16(cfg):
        return 2
    if cfg.technique.name == "full" and cfg.parallel.strategy in ("single", "ddp", "fsdp"):
        return 2 if cfg.train.pure_bf16 else 4
    return param_bytes(cfg)


def trainable_bytes(cfg: Config) -> int:
    """Bytes per trainable parameter as stored (its gradient and each AdamW moment alike). Full
    fine-tuning: fp32 master weights on single/ddp/fsdp (2 with train.pure_bf16); PEFT keeps
    adapters and virtual tokens in fp32 whatever the base's dtype (get_peft_model's
    autocast_adapter_dtype); DeepSpeed casts the whole module to its 16-bit dtype (and keeps its
    fp32 masters apart: model_state_bytes)."""
    if cfg.parallel.strategy.startswith("zero"):
        return param_bytes(cfg)
    if cfg.technique.name == "full":
        return 4 if fp32_masters(cfg) else 2
    return 4


def autocast_copy_bytes(cfg: Config, counts: ParameterCounts) -> int:
    """16-bit copies of fp32 weights that autocast makes in forward and autograd keeps for
    backward (single/DDP full fine-tuning with fp32 masters under 16-bit autocast): every linear
    layer's weight, the output head included (the embeddings and norms run in fp32). FSDP gathers
    16-bit parameters itself (MixedPrecisionPolicy), so autocast has nothing to cast there."""
    if not (fp32_masters(cfg) and amp16(cfg) and cfg.parallel.strategy in ("single", "ddp")):
        return 0
    from distft.model import llama_config

    model = llama_config(cfg.model)
    embeddings = model.vocab_size * model.hidden_size
    norms = (2 * model.num_hidden_layers + 1) * model.hidden_size
    linear = counts.total - norms - (0 if model.tie_word_embeddings else embeddings)
    return 2 * linear


def frozen_bytes(cfg: Config) -> int:
    """Bytes per frozen, unquantised parameter as stored: QLoRA's preparation
    (peft.prepare_model_for_kbit_training) casts everything not in 4 bits to fp32 (embeddings,
    norms, head); DeepSpeed casts it back."""
    if cfg.technique.name == "qlora" and not cfg.parallel.strategy.startswith("zero"):
        return 4
    return param_bytes(cfg)


def model_state_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer state (see the module docstring)."""
    strategy, ws = cfg.parallel.strategy, world_size(cfg)
    p, t, q = counts.total, counts.trainable, counts.quantized
    b, a = param_bytes(cfg), trainable_bytes(cfg)
    quant = NF4_DOUBLE_QUANT_BYTES if cfg.technique.double_quant else NF4_BYTES
    unquantized = p - q
    held = (unquantized - t) * frozen_bytes(cfg) + t * a + q * quant  # the model as the engine receives it
    if strategy in ("single", "ddp"):
        weights, grads, optimizer = held, t * a, optimizer_bytes(cfg, counts)["resident"]
    elif strategy == "fsdp":
        shard = ws if not cfg.parallel.fsdp.hybrid_shard else (cfg.parallel.fsdp.shard_size or cfg.launcher.nproc_per_node)
        gathered = counts.largest_layer * compute_bytes(cfg)  # MixedPrecisionPolicy gathers in the compute dtype
        weights = held / shard + gathered
        grads, optimizer = t * a / shard, 2 * t * a / shard
        if cfg.parallel.fsdp.cpu_offload:
            weights, grads, optimizer = gathered, 0, 0
    else:  # DeepSpeed ZeRO, bf16 params with fp32 masters and optimizer state
        ds = cfg.parallel.deepspeed
        stored = unquantized * b + q * quant
        if strategy == "zero1":
            weights, grads, optimizer = stored, b * t + 4 * t / ws, 12 * t / ws
        elif strategy == "zero2":
            weights, grads, optimizer = stored, (b + 4) * t / ws, 12 * t / ws
        else:
            working = 2 * b * counts.largest_module  # the module being computed: its params and grads
            weights, grads, optimizer = stored / ws + working, 4 * t / ws, 12 * t / ws
            if ds.offload_param:
                weights = working
        if ds.offload_optimizer:
            optimizer = 0
            grads = 0 if strategy != "zero1" else 2 * t
    return {"weights": int(weights), "grads": int(grads), "optimizer": int(optimizer)}


def optimizer_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    """One rank's optimizer state on single/ddp (the only engines bitsandbytes' optimizers run
    on): `resident` in the accelerator's memory, `paged` in CUDA unified memory (paged_* on GPUs),
    which the driver moves to host memory when the GPU runs short, so it is not part of the GPU's
    total. adamw: two moments in the dtype of what trains (trainable_bytes); adamw_8bit: see
    ADAMW_8BIT_BYTES; paged_adamw_32bit: two fp32 moments whatever the parameters' dtype."""
    t, small, unpaged = counts.trainable, counts.trainable_below_8bit, counts.trainable_below_paging
    name = cfg.train.optimizer
    if name == "adamw":
        return {"resident": int(2 * t * trainable_bytes(cfg)), "paged": 0}

    def state(elements: int, below_8bit: int) -> float:
        if name.endswith("32bit"):
            return 8 * elements
        return 8 * below_8bit + ADAMW_8BIT_BYTES * (elements - below_8bit)

    if not name.startswith("paged") or cfg.cluster.gpus_per_node == 0:  # bitsandbytes pages on CUDA only
        return {"resident": int(state(t, small)), "paged": 0}
    resident = state(unpaged, small)
    return {"resident": int(resident), "paged": int(state(t, small) - resident)}


def host_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    """Host memory of one node at its peak: the larger of loading and the engine's offloaded
    state (the loaded copies are handed to the GPUs before the offloaded state is allocated), plus
    plan.host_overhead_gb per rank process.

    - `load`: every rank builds the whole trainable model on the CPU before the engine moves or
      partitions it (DDP, ZeRO: distft does not use zero.Init), except FSDP on several ranks,
      where rank 0 builds the one real copy and the others start on the meta device. A copy is
      P·b for pretrained weights, P·4 for a from-scratch base drawn on the CPU (initialised in
      fp32, then cast), nothing with model.init_device=cuda, and for QLoRA from a checkpoint one
      decoder layer at a time (bitsandbytes quantises each weight onto the GPU as it loads).
    - `offload`: ZeRO's offload_optimizer keeps fp32 masters, gradients and Adam moments in host
      memory, 16 bytes per trainable parameter shared by all ranks, and offload_param the
      16-bit weights (b per parameter): per node 16T/N (+ bP/N) for N nodes, DeepSpeed's own
      `estimate_zero3_model_states_mem_needs(..., zero_init=True)` (tested). FSDP's cpu_offload
      keeps each rank's shards of weights, gradients and optimizer state there.
    """
    n, nodes, technique = cfg.launcher.nproc_per_node, cfg.launcher.nnodes, cfg.technique.name
    p, t, b = counts.total, counts.trainable, param_bytes(cfg)
    if fp32_masters(cfg):
        b = 4  # loaded in fp32 (engines.weights_dtype)
    if cfg.model.name_or_path is None:
        copy = 0 if cfg.model.init_device == "cuda" else p * 4
    elif technique == "qlora":
        copy = counts.largest_layer * b
    else:
        copy = p * b
    meta = cfg.parallel.strategy == "fsdp" and world_size(cfg) > 1 and technique != "qlora"
    load = copy if meta else n * copy
    offload = 0
    ds = cfg.parallel.deepspeed
    if cfg.parallel.strategy.startswith("zero"):
        if ds.offload_optimizer:
            offload += 16 * t / nodes
        if cfg.parallel.strategy == "zero3" and ds.offload_param:  # the weights as stored (QLoRA: 4-bit)
            quant = NF4_DOUBLE_QUANT_BYTES if cfg.technique.double_quant else NF4_BYTES
            offload += ((p - counts.quantized) * b + counts.quantized * quant) / nodes
    elif cfg.parallel.strategy == "fsdp" and cfg.parallel.fsdp.cpu_offload:
        # What each rank would keep on its GPU without the offload, less the unit gathered for compute.
        on_gpu = model_state_bytes(dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, fsdp=dataclasses.replace(cfg.parallel.fsdp, cpu_offload=False))), counts)
        gathered = counts.largest_layer * compute_bytes(cfg)
        offload = n * (on_gpu["weights"] - gathered + on_gpu["grads"] + on_gpu["optimizer"])
    if cfg.parallel.strategy in ("single", "ddp"):
        offload += n * optimizer_bytes(cfg, counts)["paged"]  # at worst all of it paged out
    out = {"load": int(load), "offload": int(offload), "overhead": int(n * cfg.plan.host_overhead_gb * 1024**3)}
    out["total"] = max(out["load"], out["offload"]) + out["overhead"]
    return out


def host_capacity_bytes(cfg: Config) -> Optional[int]:
    """One node's host memory: the cluster profile's, or for a local launch on cluster=local this
    machine's (a SLURM job's nodes are not the login node); a SLURM job's own memory request
    (launcher.mem_gb) when smaller, since the job is held to it. None: unknown."""
    capacity = None
    if cfg.cluster.cpu_memory_gb:
        capacity = int(cfg.cluster.cpu_memory_gb * 1024**3)
    elif cfg.cluster.name == "local" and cfg.launcher.kind == "local":
        import os

        try:
            capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            capacity = None
    if cfg.launcher.kind == "slurm" and cfg.launcher.mem_gb:
        requested = int(cfg.launcher.mem_gb * 1024**3)
        capacity = requested if capacity is None else min(capacity, requested)
    return capacity


def comm_bytes(cfg: Config, counts: ParameterCounts) -> int:
    """Per-GPU communication buffers (see the module docstring)."""
    strategy, t = cfg.parallel.strategy, counts.trainable
    if strategy == "single" or (strategy == "ddp" and world_size(cfg) == 1):
        return 0
    if strategy == "ddp":
        return t * trainable_bytes(cfg)  # buckets hold gradients in their parameters' dtype
    if strategy == "fsdp":
        return 0 if cfg.parallel.fsdp.cpu_offload else min(counts.largest_layer, t) * param_bytes(cfg)
    zero = dict((cfg.parallel.deepspeed.overrides or {}).get("zero_optimization") or {})
    if not zero.get("contiguous_gradients", True):
        return 0
    bucket = int(float(zero.get("reduce_bucket_size", 5e8)))  # allocated at full size, whatever the model's
    if strategy == "zero3":
        return bucket * param_bytes(cfg)
    width = 4 if strategy == "zero1" else param_bytes(cfg)  # ZeRO-1 accumulates 16-bit gradients in fp32
    return bucket * width * (2 if zero.get("overlap_comm", False) else 1)


def activation_bytes(cfg: Config, counts: ParameterCounts) -> int:
    """Per-GPU activation memory of one micro-batch (m sequences of s tokens) at its peak, the
    start of backward: what autograd saved in forward plus the backward's working set.

    Bytes per token and decoder layer (b: the model dtype's bytes; h hidden, k key/value width,
    i MLP width), as autograd saves them in HF's LLaMA with SDPA (no s x s scores; measured with
    saved_tensors_hooks: within 1% for the tiny model in fp32):
    - each of the two RMSNorms: its fp32 input copy, 4h, and when its weight trains (full
      fine-tuning) the normalised tensor, bh;
    - attention: rotated q and k, v and the SDPA output, (2h + 2k)b; the MLP: gate, SiLU and up
      outputs, 3ib;
    - the inputs of the linear layers when their weights train or a LoRA reads them directly
      (full fine-tuning, or adapters without dropout): both norms' outputs, the attention
      output and the MLP product, (3h + i)b. Frozen weights do not keep their inputs;
    - LoRA/DoRA/QLoRA with dropout: the dropped-out copy of each adapted input and its mask,
      (6h + i)(b + d): d = 1 on GPUs (a bool mask), b on the CPU (torch keeps a float mask).
    Gradient checkpointing keeps each layer's input (h·b) and recomputes one layer at a time.
    Outside the layers: the final norm, and the logits in the model dtype with their fp32 copy
    and the log-softmax for the loss (m·s·V·(b + 8); 8 in fp32, where the copy is the logits).
    The backward working set is the larger of the logits' gradient (fp32 and model dtype,
    m·s·V·(4 + b)) and one MLP's gradients (3·m·s·i·b). Kernels' workspaces are in
    plan.overhead_gb.

    QLoRA on one process or DDP with a 16-bit model: the preparation's fp32 embeddings make the
    residual stream fp32, and bitsandbytes returns each 4-bit layer's output in its input's
    dtype, so the MLP's gate, SiLU and up outputs are kept in fp32: 3i·4 instead of 3i·b
    (measured on an H200, LLaMA-7B, 1 x 2048 tokens: 24.6 GiB against 19.5 planned without
    this term and the fp32 storage of model_state_bytes, bench/RESULTS.md). FSDP gathers in the
    16-bit dtype and DeepSpeed casts the model, so neither does this.
    """
    from distft.model import llama_config

    model = llama_config(cfg.model)  # the preset's architecture, defaults filled in
    m, s, b = cfg.train.micro_batch_size, cfg.data.max_seq_len, compute_bytes(cfg)
    technique = cfg.technique.name
    if technique in ("prefix", "prompt"):
        s += cfg.technique.num_virtual_tokens
    h, i, v = model.hidden_size, model.intermediate_size, model.vocab_size
    k = h * model.num_key_value_heads // model.num_attention_heads
    adapters = technique in ("lora", "qlora", "dora")
    dropout = adapters and cfg.technique.dropout > 0
    inputs_kept = technique == "full" or (adapters and not dropout)
    # The normalised output is in the weights' dtype: fp32 over fp32 masters on single/DDP (the
    # residual stream is fp32 there; autocast only lowers the linear layers), else the compute dtype.
    stream = 4 if fp32_masters(cfg) and cfg.parallel.strategy in ("single", "ddp") else b
    norm = 4 * h + (stream * h if technique == "full" else 0)
    fp32_stream = technique == "qlora" and cfg.parallel.strategy in ("single", "ddp")
    mlp = 3 * i * (4 if fp32_stream else b)
    per_layer = 2 * norm + (2 * h + 2 * k) * b + mlp
    if inputs_kept:
        per_layer += (3 * h + i) * b
    if dropout:
        per_layer += (6 * h + i) * (b + (1 if cfg.cluster.gpus_per_node > 0 else b))
    layers = model.num_hidden_layers
    kept = layers * (h * b) + per_layer if cfg.train.gradient_checkpointing else layers * per_layer
    final_norm = norm + (h * b if inputs_kept else 0)
    logits = v * (b + 8 if b != 4 else 8)
    working = max(v * (4 + b if b != 4 else 4), mlp)
    return int(m * s * (kept + final_norm + logits + working)) + autocast_copy_bytes(cfg, counts)


def per_gpu_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    states = model_state_bytes(cfg, counts)
    out = {**states, "comm": comm_bytes(cfg, counts), "activations": activation_bytes(cfg, counts),
           "overhead": int(cfg.plan.overhead_gb * 1024**3)}
    out["total"] = sum(out.values())
    if cfg.parallel.strategy in ("single", "ddp"):
        paged = optimizer_bytes(cfg, counts)["paged"]
        if paged:
            out["paged"] = paged  # not in the total: unified memory gives way to the GPU's own allocations
    return out


def _within(cfg: Config, total: int, capacity: Optional[int]) -> Optional[bool]:
    return None if not capacity else total <= capacity * (1 - cfg.plan.margin)


def verdict(cfg: Config, counts: ParameterCounts) -> dict:
    """Per-GPU and per-node host bytes and whether each fits its capacity with plan.margin
    headroom (None: capacity unknown). `fits`: both, known once the GPU's size is."""
    per_gpu, host = per_gpu_bytes(cfg, counts), host_bytes(cfg, counts)
    gpu_capacity = int(cfg.cluster.gpu_memory_gb * 1024**3) if cfg.cluster.gpu_memory_gb else None
    host_capacity = host_capacity_bytes(cfg)
    gpu_fits, host_fits = _within(cfg, per_gpu["total"], gpu_capacity), _within(cfg, host["total"], host_capacity)
    return {"per_gpu_bytes": per_gpu, "gpu_memory_bytes": gpu_capacity, "per_node_host_bytes": host,
            "host_memory_bytes": host_capacity, "host_fits": host_fits,
            "fits": None if gpu_fits is None else gpu_fits and host_fits is not False}


def advice(cfg: Config, counts: ParameterCounts) -> list[dict]:
    """When the plan does not fit: single changes that make it fit, cheapest first (what they
    cost: recomputation, smaller steps, more communication, host memory, precision, GPUs)."""
    candidates: list[tuple[str, list[str]]] = []
    if not cfg.train.gradient_checkpointing:
        candidates.append(("recompute activations in backward (~30% slower steps)", ["train.gradient_checkpointing=true"]))
    for mb in (cfg.train.micro_batch_size // 2, 1):
        if 0 < mb < cfg.train.micro_batch_size:
            candidates.append((f"micro-batch {mb} (more accumulation, same global batch)", [f"train.micro_batch_size={mb}"]))
    if cfg.train.optimizer == "adamw" and cfg.parallel.strategy in ("single", "ddp"):
        candidates.append(("8-bit AdamW state (bitsandbytes)", ["train.optimizer=adamw_8bit"]))
        candidates.append(("8-bit AdamW state, paged to host memory when the GPU runs short (QLoRA's optimizer)",
                           ["train.optimizer=paged_adamw_8bit"]))
    ladder = ["ddp", "zero1", "zero2", "fsdp", "zero3"]
    strategy = cfg.parallel.strategy if cfg.parallel.strategy in ladder else "ddp"
    for stronger in ladder[ladder.index(strategy) + 1:]:
        candidates.append((f"shard more state ({stronger})", [f"parallel={stronger}"]))
    if strategy == "zero3":
        candidates.append(("one copy of the base per node while loading (fsdp)", ["parallel=fsdp"]))
    candidates.append(("optimizer state in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true"]))
    candidates.append(("weights and optimizer in host memory", ["parallel=zero3", "parallel.deepspeed.offload_optimizer=true",
                                                                "parallel.deepspeed.offload_param=true"]))
    if cfg.technique.name in ("full", "lora", "dora"):
        candidates.append(("4-bit base with LoRA (QLoRA)", ["technique=qlora"]))
    nodes, per_node = cfg.launcher.nnodes, cfg.launcher.nproc_per_node
    worlds = [(f"all {cfg.cluster.gpus_per_node} GPUs of each node", nodes, cfg.cluster.gpus_per_node)]
    worlds += [(f"{factor}x the nodes", nodes * factor, per_node) for factor in (2, 4, 8, 16)]
    for why, new_nodes, new_per_node in worlds:
        overrides = _world_change(cfg, new_nodes, new_per_node) if new_per_node >= per_node else None
        if overrides:
            candidates.append((why, overrides))
    counted: dict[str, ParameterCounts] = {}
    groups_cache: dict = {}

    def try_change(why: str, overrides: list[str]) -> Optional[dict]:
        # A local launch on several nodes also needs the first node's address; any will do to plan.
        needs_endpoint = cfg.launcher.kind != "slurm" and not cfg.launcher.rdzv_endpoint and any(
            o.startswith("launcher.nnodes=") and o != "launcher.nnodes=1" for o in overrides)
        changed = _apply(cfg, overrides + (["launcher.rdzv_endpoint=first-node:29500"] if needs_endpoint else []),
                         groups_cache)
        if needs_endpoint:
            why += "; a local launch also needs launcher.rdzv_endpoint=HOST:PORT"
        if changed is None:
            return None
        technique = next((o for o in overrides if o.startswith("technique")), None)
        if technique and technique not in counted:
            counted[technique] = count_parameters(changed)
        result = verdict(changed, counted[technique] if technique else counts)
        if not result["fits"]:
            return None
        return {"change": " ".join(overrides), "why": why, "per_gpu_total_bytes": result["per_gpu_bytes"]["total"],
                "per_node_host_bytes": result["per_node_host_bytes"]["total"]}

    found = [item for item in (try_change(why, overrides) for why, overrides in candidates) if item]
    if not found:  # no single change: two together, cheapest pairs first
        pairs = [(i, j) for i in range(len(candidates)) for j in range(i + 1, len(candidates))
                 if not _conflict(candidates[i][1], candidates[j][1])]
        for i, j in sorted(pairs, key=sum):
            item = try_change(f"{candidates[i][0]}; {candidates[j][0]}", candidates[i][1] + candidates[j][1])
            if item:
                found.append(item)
            if len(found) == 5:
                break
    return found[:5]


def _world_change(cfg: Config, nodes: int, per_node: int) -> Optional[list[str]]:
    """Overrides that run the job on `nodes` x `per_node` ranks with the same global batch (and a
    smaller micro-batch where the old one no longer divides it); None when nothing changes or the
    global batch cannot be shared by that many ranks."""
    launcher, train = cfg.launcher, cfg.train
    world = nodes * per_node
    if (nodes, per_node) == (launcher.nnodes, launcher.nproc_per_node) or train.global_batch_size % world:
        return None
    per_rank = train.global_batch_size // world
    micro = max(d for d in range(1, min(train.micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    if launcher.kind == "slurm":
        out = [f"launcher.nodes={nodes}"] if nodes != launcher.nnodes else []
        if per_node != launcher.nproc_per_node:
            out += [f"launcher.gpus_per_node={per_node}", f"launcher.tasks_per_node={per_node}"]
    else:
        out = [f"launcher.nnodes={nodes}"] if nodes != launcher.nnodes else []
        if per_node != launcher.nproc_per_node:
            out.append(f"launcher.nproc_per_node={per_node}")
    return out + ([f"train.micro_batch_size={micro}"] if micro != train.micro_batch_size else [])


def _conflict(one: list[str], other: list[str]) -> bool:
    """Two changes that set the same thing (two engines, two micro-batch sizes, ...)."""
    def keys(overrides: list[str]) -> set[str]:
        return {o.split("=", 1)[0].split(".")[0] if o.startswith("parallel") else o.split("=", 1)[0] for o in overrides}

    return bool(keys(one) & keys(other))


def _apply(cfg: Config, overrides: list[str], groups_cache: Optional[dict] = None) -> Optional[Config]:
    """cfg with overrides applied, or None when the result does not validate. Group choices
    (parallel=, technique=) are re-read from conf/ through OmegaConf, once per combination when a
    `groups_cache` is given; dotted keys are set on the dataclasses directly (advice tries a
    hundred combinations: through OmegaConf each took ~0.1 s)."""
    from distft.config import _size_slurm_job
    from distft.validation import validate

    groups = tuple(o for o in overrides if o.split("=", 1)[0] in ("parallel", "technique"))
    cache = groups_cache if groups_cache is not None else {}
    if groups not in cache:
        cache[groups] = _apply_groups(cfg, groups)
    changed = cache[groups]
    if changed is None:
        return None
    try:
        for override in overrides:
            key, value = override.split("=", 1)
            if key not in ("parallel", "technique"):
                changed = _replace_dotted(changed, key.split("."), _yaml_value(value))
    except (AttributeError, TypeError, ValueError):
        return None
    launcher = dataclasses.replace(changed.launcher)
    _size_slurm_job(launcher)
    changed = dataclasses.replace(changed, launcher=launcher)
    return changed if not validate(changed) else None


def _apply_groups(cfg: Config, groups: tuple[str, ...]) -> Optional[Config]:
    from omegaconf import OmegaConf

    from distft.config import to_config

    if not groups:
        return cfg
    node = OmegaConf.structured(cfg)
    for override in groups:
        key, value = override.split("=", 1)
        node[key] = OmegaConf.merge(node[key], OmegaConf.load(_conf_path(key, value)))
    try:
        return to_config(node)
    except Exception:  # noqa: BLE001 - a combination the schema refuses is not advice
        return None


def _replace_dotted(obj, path: list[str], value):
    """dataclasses.replace along a dotted path; the value converted to the field's current type."""
    if len(path) == 1:
        if not hasattr(obj, path[0]):
            raise AttributeError(path[0])
        current = getattr(obj, path[0])
        if isinstance(current, bool) and not isinstance(value, bool):
            raise TypeError(f"{path[0]} takes true/false")
        if isinstance(current, float) and isinstance(value, int):
            value = float(value)
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace_dotted(getattr(obj, path[0]), path[1:], value)})


def _conf_path(group: str, option: str) -> str:
    from distft.config import conf_dir

    return str(conf_dir() / group / f"{option}.yaml")


def _yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def comm_traffic_bytes(cfg: Config, counts: ParameterCounts) -> int:
    """Bytes one rank sends per optimizer step for data parallelism (ring collectives: an
    all-reduce sends 2(W-1)/W of the buffer, an all-gather or reduce-scatter (W-1)/W).
    DDP and ZeRO-1/2 reduce gradients (ZeRO also gathers updated weights) once per step; ZeRO-3
    and FSDP gather weights for forward and again for backward, and reduce-scatter gradients,
    on every micro-batch."""
    from distft.config import grad_accum_steps

    ws, strategy = world_size(cfg), cfg.parallel.strategy
    if ws == 1 or strategy == "single":
        return 0
    share = (ws - 1) / ws
    t, p, b = counts.trainable, counts.total - counts.quantized, param_bytes(cfg)
    if strategy == "ddp":
        return int(2 * share * t * b)
    if strategy in ("zero1", "zero2"):
        return int(2 * share * t * 2)
    gathers = 2 if strategy == "zero3" or cfg.parallel.fsdp.reshard_after_forward else 1
    width = 2 if strategy == "zero3" else b
    return int(share * (gathers * p + t) * width * grad_accum_steps(cfg))


def throughput(cfg: Config, counts: ParameterCounts) -> dict:
    """tokens/s and step time from the cluster's peak FLOP/s at an assumed MFU, and the
    data-parallel communication time per step at the profile's bandwidth."""
    from distft.tracking import flops_per_token

    flops = flops_per_token(counts.total, cfg.model.num_hidden_layers, cfg.model.hidden_size, cfg.data.max_seq_len,
                            full=cfg.technique.name == "full")
    out = {"flops_per_token": flops, "assumed_mfu": cfg.plan.mfu, "tokens_per_s": None, "compute_time_s": None,
           "comm_bytes_per_step": comm_traffic_bytes(cfg, counts), "comm_time_s": None, "step_time_s": None,
           "time_for_max_steps_s": None}
    c = cfg.cluster
    per_gpu_gbps = c.intra_node_gbps if cfg.launcher.nnodes == 1 else \
        min(c.intra_node_gbps or math.inf, c.inter_node_gbps / max(cfg.launcher.nproc_per_node, 1))
    if per_gpu_gbps and math.isfinite(per_gpu_gbps):
        out["comm_time_s"] = out["comm_bytes_per_step"] / (per_gpu_gbps * 1e9)
    if c.peak_tflops <= 0:
        return out
    compute_tokens_per_s = world_size(cfg) * c.peak_tflops * 1e12 * cfg.plan.mfu / flops
    step_tokens = cfg.train.global_batch_size * cfg.data.max_seq_len
    out["compute_time_s"] = step_tokens / compute_tokens_per_s
    out["step_time_s"] = max(out["compute_time_s"], out["comm_time_s"] or 0.0)
    out["tokens_per_s"] = step_tokens / out["step_time_s"]
    out["time_for_max_steps_s"] = out["step_time_s"] * cfg.train.max_steps
    return out


def epoch(cfg: Config, step_time_s: Optional[float]) -> dict:
    """Sequences, tokens and optimizer steps in one pass over the training data, and its time.

    The run's own pipeline (load, clean, template, tokenize, pack) on up to
    plan.epoch_sample_rows training rows, scaled to all of them. Needs the model's tokenizer
    on local disk (never downloaded here); without it: {"unknown": why}."""
    import random

    from distft.data import DataError, load_rows, prepare_data
    from distft.model import ModelLoadError, load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model, local_files_only=True)
    except (ModelLoadError, OSError, ValueError):
        where = cfg.model.tokenizer or cfg.model.name_or_path
        return {"unknown": f"the tokenizer {where!r} is not on local disk; set model.tokenizer=<local directory> "
                           "for a time per epoch"}
    try:
        train_raw, eval_raw = load_rows(cfg.data)
        sample = train_raw
        if len(train_raw) > cfg.plan.epoch_sample_rows > 0:
            sample = random.Random(cfg.data.seed).sample(train_raw, cfg.plan.epoch_sample_rows)
        data = prepare_data(cfg.data, tokenizer, seed=cfg.data.seed, rows=(sample, eval_raw))
    except (DataError, OSError, ValueError) as err:
        return {"unknown": f"the data could not be read: {err}"}
    scale = len(train_raw) / len(sample)
    sequences = math.ceil(data.report.train_sequences * scale)
    steps = math.ceil(sequences / cfg.train.global_batch_size)
    return {"train_rows": len(train_raw), "rows_read": len(sample), "extrapolated": scale != 1,
            "sequences": sequences, "tokens": sequences * cfg.data.max_seq_len if cfg.data.packing else
            math.ceil(data.report.train_tokens * scale), "steps": steps,
            "time_s": steps * step_time_s if step_time_s else None}


def plan(cfg: Config, with_epoch: bool = True) -> dict:
    """The whole plan (`with_epoch=False`: without the time per epoch, which runs the data
    pipeline on a sample of the data)."""
    cfg, architecture = with_architecture(cfg)
    counts = count_parameters(cfg)
    memory = verdict(cfg, counts)
    per_gpu, fits = memory["per_gpu_bytes"], memory["fits"]
    speed = throughput(cfg, counts)
    return {
        "model": model_label(cfg.model), "technique": cfg.technique.name, "parallel": cfg.parallel.strategy,
        "world_size": world_size(cfg), "nodes": cfg.launcher.nnodes, "cluster": cfg.cluster.name,
        "architecture": architecture,
        "params_total": counts.total, "params_trainable": counts.trainable, "params_frozen": counts.frozen,
        "params_quantized": counts.quantized, "largest_layer_params": counts.largest_layer,
        "largest_module_params": counts.largest_module,
        "per_gpu_bytes": per_gpu,
        "per_node_bytes": {k: v * cfg.launcher.nproc_per_node for k, v in per_gpu.items()},
        "gpu_memory_bytes": memory["gpu_memory_bytes"], "margin": cfg.plan.margin,
        "per_node_host_bytes": memory["per_node_host_bytes"], "host_memory_bytes": memory["host_memory_bytes"],
        "host_fits": memory["host_fits"],
        "fits": fits,
        "advice": advice(cfg, counts) if fits is False else [],
        "throughput": speed,
        "epoch": epoch(cfg, speed["step_time_s"]) if with_epoch else None,
    }


def format_text(result: dict) -> str:
    gib = 1024**3
    lines = [f"{result['model']} / {result['technique']} / {result['parallel']} on {result['world_size']} GPU(s), "
             f"{result['nodes']} node(s) of {result['cluster']}",
             f"  architecture: {result['architecture']}",
             f"  parameters: {result['params_total']:,} total, {result['params_trainable']:,} trainable, "
             f"{result['params_frozen']:,} frozen ({result['params_quantized']:,} in 4 bits)",
             "  per GPU:"]
    for key, value in result["per_gpu_bytes"].items():
        if key == "paged":
            lines.append(f"    + paged   {value / gib:9.2f} GiB of optimizer state in unified memory, not in the total: "
                         "it moves to host memory when the GPU runs short (slower steps then)")
        else:
            lines.append(f"    {key:<12}{value / gib:9.2f} GiB")
    host = result["per_node_host_bytes"]
    peak = "loading" if host["load"] >= host["offload"] else "offloaded state"
    line = (f"  host memory per node: {host['total'] / gib:.1f} GiB ({peak} {max(host['load'], host['offload']) / gib:.1f}"
            f" + processes {host['overhead'] / gib:.1f})")
    if result["host_memory_bytes"]:
        said = "fits" if result["host_fits"] else "does NOT fit"
        line += f", {said} in {result['host_memory_bytes'] / gib:.0f} GiB"
    lines.append(line)
    if result["gpu_memory_bytes"]:
        gpu_fits = result["per_gpu_bytes"]["total"] <= result["gpu_memory_bytes"] * (1 - result["margin"])
        said = "fits" if gpu_fits else "does NOT fit"
        lines.append(f"  {said} in {result['gpu_memory_bytes'] / gib:.0f} GiB with {result['margin']:.0%} headroom"
                     + (", but the node's host memory does not" if gpu_fits and result["host_fits"] is False else ""))
    for item in result["advice"]:
        lines.append(f"    would fit: {item['change']}  ({item['why']}; {item['per_gpu_total_bytes'] / gib:.1f} GiB per GPU, "
                     f"{item['per_node_host_bytes'] / gib:.0f} GiB host per node)")
    t, e = result["throughput"], result["epoch"]
    if t["tokens_per_s"]:
        comm = f", of which communication {t['comm_time_s']:.2f} s" if t["comm_time_s"] is not None else ""
        lines.append(f"  ~{t['tokens_per_s']:,.0f} tokens/s at MFU {t['assumed_mfu']:.0%}: {t['step_time_s']:.2f} s per step"
                     f"{comm}, {_duration(t['time_for_max_steps_s'])} for train.max_steps")
    if e is None:
        pass
    elif "unknown" in e:
        lines.append(f"  epoch: unknown ({e['unknown']})")
    else:
        when = f", {_duration(e['time_s'])}" if e["time_s"] else ""
        about = f" (from {e['rows_read']:,} of {e['train_rows']:,} rows)" if e["extrapolated"] else ""
        lines.append(f"  epoch: {e['sequences']:,} sequences, {e['tokens']:,} tokens, {e['steps']:,} steps{when}{about}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def refusal(cfg: Config, action: str, where: Optional[str] = None, verb: str = "start") -> Optional[str]:
    """What a launcher prints instead of starting a job whose plan does not fit
    `cluster.gpu_memory_gb` (`action`: "not submitted, nothing queued"; `verb`: what
    plan.override=true does anyway). None when it fits, when there is no GPU size to check against,
    or with plan.override=true. Only the memory is planned first (a fraction of a second once the
    libraries are imported); the whole plan, time per epoch aside, only for a refusal."""
    if not cfg.cluster.gpu_memory_gb or cfg.plan.override:
        return None
    _quiet_meta_build()
    architecture_cfg, _ = with_architecture(cfg)
    if verdict(architecture_cfg, count_parameters(architecture_cfg))["fits"] is not False:
        return None
    result = plan(cfg, with_epoch=False)
    return (f"distft: {action}: the plan does not fit {where or f'cluster={cfg.cluster.name}'} "
            f"(pass plan.override=true to {verb} it anyway):\n{format_text(result)}")


def _quiet_meta_build() -> None:
    """Nothing runs on the meta device, so libraries' hints about kernels and deprecations in
    the build (bitsandbytes' missing CPU 4-bit kernel, transformers' `is_gradient_checkpointing`)
    are noise above the plan; a real run still shows them."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m distft.plan [overrides]`: the same command line as a run, nothing started."""
    import json
    import sys

    from distft.preflight import format_errors, preflight

    # run_here=False: a plan is for the machines the config names, not for this one (a login node).
    cfg, errors = preflight(list(sys.argv[1:] if argv is None else argv), run_here=False)
    if errors:
        print(format_errors(errors), file=sys.stderr)
        return 2
    _quiet_meta_build()
    try:
        result = plan(cfg)
    except PlanInputError as err:
        print(f"distft.plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if cfg.plan.format == "json" else format_text(result))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
