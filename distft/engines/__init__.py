"""One `Engine` interface; one implementation per parallelism strategy.

The trainer talks to an Engine and never asks which one it has. An engine owns the wrapped
model, the optimizer, the LR schedule, mixed precision and gradient clipping, because each
strategy does those differently (DeepSpeed does all of them itself, FSDP clips sharded grads,
DDP must skip the gradient all-reduce on accumulation micro-steps). What stays out: the loss
(shared `distft.model.token_loss`), data order and checkpoint layout.

`single` (one process) and `ddp` live in ddp.py, `zero1/2/3` in deepspeed.py, `fsdp` in fsdp.py;
what they share is in optim.py (the optimizer, its schedule, the guarded update) and
precision.py (the dtype policy, autocast), re-exported here. The engine modules import those two,
never this package, so the package can import them (build_engine) without a cycle.
"""

from __future__ import annotations

from contextlib import AbstractContextManager as ContextManager
from typing import Protocol

import torch

from distft.config import Config

# Shared by the engines, re-exported here for callers of distft.engines.
from distft.engines.optim import BNB_OPTIMIZERS, apply_update, build_optimizer, lr_lambda  # noqa: F401
from distft.engines.precision import autocast_context, autocast_dtype, weights_dtype  # noqa: F401


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

    def close(self) -> None:
        """Release what the engine set up beyond its own objects (DeepSpeed's hooks and global
        state), so another run can follow in the same process. The trainer calls it last."""


def build_model_for_engine(cfg: Config, dtype: torch.dtype, tokenizer, world_size: int) -> tuple[torch.nn.Module, str]:
    """The trainable model (base + technique), built where the engine wants it, and how it was built.

    FSDP on several ranks gets it on the meta device ("meta"): the engine shards it first and
    only then allocates each rank's shards, filled from the one real copy rank 0 builds, so host
    memory holds one full model per node instead of one per rank. QLoRA cannot (bitsandbytes
    quantises while the weights load) and every other engine needs the whole model on every
    rank before it partitions it ("eager"; ZeRO-3 partitions after `deepspeed.initialize`).
    """
    if cfg.parallel.strategy == "fsdp" and world_size > 1 and cfg.technique.name != "qlora":
        from distft.techniques import build_meta_model

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
