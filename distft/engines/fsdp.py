"""PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimizer
state sharded over the ranks.

Sharding is applied in one place and in a fixed order (`shard_model`, torchtitan style): every
decoder layer is its own unit (one all-gather per layer in forward and backward), then the root
(the PEFT or transformers model as a whole) takes what is left: embeddings, final norm, output
head. The virtual-token encoder of prefix/prompt tuning (outside the layers) is left whole on every
rank (`replicated_parameters`: PEFT saves it by running it on rank 0 alone). The
root is the model object itself, so `unwrapped()` is that object (its class gains FSDPModule)
and evaluation and `generate()` run on it directly, on every rank in lockstep: each forward
all-gathers the layer it is in. `generate` is registered as a forward method of the root so the
root's own parameters are gathered for it too (PEFT's generate enters the transformers model
below the root's `forward`).

Choices worth knowing:
- Gradients are summed over ranks, not averaged (divide factor 1, SUM-only collectives): the
  trainer already divides each loss by the target-token count of the whole step on all ranks.
- Gradient accumulation: for techniques whose trainable parameters are small (adapters, virtual
  tokens) the reduce-scatter is skipped on all but the last micro-step, at the cost of holding
  their unsharded gradients between micro-steps. Full fine-tuning syncs every micro-step: holding
  a full unsharded gradient per rank would give back most of what sharding saves.
- Mixed precision is FSDP's own `MixedPrecisionPolicy` (parameters all-gathered in the autocast
  dtype, gradients reduced in fp32) over the shards as stored: fp32 master weights for full
  fine-tuning (engines.weights_dtype); fp32 (the CPU default) uses no policy.
- `parallel.fsdp.hybrid_shard`: a 2-D (replicate, shard) mesh; shard within groups of
  `parallel.fsdp.shard_size` ranks (0: the ranks of one node), replicate across them (HSDP).
- `parallel.fsdp.cpu_offload`: sharded parameters, gradients and optimizer state stay in host
  memory; the optimizer step runs on the CPU.
- A model built on the meta device (`techniques.build_meta_model`) is sharded first, then only the local
  shards are allocated and filled from rank 0's real model (`broadcast_from_rank0`): one full
  copy of the weights in host memory on rank 0 instead of one per rank.
- Checkpoints: each rank writes its own shards of the weights and optimizer state through DCP
  (engines/dcp.py); they load on another number of ranks (DCP reshards).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from distft.config import Config
from distft.engines import dcp
from distft.engines.optim import apply_update, build_optimizer
from distft.engines.precision import autocast_context, autocast_dtype, weights_dtype
from distft.engines.tied import share_aliases, tied_aliases
from distft.model.build import load_tokenizer, model_inputs
from distft.techniques.build import build_trainable_model, keep_4bit_training_layout
from distft.techniques.kinds import technique_kind

log = logging.getLogger("distft")


class FSDPEngine:
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        self.mesh = device_mesh(cfg, device)
        on_meta = any(p.is_meta for p in model.parameters())
        self._model = shard_model(model, cfg, self.mesh, device, self.amp_dtype)
        if on_meta:
            materialize_from_rank0(self._model, cfg, device)
        self.replicated = replicated_parameters(self._model)
        # Small trainable sets (adapters, virtual tokens) accumulate unsharded gradients locally.
        self.defer_grad_sync = not technique_kind(cfg.technique.name).trains_all_weights
        self.optimizer, self.scheduler = build_optimizer(cfg, self._model)
        self.scaler = None
        if self.amp_dtype == torch.float16:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device.type)

    def autocast(self):
        return autocast_context(self.amp_dtype, self.device)

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in model_inputs(batch).items()}
        with self.autocast():
            return self._model(**inputs, use_cache=False).logits

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def accumulating(self, last_micro_step: bool):
        if not self.defer_grad_sync:
            return contextlib.nullcontext()
        return _gradient_sync(self._model, enabled=last_micro_step)

    def step(self) -> float:
        from torch.distributed.tensor import DTensor

        for param in self.replicated:  # FSDP leaves them alone: sum their gradients like it would
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.SUM)
        params = [p for p in self._model.parameters() if p.requires_grad and p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # The norm of sharded gradients is a partial sum on each rank: full_tensor() all-reduces it
        # into the global pre-clip norm before anything is scaled (torchtitan does the same).
        # Sharded and replicated gradients cannot meet in one foreach call: one norm each.
        sharded = [p for p in params if isinstance(p.grad, DTensor)]
        whole = [p for p in params if not isinstance(p.grad, DTensor)]
        groups = [group for group in (sharded, whole) if group]
        norms = []
        for group in groups:
            norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
            norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().cpu())
        total_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
        if self.cfg.train.grad_clip > 0:
            for group in groups:
                torch.nn.utils.clip_grads_with_norm_(group, self.cfg.train.grad_clip, total_norm)
        apply_update(self.optimizer, self.scheduler, total_norm, self.scaler)
        return float(total_norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> None:
        self._model.train()

    def eval(self) -> None:
        self._model.eval()

    @property
    def weights_offloaded(self) -> bool:
        return self.cfg.parallel.fsdp.cpu_offload

    def local_shard(self, param: torch.Tensor) -> torch.Tensor:
        return param.to_local() if hasattr(param, "to_local") else param  # a DTensor's shard on this rank

    def unwrapped(self) -> torch.nn.Module:
        return self._model

    def gathered_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: every rank all-gathers each tensor; only rank 0 keeps the CPU copies.
        state = get_model_state_dict(self._model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if torch.distributed.get_rank() != 0:
            return None
        share_aliases(state, tied_aliases(self._model))  # a tied weight's two copies become one, saved once
        # Sharding replaced bitsandbytes' Params4bit by plain parameters, whose state dict lacks
        # the quantisation constants; their modules keep them (replicated on every rank).
        for name, module in self._model.named_modules():
            quant_state = getattr(module, "quant_state", None)
            if quant_state is not None and hasattr(module, "support_avx512bf16_for_cpu"):
                for key, value in quant_state.as_dict(packed=True).items():
                    state.setdefault(f"{name}.weight.{key}", value.detach().cpu())
        return state

    def save_state(self, path: str, background: bool = False):
        """Each rank writes its own shards (DCP); a checkpoint loads on any number of ranks."""
        return dcp.save(path, self._model, self.optimizer, self.scheduler, self.scaler, background)

    def close(self) -> None:
        pass  # nothing beyond its objects

    def load_state(self, path: str) -> None:
        dcp.load(path, self._model, self.optimizer, self.scheduler, self.scaler)


# --------------------------------------------------------------------------------- sharding


def device_mesh(cfg: Config, device: torch.device):
    """1-D mesh over all ranks (full shard), or 2-D (replicate, shard) for hybrid sharding."""
    from torch.distributed.device_mesh import init_device_mesh

    if not torch.distributed.is_initialized():
        # One process (e.g. one GPU with cpu_offload): the launcher started no group, FSDP needs one.
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
        )
    world = torch.distributed.get_world_size()
    fsdp = cfg.parallel.fsdp
    if not fsdp.hybrid_shard:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    shard = fsdp.shard_size or cfg.launcher.nproc_per_node  # validate() checks that it divides world
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a LLaMA-family model, also inside PEFT wrappers: modules whose
    class name ends in DecoderLayer (LlamaDecoderLayer, MistralDecoderLayer, ...)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not layers:
        raise ValueError(f"no decoder layers (modules named *DecoderLayer) found in {type(model).__name__}")
    return layers


def shard_model(model: torch.nn.Module, cfg: Config, mesh, device: torch.device, amp_dtype=None) -> torch.nn.Module:
    """fully_shard every decoder layer, then the root; returns the root (the same object)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    fsdp = cfg.parallel.fsdp
    keep_4bit_training_layout(model, refuse_repacked=True)
    kwargs = {
        "mesh": mesh,
        "reshard_after_forward": fsdp.reshard_after_forward,
        "mp_policy": mixed_precision_policy(model, amp_dtype),
        "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if fsdp.cpu_offload else OffloadPolicy(),
    }
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    replicated = replicated_parameters(model)
    fully_shard(model, **kwargs, ignored_params=set(replicated) or None)
    for param in replicated:  # FSDP does not move what it ignores (meta: materialised later)
        if not param.is_meta:
            param.data = param.data.to(device)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            # Sum, do not average: losses are already normalised over all ranks' tokens.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def replicated_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters kept whole on every rank instead of sharded: the virtual-token encoder of prefix
    and prompt tuning. It is small (virtual tokens x hidden size, x layers for prefix tuning), and
    PEFT runs it outside any forward to save the adapter (`get_prompt_embedding_to_save`), on rank
    0 alone, where sharded weights could not be gathered. The engine sums its gradients itself."""
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False):
        return []
    return list(model.prompt_encoder.parameters())


def mixed_precision_policy(model: torch.nn.Module, amp_dtype):
    """Gather parameters in the autocast dtype and reduce gradients in fp32; no policy for fp32.

    bitsandbytes 4-bit weights are packed bytes stored in `technique.quant_storage`: a policy
    casting a float storage to another dtype (float32 storage, bf16 policy) would scramble them,
    so such a model gathers in its stored dtypes and autocast alone lowers the compute precision.
    (uint8 storage is safe: FSDP casts only floating-point parameters.)
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if amp_dtype is None:
        return MixedPrecisionPolicy()
    packed = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    if any(dtype.is_floating_point and dtype != amp_dtype for dtype in packed):
        log.info("4-bit weights stored as %s: FSDP gathers parameters unconverted, autocast computes in %s",
                 ", ".join(sorted(str(d) for d in packed)), amp_dtype)
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)


