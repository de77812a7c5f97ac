"""The optimizer and its schedule, shared by every engine: `train.optimizer` built over the
trainable parameters (engines.build_optimizer), the LR multiplier of each step, and the update
that never applies a non-finite step."""

from __future__ import annotations

import logging
import math
import warnings

import torch

from distft.config import BNB_MIN_8BIT_SIZE, Config

log = logging.getLogger("distft")


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
            log.warning("train.optimizer=%s: paging needs CUDA; on the CPU bitsandbytes keeps the optimizer state in "
                        "ordinary memory (as %s)", t.optimizer, t.optimizer.replace("paged_", ""))
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
