"""The plain engine: one process, or PyTorch DDP when the process group has several ranks.

Gradient accumulation skips DDP's all-reduce on all but the last micro-step (`no_sync`), so an
optimizer step costs one all-reduce whatever the accumulation. fp16 uses a GradScaler; bf16 and
fp32 need none.
"""

from __future__ import annotations

import contextlib

import torch

from distft.config import Config
from distft.engines import dcp
from distft.engines.optim import apply_update, build_optimizer
from distft.engines.precision import autocast_context, autocast_dtype
from distft.model.build import model_inputs


class DDPEngine:
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device):
        self.cfg = cfg
        self.device = device
        self._model = model.to(device) if not _is_quantized(model) else model
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        self.wrapped = self._model
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                from torch.nn.parallel import DistributedDataParallel

                self.wrapped = DistributedDataParallel(
                    self._model, device_ids=[device.index] if device.type == "cuda" else None
                )
        self.optimizer, self.scheduler = build_optimizer(cfg, self._model)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None

    @property
    def name(self) -> str:
        """summary.json's `engine`: DDP only where there is a DDP wrapper (several ranks)."""
        return "DDPEngine" if self.wrapped is not self._model else "single process"

    def autocast(self):
        return autocast_context(self.amp_dtype, self.device)

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: v.to(self.device) for k, v in model_inputs(batch).items()}
        with self.autocast():
            return self.wrapped(**inputs, use_cache=False).logits

    def backward(self, loss: torch.Tensor) -> None:
        if self.wrapped is not self._model:
            # DDP averages gradients over ranks, but the loss is already divided by the token
            # count of the whole step on all ranks: undo the average so every token weighs the same.
            loss = loss * torch.distributed.get_world_size()
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def accumulating(self, last_micro_step: bool):
        if last_micro_step or not hasattr(self.wrapped, "no_sync"):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def step(self) -> float:
        params = [p for p in self._model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        apply_update(self.optimizer, self.scheduler, grad_norm, self.scaler)
        return float(grad_norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> None:
        self._model.train()

    def eval(self) -> None:
        self._model.eval()

    weights_offloaded = False

    def local_shard(self, param: torch.Tensor) -> torch.Tensor:
        return param  # every rank holds every weight

    def unwrapped(self) -> torch.nn.Module:
        return self._model

    def gathered_state_dict(self) -> dict | None:
        return None  # every rank holds the full weights already

    def save_state(self, path: str, background: bool = False):
        return dcp.save(path, self._model, self.optimizer, self.scheduler, self.scaler, background)

    def close(self) -> None:
        pass  # nothing beyond its objects

    def load_state(self, path: str) -> None:
        dcp.load(path, self._model, self.optimizer, self.scheduler, self.scaler)


def _is_quantized(model: torch.nn.Module) -> bool:
    # bitsandbytes places 4-bit weights when they are loaded; moving them again re-quantises.
    return getattr(model, "is_loaded_in_4bit", False) or getattr(getattr(model, "base_model", None), "is_loaded_in_4bit", False)
