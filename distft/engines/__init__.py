"""One `Engine` interface; one implementation per parallelism strategy.

The trainer talks to an Engine and never asks which one it has. An engine owns the wrapped
model, the optimizer, the LR schedule, mixed precision and gradient clipping, because each
strategy does those differently (DeepSpeed does all of them itself, FSDP clips sharded grads,
DDP must skip the gradient all-reduce on accumulation micro-steps). What stays out: the loss
(shared `distft.model.token_loss`), data order and checkpoint layout.

`single` (one process) and `ddp` live in ddp.py; `zero1/2/3` in deepspeed.py and `fsdp` in
fsdp.py land with the parallelism work.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from contextlib import AbstractContextManager as ContextManager
from typing import Protocol

import torch

from distft.config import BNB_MIN_8BIT_SIZE, Config


class Engine(Protocol):
    device: torch.device

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits for a micro-batch (under the configured autocast)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def accumulating(self, last_micro_step: bool) -> ContextManager:
        """Context for one micro-step; gradient sync happens only when `last_micro_step`."""

    def step(self) -> float:
        """Clip, optimizer step, schedule step, zero grads; returns the pre-clip grad norm."""

    def lr(self) -> float: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def unwrapped(self) -> torch.nn.Module:
        """The plain (PEFT or transformers) model, for generation, evaluation and saving."""

    def autocast(self) -> ContextManager: ...

    def gathered_state_dict(self) -> dict | None:
        """The full (unsharded) model state dict on rank 0, None on other ranks; None everywhere
        when `unwrapped()` already holds full weights (single, DDP). A collective: every rank
        calls it. Checkpoints and adapter saves use it so sharded runs save real weights."""

    def save_state(self, path: str, background: bool = False):
        """Write the trainable weights, optimizer, LR schedule (and grad scaler) into directory
        `path`, sharded as the engine holds them. A collective: every rank calls it.
        `background`: stage a copy now and write it in a background thread; returns a Future
        (None when the write is already done)."""

    def load_state(self, path: str) -> None:
        """Restore what `save_state` wrote, possibly on another number of ranks. A collective."""


def build_model_for_engine(cfg: Config, dtype: torch.dtype, tokenizer, world_size: int) -> tuple[torch.nn.Module, str]:
    """The trainable model (base + technique), built where the engine wants it, and how it was built.

    FSDP on several ranks gets it on the meta device ("meta"): the engine shards it first and
    only then allocates each rank's shards, filled from the one real copy rank 0 builds, so host
    memory holds one full model per node instead of one per rank. QLoRA cannot (bitsandbytes
    quantises while the weights load) and every other engine needs the whole model on every
    rank before it partitions it ("eager"; ZeRO-3 partitions after `deepspeed.initialize`).
    """
    if cfg.parallel.strategy == "fsdp" and world_size > 1 and cfg.technique.name != "qlora":
        from distft.engines.fsdp import build_meta_model

        return build_meta_model(cfg, dtype, tokenizer), "meta"
    from distft.techniques import build_trainable_model

    return build_trainable_model(cfg, dtype, tokenizer), "eager"


def state_format(strategy: str) -> str:
    """What a checkpoint's state/ holds under `parallel.strategy`, and so which strategies can
    resume it: DCP (single, ddp, fsdp: tensors keyed by parameter name, any layout, any rank
    count) or DeepSpeed's ZeRO partitions of one stage (any rank count through the universal
    checkpoint; DeepSpeed 0.19.8 fails converting between stages)."""
    return f"deepspeed-{strategy}" if strategy.startswith("zero") else "dcp"


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device) -> Engine:
    strategy = cfg.parallel.strategy
    if strategy in ("single", "ddp"):
        from distft.engines.ddp import DDPEngine

        return DDPEngine(cfg, model, device)
    if strategy in ("zero1", "zero2", "zero3"):
        from distft.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, device)
    if strategy == "fsdp":
        from distft.engines.fsdp import FSDPEngine

        return FSDPEngine(cfg, model, device)
    raise NotImplementedError(f"parallel.strategy={strategy!r} is not available in this build yet")


def lr_lambda(step: int, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based): warm-up (step + 1) / warmup_steps,
    then cosine/linear decay to min_lr_ratio at max_steps, or constant. Hugging Face's warm-up is
    step / warmup_steps (its first step at lr 0); see TrainConfig for the comparison."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


# train.optimizer -> the bitsandbytes class (distft.config.TrainConfig.optimizer; README, "Optimizers").
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}


def build_optimizer(cfg: Config, model: torch.nn.Module):
    """AdamW over trainable params, as `train.optimizer` names it; no weight decay on norms, biases
    and other 1-D params. `adamw` is torch's, with its fused kernel when every trained parameter is
    on a GPU (one kernel per step instead of a loop of elementwise ones); bitsandbytes' optimizers
    take the same groups and hyperparameters. Paged optimizers page on CUDA only: on the CPU
    bitsandbytes keeps their state in ordinary memory, said once in the log."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    t = cfg.train
    hyper = {"lr": t.lr, "betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_eps}
    if t.optimizer in BNB_OPTIMIZERS:
        import bitsandbytes

        on_cpu = any(p.device.type != "cuda" for g in groups for p in g["params"])
        if t.optimizer.startswith("paged") and on_cpu:
            import logging

            logging.getLogger("distft").warning(
                "train.optimizer=%s: paging needs CUDA; on %s bitsandbytes keeps the optimizer state in ordinary "
                "memory (as %s)", t.optimizer, "the CPU", t.optimizer.replace("paged_", ""))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
            optimizer = getattr(bitsandbytes.optim, BNB_OPTIMIZERS[t.optimizer])(
                groups, min_8bit_size=BNB_MIN_8BIT_SIZE, **hyper)
        # bitsandbytes warns again when the state is first allocated (the first step): once is enough.
        optimizer._cpu_paged_warned = True
    else:
        fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
        optimizer = torch.optim.AdamW(groups, fused=fused or None, **hyper)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_lambda(step, t.warmup_steps, t.max_steps, t.schedule, t.min_lr_ratio)
    )
    return optimizer, scheduler


