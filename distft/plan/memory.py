"""Memory per GPU and per node of a planned run, term by term, and whether it fits.

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
- On single/DDP without accumulation the `grads` term holds only what the gradients add to the
  peak (step_gradient_bytes): they are made as backward frees the layers' activations.
- `overhead`: plan.overhead_gb per GPU (CUDA context, allocator fragmentation, kernels'
  workspaces; 1 GiB).

Host memory of one node (`per_node_host_bytes`, checked against cluster.cpu_memory_gb with the
same margin; cluster=local: this machine's memory): see host_bytes(). The classic failure it
catches: eight ranks of a 70B ZeRO-3 job each loading the whole base before DeepSpeed partitions
it (8 x 128 GiB on a 1 TiB node), where FSDP loads one copy per node.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from distft.config import Config, grad_accum_steps, world_size
from distft.engines.kinds import engine_kind
from distft.model.build import ParameterCounts, llama_config
from distft.model.loss import chunk_tokens
from distft.techniques.kinds import technique_kind

# bitsandbytes 4-bit: half a byte per weight plus the block scales (blocksize 64): one fp32 absmax
# per block, or with double quantisation one byte per block plus one fp32 per 256 blocks.
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# bitsandbytes' 8-bit AdamW: two uint8 moments plus one fp32 absmax per 256-element block for each;
# tensors under BNB_MIN_8BIT_SIZE elements keep two fp32 moments. Its paged optimizers allocate
# state in CUDA unified memory only for tensors of at least BNB_MIN_PAGED_SIZE elements.
ADAMW_8BIT_BYTES = 2 + 2 * 4 / 256
def param_bytes(cfg: Config) -> int:
    """Bytes per parameter of the model dtype on the cluster's accelerators (auto: bf16 on GPUs)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        return 2 if cfg.cluster.gpus_per_node > 0 else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def fp32_masters(cfg: Config) -> bool:
    """Full fine-tuning on single/ddp/fsdp keeps its weights in fp32 (engines.weights_dtype),
    unless train.pure_bf16. (ZeRO keeps its own fp32 masters: its formulas below.)"""
    return (technique_kind(cfg.technique.name).trains_all_weights
            and engine_kind(cfg.parallel.strategy).fp32_master_weights and not cfg.train.pure_bf16)


def amp16(cfg: Config) -> bool:
    """Whether the forward runs under 16-bit autocast (train.precision; auto: bf16 on GPUs)."""
    precision = cfg.train.precision
    return precision in ("bf16", "fp16") or (precision == "auto" and cfg.cluster.gpus_per_node > 0)


def compute_bytes(cfg: Config) -> int:
    """Bytes of the compute dtype: activations, FSDP's gathered units. 2 under 16-bit autocast,
    else the dtype the weights are stored in."""
    if amp16(cfg):
        return 2
    if technique_kind(cfg.technique.name).trains_all_weights and engine_kind(cfg.parallel.strategy).fp32_master_weights:
        return 2 if cfg.train.pure_bf16 else 4
    return param_bytes(cfg)


def trainable_bytes(cfg: Config) -> int:
    """Bytes per trainable parameter as stored (its gradient and each AdamW moment alike). Full
    fine-tuning: fp32 master weights on single/ddp/fsdp (2 with train.pure_bf16); PEFT keeps
    adapters and virtual tokens in fp32 whatever the base's dtype (get_peft_model's
    autocast_adapter_dtype); DeepSpeed casts the whole module to its 16-bit dtype (and keeps its
    fp32 masters apart: model_state_bytes)."""
    if engine_kind(cfg.parallel.strategy).deepspeed:
        return param_bytes(cfg)
    if technique_kind(cfg.technique.name).trains_all_weights:
        return 4 if fp32_masters(cfg) else 2
    return 4


