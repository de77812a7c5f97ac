"""The precision policy, shared by every engine: what dtype the model is built in, and the
autocast of `train.precision` (README, "Precision")."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager

import torch

from distft.config import Config
from distft.engines.kinds import engine_kind
from distft.model.build import resolve_dtype
from distft.techniques.kinds import technique_kind


def weights_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The precision policy: the dtype the model is built in (README, "Precision").

    - technique=full on single/ddp/fsdp: fp32, the master weights (AdamW's state follows the
      parameters, so it is fp32 too), whatever model.dtype says; the compute is train.precision's
      (autocast; FSDP2 gathers parameters in that dtype and reduces gradients in fp32). With
      train.pure_bf16: bf16 weights, gradients and AdamW state, no masters.
    - ZeRO: model.dtype; DeepSpeed keeps fp32 masters and optimizer state itself.
    - adapters and virtual tokens: model.dtype for the frozen base; PEFT keeps what trains in fp32.
    """
    if technique_kind(cfg.technique.name).trains_all_weights and engine_kind(cfg.parallel.strategy).fp32_master_weights:
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