def apply_update(optimizer, scheduler, grad_norm: torch.Tensor, scaler=None) -> None:
    """The tail of every engine's step(): optimizer step (through the fp16 grad scaler when there
    is one), schedule step, gradients freed. A non-finite global grad norm applies nothing and
    does not advance the schedule (as DeepSpeed does on overflow): the parameters and optimizer
    state stay exactly as they were; the fp16 scaler still lowers its scale."""
    if not bool(torch.isfinite(grad_norm)):
        if scaler is not None:
            scaler.step(optimizer)  # finds the inf recorded by unscale_ and skips the update
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def weights_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The precision policy: the dtype the model is built in (README, "Precision").

    - technique=full on single/ddp/fsdp: fp32, the master weights (AdamW's state follows the
      parameters, so it is fp32 too), whatever model.dtype says; the compute is train.precision's
      (autocast; FSDP2 gathers parameters in that dtype and reduces gradients in fp32). With
      train.pure_bf16: bf16 weights, gradients and AdamW state, no masters.
    - ZeRO: model.dtype; DeepSpeed keeps fp32 masters and optimizer state itself.
    - adapters and virtual tokens: model.dtype for the frozen base; PEFT keeps what trains in fp32.
    """
    from distft.model import resolve_dtype

    if cfg.technique.name == "full" and cfg.parallel.strategy in ("single", "ddp", "fsdp"):
        return torch.bfloat16 if cfg.train.pure_bf16 else torch.float32
    return resolve_dtype(cfg.model.dtype, device)


def autocast_dtype(precision: str, device: torch.device):
    """The autocast dtype for `train.precision`, or None for fp32. auto: bf16 on bf16 GPUs only
    (CPU bf16 autocast is slower than fp32 on most CPUs)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast_context(dtype, device: torch.device) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