def autocast_copy_bytes(cfg: Config, counts: ParameterCounts) -> int:
    """16-bit copies of fp32 weights that autocast makes in forward and autograd keeps for
    backward (single/DDP full fine-tuning with fp32 masters under 16-bit autocast): every linear
    layer's weight, the output head included (the embeddings and norms run in fp32). FSDP gathers
    16-bit parameters itself (MixedPrecisionPolicy), so autocast has nothing to cast there."""
    if not (fp32_masters(cfg) and amp16(cfg) and engine_kind(cfg.parallel.strategy).keeps_model_dtype):
        return 0
    model = llama_config(cfg.model)
    embeddings = model.vocab_size * model.hidden_size
    norms = (2 * model.num_hidden_layers + 1) * model.hidden_size
    linear = counts.total - norms - (0 if model.tie_word_embeddings else embeddings)
    if chunked_loss(cfg):  # the head's copy is made and dropped inside the loss (loss_bytes)
        linear -= embeddings
    return 2 * linear


def chunked_loss(cfg: Config) -> bool:
    """Whether the loss runs through distft.model.loss's chunks: the head is a plain linear layer,
    unless a LoRA/DoRA/QLoRA adapts the head itself (objective=dpo too: its per-token log-probs,
    `computing_token_logps`)."""
    return not (technique_kind(cfg.technique.name).adapter and "lm_head" in cfg.technique.target_modules)


def rows_per_micro_batch(cfg: Config) -> int:
    """Sequences in one micro-batch: train.micro_batch_size, or twice that for objective=dpo,
    whose micro-batch is micro_batch_size pairs (the chosen answer and the rejected one)."""
    return cfg.train.micro_batch_size * (2 if cfg.objective.name == "dpo" else 1)


def loss_bytes(cfg: Config, tokens: int, vocab: int, hidden: int, stream: int) -> tuple[int, int]:
    """(kept, transient) bytes of the loss of one micro-batch of `tokens` positions
    (distft/model/loss.py), every position counted as a target (the worst case).

    Kept until backward: the gradient with respect to the hidden states, computed in forward,
    in the final norm's output dtype (`stream`), and the targets' mask and indices (9 bytes a
    token); when the head trains and the step accumulates micro-batches, its fp32 gradient
    [V, h] beside the one accumulated already.
    Transient, at the end of forward: one chunk's logits in fp32 and their log-softmax (8 bytes
    per logit; the compute dtype's logits and gradient fit beside them), the head's weight in
    the compute dtype where the weights are fp32 under 16-bit autocast, and when the head
    trains in 16 bits, each chunk's [V, h] gradient product before its fp32 sum.
    The plain path (a LoRA on the head) keeps the logits in the model dtype, their fp32 copy and
    the log-softmax (tokens·V·(b + 8)), then the logits' gradient (tokens·V·(4 + b)).
    objective=dpo's per-token log-probs keep the targets' hidden states instead of their gradient
    (the backward computes each chunk again), the log-probs (4 bytes a token) beside the mask and
    indices, and its backward allocates the head's fp32 gradient whenever the head trains."""
    b = compute_bytes(cfg)
    if not chunked_loss(cfg):
        return tokens * vocab * (b + 8 if b != 4 else 8), tokens * vocab * (4 + b if b != 4 else 4)
    head_trains = technique_kind(cfg.technique.name).trains_embeddings
    preference = cfg.objective.name == "dpo"
    kept = tokens * (hidden * stream + 9 + (4 if preference else 0))
    if head_trains and (grad_accum_steps(cfg) > 1 or preference):
        kept += vocab * hidden * 4
    transient = chunk_tokens(vocab, tokens) * vocab * 8
    if fp32_masters(cfg) and amp16(cfg):
        transient += vocab * hidden * b
    if head_trains and b != 4:
        transient += vocab * hidden * b
    return kept, transient


def frozen_bytes(cfg: Config) -> int:
    """Bytes per frozen, unquantised parameter as stored: QLoRA's preparation
    (peft.prepare_model_for_kbit_training) casts everything not in 4 bits to fp32 (embeddings,
    norms, head); DeepSpeed casts it back."""
    if technique_kind(cfg.technique.name).quantized_base and not engine_kind(cfg.parallel.strategy).deepspeed:
        return 4
    return param_bytes(cfg)