@contextlib.contextmanager
def _gradient_sync(model, enabled: bool):
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------- meta-device loading


def materialize_from_rank0(model: torch.nn.Module, cfg: Config, device: torch.device) -> None:
    """Allocate the local shards of a sharded meta model and fill them with the real weights.

    Rank 0 builds the real trainable model (the seeded preset or the local checkpoint, exactly
    what a non-meta run builds) and broadcasts it tensor by tensor; every other rank only ever
    holds its shards plus one tensor in flight. Buffers that are not in the state dict (rotary
    frequencies) are broadcast too: to_empty leaves them uninitialised.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = torch.distributed.get_rank()
    keys = _unaliased_state_keys(model)
    reference = None
    full_state: dict = {}
    if rank == 0:
        dtype = weights_dtype(cfg, device)
        tokenizer = load_tokenizer(cfg.model) if cfg.technique.prompt_init_text else None
        reference = build_trainable_model(cfg, dtype, tokenizer)
        full_state = {k: v for k, v in reference.state_dict().items() if k in keys}
    # Offloaded shards live in host memory; buffers stay where the compute runs.
    model.to_empty(device=torch.device("cpu") if cfg.parallel.fsdp.cpu_offload else device)
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)
    # Not strict: the aliases left out above count as missing; anything else missing is a bug.
    result = set_model_state_dict(
        model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    )
    in_state = set(model.state_dict().keys())
    if set(result.missing_keys) - (in_state - keys) or result.unexpected_keys:
        raise RuntimeError(f"rank 0's model does not fit the meta model: {result}")
    reference_buffers = dict(reference.named_buffers()) if reference is not None else {}
    for name, buffer in model.named_buffers():
        if name in in_state:
            continue
        if rank == 0:
            buffer.copy_(reference_buffers[name].to(buffer.device))
        torch.distributed.broadcast(buffer, src=0)
    del reference, full_state


def _unaliased_state_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys under each module's first name only. PEFT's prompt learning registers the
    word embeddings twice (`word_embeddings` aliases `...embed_tokens`); set_model_state_dict
    fills each module once and would load the alias's copy as a plain (unsharded) tensor."""
    keys = set()
    for prefix, module in model.named_modules():  # each module once, first name first
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if name not in module._non_persistent_buffers_set:
                keys.add(f"{prefix}.{name}" if prefix else name)
    return keys
