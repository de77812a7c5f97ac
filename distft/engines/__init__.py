"""One `Engine` interface; one implementation per parallelism strategy; one table of what each is.

The trainer talks to an Engine and never asks which one it has. An engine owns the wrapped
model, the optimizer, the LR schedule, mixed precision and gradient clipping, because each
strategy does those differently (DeepSpeed does all of them itself, FSDP clips sharded grads,
DDP must skip the gradient all-reduce on accumulation micro-steps). What stays out: the loss
(shared: `distft.model.loss.computing_loss` around `forward`), data order and checkpoint layout.

`ENGINES` (kinds.py) says what each `parallel.strategy` is for the code outside its module:
validation, the planner, the precision policy, checkpoints and the model build read its
`EngineKind`, never the strategy's name. Adding an engine is a module here, a row in ENGINES
(naming the module and class build_engine imports) and a conf/parallel/<strategy>.yaml (tests/unit/test_config.py
checks that they agree).

`single` (one process) and `ddp` live in ddp.py, `zero1/2/3` in deepspeed.py, `fsdp` in fsdp.py;
what they share is in optim.py (the optimizer, its schedule, the guarded update) and
precision.py (the dtype policy, autocast), re-exported here, and tied.py (a tied weight saved
once). The package imports none of its modules when it loads (build_engine imports the one it
needs; the re-exports load on first use), so every module can read ENGINES, and importing it
imports no torch (validation runs without it).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Protocol

from distft.config import Config
from distft.engines.kinds import ENGINES, EngineKind, engine_kind  # noqa: F401  (re-exported)
from distft.techniques.kinds import technique_kind

if TYPE_CHECKING:
    from contextlib import AbstractContextManager as ContextManager

    import torch


# Shared by the engines, re-exported for callers of distft.engines; loaded (with torch) on first use.
_OPTIM = ("BNB_OPTIMIZERS", "apply_update", "build_optimizer", "lr_lambda")
_PRECISION = ("autocast_context", "autocast_dtype", "weights_dtype")


def __getattr__(name: str) -> Any:
    if name in _OPTIM:
        from distft.engines import optim

        return getattr(optim, name)
    if name in _PRECISION:
        from distft.engines import precision

        return getattr(precision, name)
    raise AttributeError(f"module 'distft.engines' has no attribute {name!r}")


class Engine(Protocol):
    device: torch.device

    def forward(self, batch: dict) -> torch.Tensor:
        """The model's `.logits` for a micro-batch (under the configured autocast); inside
        `distft.model.loss.computing_loss` that is the micro-batch's summed loss."""

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

    weights_offloaded: bool
    """The weights live in host memory (FSDP cpu_offload, ZeRO-3 offload_param): a per-step norm
    of every shard on the CPU would cost seconds, so the trainer checks them before saves only."""

    def local_shard(self, param: torch.Tensor) -> torch.Tensor:
        """The part of `param` this rank holds (FSDP2's DTensor shard, ZeRO-3's partition)."""

    def autocast(self) -> ContextManager: ...

    def gathered_state_dict(self) -> dict | None:
        """The full (unsharded) model state dict on rank 0, None on other ranks; None everywhere
        when `unwrapped()` already holds full weights (single, DDP). As `state_dict()` gives it: a
        tied weight is one tensor under both its names, so it is saved once (engines/tied.py).
        A collective: every rank calls it. Checkpoints and adapter saves use it so sharded runs
        save real weights."""

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
    if (engine_kind(cfg.parallel.strategy).meta_build and world_size > 1
            and not technique_kind(cfg.technique.name).quantized_base):
        # lazy, as the re-exports above: torch (importing this package stays torch-free for validation)
        from distft.techniques.build import build_meta_model

        return build_meta_model(cfg, dtype, tokenizer), "meta"
    from distft.techniques.build import build_trainable_model

    return build_trainable_model(cfg, dtype, tokenizer), "eager"


def state_format(strategy: str) -> str:
    """What a checkpoint's state/ holds under `parallel.strategy` (EngineKind.state_format)."""
    return engine_kind(strategy).state_format


def prepare_device(device: torch.device) -> None:
    """Before anything imports an engine's library: DeepSpeed picks its accelerator once, on first
    import, whoever imports it (accelerate does, when any engine saves a model), so a CPU run pins
    the CPU one (train.device=cpu on a GPU machine; on a CPU machine it spares the "unable to
    detect" warning in the middle of a run's log)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_engine(cfg: Config, model: torch.nn.Module, device: torch.device) -> Engine:
    """The engine of `parallel.strategy`: its row names the module and class (EngineKind)."""
    kind = engine_kind(cfg.parallel.strategy)
    module = importlib.import_module(f"distft.engines.{kind.module}")
    return getattr(module, kind.engine_class)(cfg, model, device)