def model_state_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer state (see the module docstring)."""
    kind, ws = engine_kind(cfg.parallel.strategy), world_size(cfg)
    offloaded = kind.offloaded(cfg.parallel)
    p, t, q = counts.total, counts.trainable, counts.quantized
    b, a = param_bytes(cfg), trainable_bytes(cfg)
    quant = NF4_DOUBLE_QUANT_BYTES if cfg.technique.double_quant else NF4_BYTES
    unquantized = p - q
    held = (unquantized - t) * frozen_bytes(cfg) + t * a + q * quant  # the model as the engine receives it
    if kind.replicated:
        weights, grads, optimizer = held, t * a, optimizer_bytes(cfg, counts)["resident"]
    elif not kind.deepspeed:  # FSDP: weights, gradients and optimizer state sharded as the model holds them
        hybrid = kind.hybrid_shard and cfg.parallel.fsdp.hybrid_shard
        shard = ws if not hybrid else (cfg.parallel.fsdp.shard_size or cfg.launcher.nproc_per_node)
        gathered = counts.largest_layer * compute_bytes(cfg)  # MixedPrecisionPolicy gathers in the compute dtype
        weights = held / shard + gathered
        grads, optimizer = t * a / shard, 2 * t * a / shard
        if "weights" in offloaded:
            weights = gathered
        if "grads" in offloaded:
            grads = 0
        if "optimizer" in offloaded:
            optimizer = 0
    else:  # DeepSpeed ZeRO, bf16 params with fp32 masters and optimizer state
        stored = unquantized * b + q * quant
        if kind.shards_weights:  # ZeRO-3
            working = 2 * b * counts.largest_module  # the module being computed: its params and grads
            weights, grads, optimizer = stored / ws + working, 4 * t / ws, 12 * t / ws
            if "weights" in offloaded:
                weights = working
        elif kind.shards_grads:  # ZeRO-2
            weights, grads, optimizer = stored, (b + 4) * t / ws, 12 * t / ws
        else:  # ZeRO-1
            weights, grads, optimizer = stored, b * t + 4 * t / ws, 12 * t / ws
        if "optimizer" in offloaded:
            optimizer = 0
            grads = 0 if kind.shards_grads else 2 * t
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
    n, nodes = cfg.launcher.nproc_per_node, cfg.launcher.nnodes
    kind, quantized_base = engine_kind(cfg.parallel.strategy), technique_kind(cfg.technique.name).quantized_base
    p, t, b = counts.total, counts.trainable, param_bytes(cfg)
    if fp32_masters(cfg):
        b = 4  # loaded in fp32 (engines.weights_dtype)
    if cfg.model.name_or_path is None:
        copy = 0 if cfg.model.init_device == "cuda" else p * 4
    elif quantized_base:
        copy = counts.largest_layer * b
    else:
        copy = p * b
    meta = kind.meta_build and world_size(cfg) > 1 and not quantized_base  # build_model_for_engine
    load = copy if meta else n * copy
    offload = 0
    offloaded = kind.offloaded(cfg.parallel)
    if kind.deepspeed:
        if "optimizer" in offloaded:
            offload += 16 * t / nodes
        if "weights" in offloaded:  # the weights as stored (QLoRA: 4-bit)
            quant = NF4_DOUBLE_QUANT_BYTES if cfg.technique.double_quant else NF4_BYTES
            offload += ((p - counts.quantized) * b + counts.quantized * quant) / nodes
    elif offloaded:  # FSDP's cpu_offload
        # What each rank would keep on its GPU without the offload, less the unit gathered for compute.
        on_gpu = model_state_bytes(dataclasses.replace(cfg, parallel=kind.without_offload(cfg.parallel)), counts)
        gathered = counts.largest_layer * compute_bytes(cfg)
        offload = n * (on_gpu["weights"] - gathered + on_gpu["grads"] + on_gpu["optimizer"])
    if kind.replicated:  # bitsandbytes' paged optimizers run there only
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
    kind, t = engine_kind(cfg.parallel.strategy), counts.trainable
    if kind.deepspeed:
        zero = dict((cfg.parallel.deepspeed.overrides or {}).get("zero_optimization") or {})
        if not zero.get("contiguous_gradients", True):
            return 0
        bucket = int(float(zero.get("reduce_bucket_size", 5e8)))  # allocated at full size, whatever the model's
        if kind.shards_weights:  # ZeRO-3
            return bucket * param_bytes(cfg)
        width = 4 if not kind.shards_grads else param_bytes(cfg)  # ZeRO-1 accumulates 16-bit gradients in fp32
        return bucket * width * (2 if zero.get("overlap_comm", False) else 1)
    if kind.shards_weights:  # FSDP: one unit's unsharded gradients
        return 0 if kind.offloaded(cfg.parallel) else min(counts.largest_layer, t) * param_bytes(cfg)
    if not kind.multi_rank or world_size(cfg) == 1:
        return 0
    return t * trainable_bytes(cfg)  # DDP's buckets hold gradients in their parameters' dtype


def activation_bytes(cfg: Config, counts: ParameterCounts, layers_only: bool = False) -> int:
    """Per-GPU activation memory of one micro-batch (m sequences of s tokens: 2 per pair for
    objective=dpo) at its peak, the start of backward: what autograd saved in forward plus the
    backward's working set. objective=dpo keeps no reference model in memory (its log-probs are
    computed before training: distft/objective.py).

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
    - DoRA (PEFT) on top of LoRA's: each adapted layer's output twice, the base's and the
      adapter's, which the magnitude's gradient reads (2·out·b for each adapted projection), and
      per layer and micro-batch a matrix the size of its adapted weights (the combined weight whose
      norm it takes), fixed in tokens. Measured on SmolLM2 in fp32 with saved_tensors_hooks: 1.57
      outputs a token and 1.53 weights a layer; planned 2 and 1: +8% on DoRA's part at 4 x 256.
    Gradient checkpointing keeps each layer's input (h·b) and recomputes one layer at a time.
    Outside the layers: the final norm, and the loss (loss_bytes: no [m·s, V] logits, only the
    hidden states' gradient, computed in forward). The working set on top is the larger of the
    loss's transient (one chunk of logits at the end of forward) and one MLP's gradients in
    backward (3·m·s·i·b). Kernels' workspaces are in plan.overhead_gb.

    QLoRA on one process or DDP with a 16-bit model: the preparation's fp32 embeddings make the
    residual stream fp32, and bitsandbytes returns each 4-bit layer's output in its input's
    dtype, so the MLP's gate, SiLU and up outputs are kept in fp32: 3i·4 instead of 3i·b
    (measured on an H200, LLaMA-7B, 1 x 2048 tokens: 24.6 GiB against 19.5 planned without
    this term and the fp32 storage of model_state_bytes, bench/RESULTS.md). FSDP gathers in the
    16-bit dtype and DeepSpeed casts the model, so neither does this.
    """
    model = llama_config(cfg.model)  # the preset's architecture, defaults filled in
    m, s, b = rows_per_micro_batch(cfg), cfg.data.max_seq_len, compute_bytes(cfg)
    technique, same_dtype = technique_kind(cfg.technique.name), engine_kind(cfg.parallel.strategy).keeps_model_dtype
    if technique.virtual_tokens:
        s += cfg.technique.num_virtual_tokens
    h, i, v = model.hidden_size, model.intermediate_size, model.vocab_size
    k = h * model.num_key_value_heads // model.num_attention_heads
    adapters = technique.adapter
    dropout = adapters and cfg.technique.dropout > 0
    inputs_kept = technique.trains_all_weights or (adapters and not dropout)
    # The normalised output is in the weights' dtype: fp32 over fp32 masters on single/DDP (the
    # residual stream is fp32 there; autocast only lowers the linear layers), else the compute dtype.
    stream = 4 if fp32_masters(cfg) and same_dtype else b
    norm = 4 * h + (stream * h if technique.trains_all_weights else 0)
    fp32_stream = technique.quantized_base and same_dtype
    mlp = 3 * i * (4 if fp32_stream else b)
    per_layer = 2 * norm + (2 * h + 2 * k) * b + mlp
    if inputs_kept:
        per_layer += (3 * h + i) * b
    if dropout:
        per_layer += (6 * h + i) * (b + (1 if cfg.cluster.gpus_per_node > 0 else b))
    layers = model.num_hidden_layers
    dora_fixed = 0
    if technique.decomposes_weights:
        shapes = {"q_proj": (h, h), "k_proj": (h, k), "v_proj": (h, k), "o_proj": (h, h), "gate_proj": (h, i),
                  "up_proj": (h, i), "down_proj": (i, h)}
        adapted = [shapes[name] for name in cfg.technique.target_modules if name in shapes]
        per_layer += 2 * sum(out for _, out in adapted) * b
        checkpointed = 1 if cfg.train.gradient_checkpointing else layers  # recomputed one layer at a time
        dora_fixed = checkpointed * sum(fan_in * out for fan_in, out in adapted) * b
    kept = layers * (h * b) + per_layer if cfg.train.gradient_checkpointing else layers * per_layer
    if layers_only:  # what backward frees layer by layer (step_gradient_bytes)
        return int(m * s * kept)
    final_norm = norm + (h * b if inputs_kept else 0)
    loss_kept, loss_transient = loss_bytes(cfg, m * cfg.data.max_seq_len, v, h, stream)
    working = max(loss_transient, m * s * mlp)
    return int(m * s * (kept + final_norm) + loss_kept + working + dora_fixed) + autocast_copy_bytes(cfg, counts)


def step_gradient_bytes(cfg: Config, counts: ParameterCounts, grads: int) -> int:
    """The gradients' share of the peak on single/ddp without accumulation: every step frees its
    gradients (zero_grad(set_to_none=True)), so the next backward makes them while it frees the
    layers' activations, one layer after another. The peak is the larger of the start of backward
    (the activations, and the head's gradient when the chunked loss made it in forward: full
    fine-tuning) and its end (every gradient, and the embedding backward's temporaries). Where the
    layers' activations (`activation_bytes(layers_only=True)`) outweigh the gradients, the start
    is the peak and only the head's gradient counts; else the gradients count whole (tiny layers
    at a 128k vocabulary: -7% counted whole, -16% with only the head's). Measured on
    SmolLM2 full fine-tuning, DDP, 2 ranks x 4 x 128 tokens: the plan was 15.5% over with both
    counted whole. With accumulation, the first micro-batch's gradients live through the next
    forward: counted whole, as on the sharding engines (whose gradient buffers persist)."""
    if not engine_kind(cfg.parallel.strategy).replicated or grad_accum_steps(cfg) > 1:
        return grads
    arch = llama_config(cfg.model)
    head = arch.vocab_size * arch.hidden_size * trainable_bytes(cfg) if (
        technique_kind(cfg.technique.name).trains_embeddings and chunked_loss(cfg)) else 0
    return min(grads, head) if activation_bytes(cfg, counts, layers_only=True) >= grads else grads


def per_gpu_bytes(cfg: Config, counts: ParameterCounts) -> dict[str, int]:
    states = model_state_bytes(cfg, counts)
    states["grads"] = step_gradient_bytes(cfg, counts, states["grads"])
    out = {**states, "comm": comm_bytes(cfg, counts), "activations": activation_bytes(cfg, counts),
           "overhead": int(cfg.plan.overhead_gb * 1024**3)}
    out["total"] = sum(out.values())
    if engine_kind(cfg.parallel.strategy).replicated:
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
