"""DeepSpeed ZeRO stages 1, 2 and 3 (`parallel=zero1|zero2|zero3`), optionally offloading to the CPU.

ZeRO partitions the optimizer state (stage 1), also the gradients (stage 2), also the weights
(stage 3) over the data-parallel ranks. DeepSpeed owns the precision, the clipping and the
optimizer step; this engine maps our config onto it and keeps the trainer's contract.

What is configured where (nothing twice):
- `deepspeed_config(cfg, device)` derives DeepSpeed's JSON config from ours: batch sizes and
  accumulation from `train.*`, clipping, bf16/fp16 from `train.precision`, the stage from
  `parallel.strategy`, offload from `parallel.deepspeed.offload_*`; `parallel.deepspeed.overrides`
  is deep-merged last, for every other DeepSpeed key.
- The optimizer and LR schedule are ours (`build_optimizer`: AdamW, no decay on 1-D params, the
  `lr_lambda` schedule) and handed to `deepspeed.initialize`. With `offload_optimizer` the AdamW is
  rebuilt as `DeepSpeedCPUAdam` (AdamW mode) over the same param groups and hyperparameters, with
  the same `LambdaLR` function: DeepSpeed refuses a torch optimizer for offloaded states, because
  torch's CPU Adam is several times slower than its vectorised one. Its C++ op is compiled on first
  use (about a minute on 2 cores; cached in ~/.cache/torch_extensions, or prebuilt by installing
  deepspeed with DS_BUILD_CPU_ADAM=1).

The trainer's accumulation contract: each micro-batch's loss is already divided by the target
tokens of the whole step over all ranks, and `step()` is called once per optimizer step. So
`backward` passes `scale_wrt_gas=False` (no extra division by the accumulation steps) and
multiplies by the world size (ZeRO averages gradients over ranks, as DDP does); `accumulating()`
tells DeepSpeed which micro-step is the accumulation boundary (`set_gradient_accumulation_boundary`),
where it reduces gradients and where the single `ds.step()` applies the update.

Evaluation and generation call `unwrapped()` (the PEFT or transformers module) on every rank in
lockstep: under ZeRO-3 DeepSpeed's forward hooks on that module gather each layer's weights as it
runs, so every rank must run the same forwards (the trainer gives all ranks the same prompts).

Checkpoints: DeepSpeed's own `save_checkpoint` (every rank writes its partitions) and
`load_checkpoint`; `distft.checkpoint.store` puts them inside its atomic, verified checkpoint directory
and scans their pickles before DeepSpeed unpickles them. On another number of ranks the state goes
through DeepSpeed's universal checkpoint (`universal_state`), and two DeepSpeed 0.19.8 slips of
ZeRO-3's universal load are put right after it (see `_load`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from distft import dist
from distft.config import Config, grad_accum_steps
from distft.engines import prepare_device
from distft.engines.kinds import engine_kind
from distft.engines.optim import build_optimizer
from distft.engines.precision import autocast_context, autocast_dtype
from distft.engines.tied import share_aliases, tied_aliases
from distft.errors import CheckpointError
from distft.model.build import model_inputs
from distft.techniques.build import keep_4bit_training_layout

log = logging.getLogger("distft")

_OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


DEEPSPEED_TAG = "zero"  # the sub-directory of a checkpoint's state/ that DeepSpeed writes


def deepspeed_config(cfg: Config, device: torch.device) -> dict:
    """DeepSpeed's JSON config for `cfg` on `device` (precision `auto` depends on the device).

    A pure function: no DeepSpeed import, no process group, so it is unit-tested on its own and
    a user can print exactly what DeepSpeed will get. Its torch-free facts live beside it in
    kinds.py, where validation reads them: the ZeRO stage and offload switches of each strategy's
    EngineKind, and DEEPSPEED_DERIVED_KEYS, the keys derived here (parallel.deepspeed.overrides
    may not set them)."""
    t, ds = cfg.train, cfg.parallel.deepspeed
    stage = engine_kind(cfg.parallel.strategy).zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_param and stage == 3:  # validate() rejects it for the other stages
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the trainer reports progress; DeepSpeed's own lines only repeat it
    }
    amp = autocast_dtype(t.precision, device)
    if amp == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif amp == torch.float16:
        config["fp16"] = {"enabled": True}  # dynamic loss scaling, DeepSpeed's default
    return deep_merge(config, ds.overrides or {})


def deep_merge(base: Mapping, overrides: Mapping) -> dict:
    """`base` with `overrides` merged in: nested mappings merge key by key, anything else replaces.
    Returns plain dicts and lists (overrides may arrive as OmegaConf containers)."""
    merged = {key: _plain(value) for key, value in base.items()}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = _plain(value)
    return merged


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(item) for item in value]
    return value


def _import_deepspeed(device: torch.device):
    prepare_device(device)
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "parallel=zero1|zero2|zero3 needs DeepSpeed: pip install torch first, then "
            "pip install --no-build-isolation 'deepspeed>=0.19'"
        ) from err
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines come from every rank, unranked
    if device.type == "cpu":
        # Its CPU accelerator JIT-compiles a shared-memory all-reduce kernel when the comm layer
        # starts (deepspeed_shm_comm: 40 s on a fresh machine). It serves inference_all_reduce
        # only; training's collectives go to torch.distributed (gloo) either way. Marking it
        # unavailable keeps CPU runs (tests, laptops) from building it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _ensure_process_group(cfg: Config, device: torch.device) -> None:
    """DeepSpeed needs a process group even for one rank (ZeRO-3 + offload fits big models on one
    GPU); dist.init makes none for a single process, so make a 1-rank one from an in-memory store
    (no port). `dist.shutdown()` destroys it with the run."""
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it, and only launchers set it
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


def _cpu_adam(optimizer: torch.optim.Optimizer, scheduler, cfg: Config):
    """`DeepSpeedCPUAdam` over the param groups of our AdamW (same decay split and hyperparameters),
    and a LambdaLR with the same schedule function."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    t = cfg.train
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    cpu_adam = DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, adamw_mode=True)
    return cpu_adam, torch.optim.lr_scheduler.LambdaLR(cpu_adam, scheduler.lr_lambdas)


class DeepSpeedEngine:
    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device):
        deepspeed = _import_deepspeed(device)
        self.cfg = cfg
        self.device = device
        self.stage = engine_kind(cfg.parallel.strategy).zero_stage
        self.amp_dtype = autocast_dtype(cfg.train.precision, device)
        _ensure_process_group(cfg, device)
        self.world_size = torch.distributed.get_world_size()
        optimizer, scheduler = build_optimizer(cfg, model)
        if cfg.parallel.deepspeed.offload_optimizer:
            optimizer, scheduler = _cpu_adam(optimizer, scheduler, cfg)
        self.optimizer, self.scheduler = optimizer, scheduler  # ours; DeepSpeed wraps the optimizer
        keep_4bit_training_layout(model)
        self.ds, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, device),
            dist_init_required=False,
        )

    def autocast(self):
        return autocast_context(self.amp_dtype, self.device)

    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: v.to(self.ds.device) for k, v in model_inputs(batch).items()}
        with self.autocast():
            return self.ds(**inputs, use_cache=False).logits

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the step's target tokens on all ranks and micro-steps:
        # no division by the accumulation steps, and ZeRO's average over ranks is undone.
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def accumulating(self, last_micro_step: bool):
        @contextlib.contextmanager
        def micro_step():
            # Gradients are reduced and the update applied only at the boundary micro-step.
            self.ds.set_gradient_accumulation_boundary(last_micro_step)
            yield

        return micro_step()

    def step(self) -> float:
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeedEngine.step() without a last micro-step: run the last backward "
                               "inside accumulating(last_micro_step=True)")
        self._unpin_prompt_embeddings()  # the virtual tokens change now
        self.ds.step()  # clip, optimizer step, LR schedule step, zero grads
        norm = self.ds.get_global_grad_norm()  # ZeRO's pre-clip global norm (fp16: unscaled)
        return float("nan") if norm is None else float(norm)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(self) -> None:
        self.ds.module.train()

    def eval(self) -> None:
        self.ds.module.eval()

    @property
    def weights_offloaded(self) -> bool:
        return self.stage == 3 and self.cfg.parallel.deepspeed.offload_param

    def local_shard(self, param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor if getattr(param, "ds_tensor", None) is not None else param  # ZeRO-3's partition

    def unwrapped(self) -> torch.nn.Module:
        return self.ds.module

    def gathered_state_dict(self) -> dict | None:
        """Full weights on rank 0 under ZeRO-3 (None elsewhere); None for stages 1/2, whose
        weights are replicated. Gathers one module's own parameters at a time, so no rank ever
        holds more than one layer unpartitioned beyond what it holds anyway; keys and extra
        entries (bitsandbytes quant states) are those of `unwrapped().state_dict()`, a tied
        weight one tensor under both names as there (engines/tied.py)."""
        if self.stage < 3:
            return None
        import deepspeed

        self._pin_prompt_embeddings()
        is_main = torch.distributed.get_rank() == 0
        state: dict[str, torch.Tensor] = OrderedDict()
        for name, module in self.ds.module.named_modules(remove_duplicate=False):
            own = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(own, modifier_rank=None, enabled=bool(own)):
                if is_main:
                    local: dict[str, torch.Tensor] = OrderedDict()
                    module._save_to_state_dict(local, f"{name}." if name else "", keep_vars=False)
                    for key, value in local.items():
                        state[key] = value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
        if not is_main:
            return None
        return share_aliases(state, tied_aliases(self.ds.module))  # a tied weight's two copies become one

    def _pin_prompt_embeddings(self) -> None:
        """Prefix/prompt tuning under ZeRO-3: compute the virtual-token embeddings to save now, on
        every rank, and let PEFT's save read them from here until the next step.

        PEFT does not take saved virtual tokens from a state dict: `save_pretrained` runs the prompt
        encoder (`get_prompt_embedding_to_save`), and only rank 0 saves. Under ZeRO-3 that forward
        gathers weights (and prefetches the next layers) in collectives the other ranks never join,
        and the job hangs. Run it here in lockstep instead, and shadow the method on the instance
        with the result; `step()` removes the shadow, so a later save computes afresh."""
        model = self.ds.module
        if not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
            return
        self._unpin_prompt_embeddings()
        with torch.no_grad():
            embeddings = {name: model.get_prompt_embedding_to_save(name) for name in model.peft_config}
        model.get_prompt_embedding_to_save = embeddings.__getitem__

    def _unpin_prompt_embeddings(self) -> None:
        self.ds.module.__dict__.pop("get_prompt_embedding_to_save", None)

    def close(self) -> None:
        self.ds.destroy()  # its ZeRO-3 hooks and global state would otherwise outlive the run

    def save_state(self, path: str, background: bool = False) -> None:
        """Every rank writes its partitions in DeepSpeed's own layout (under tag `zero`): trainable
        weights (fp32 masters), optimizer state, the LR schedule. Frozen weights (an adapter's
        base) are left out: they are rebuilt from the config. Always synchronous (validate()
        refuses checkpoint.async_save with ZeRO)."""
        self.ds.save_checkpoint(path, tag=DEEPSPEED_TAG, client_state={}, save_latest=False,
                                exclude_frozen_parameters=True)

    def load_state(self, path: str) -> None:
        """DeepSpeed's own loader. A checkpoint written by another number of ranks is converted to
        DeepSpeed's universal checkpoint first (`universal_state`) and loaded from that."""
        tag = DEEPSPEED_TAG
        saved = saved_world_size(os.path.join(path, tag))
        current = torch.distributed.get_world_size()
        if saved != current:
            with universal_state(path, saved, current) as universal:
                self._load(universal, universal=True)
            return
        self._load(path)

    def _load(self, path: str, universal: bool = False) -> None:
        tag = DEEPSPEED_TAG
        config = self.ds._config
        settings = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in self.optimizer.param_groups]
        config.load_universal_checkpoint = universal  # DeepSpeed reads the switch from its config
        try:
            loaded, _ = self.ds.load_checkpoint(path, tag=tag, load_module_strict=False, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        finally:
            config.load_universal_checkpoint = False
        if universal:
            # ZeRO-3's universal load gives every param group the first group's hyperparameters
            # (DeepSpeed 0.19.8): the no-decay group (norms, biases) would get weight decay. They
            # come from the config, so put back what this engine was built with; the LR is the
            # loaded schedule's.
            for group, own, lr in zip(self.optimizer.param_groups, settings, self.scheduler.get_last_lr()):
                group.update(own, lr=lr)
            # It also hands every sub-group the same `step` tensor, which AdamW increments in
            # place: the count would advance once per sub-group per step and skew the bias
            # correction. One counter each.
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {path} (tag {tag})")


def saved_world_size(tag_dir: str) -> int:
    """How many data-parallel ranks wrote the DeepSpeed checkpoint in `tag_dir` (one optimizer
    partition file each)."""
    ranks = {int(m.group(1)) for name in os.listdir(tag_dir) if (m := _OPTIM_FILE.search(name))}
    if not ranks:
        raise CheckpointError(f"{tag_dir} holds no ZeRO optimizer partitions (zero_pp_rank_*_optim_states.pt)")
    return max(ranks) + 1


@contextlib.contextmanager
def universal_state(state_dir: str, saved: int, current: int):
    """Yield a directory holding the ZeRO state of `state_dir` (written by `saved` ranks) as a
    DeepSpeed universal checkpoint, which loads on any number of ranks, `current` here.

    Rank 0 converts with DeepSpeed's own `ds_to_universal` (every partition merged into one file
    per parameter and state: fp32 weight, exp_avg, exp_avg_sq) into `<checkpoint>.universal`,
    next to the checkpoint, on the same (shared) filesystem the other nodes read; the checkpoint
    itself is never touched, so its manifest still holds. The sources were verified and their
    pickles scanned before any of this (`find_resumable`). The directory is removed after the
    load; one left by a crash is replaced. Conversion runs in this process, serially: it happens
    once per change of rank count, and forking worker processes out of a rank is not safe.
    """
    import argparse
    import io

    checkpoint = os.path.dirname(os.path.normpath(state_dir))
    out = checkpoint + ".universal"
    error = None
    if torch.distributed.get_rank() == 0:
        log.info("resharding ZeRO state from %d to %d ranks: converting %s to a universal checkpoint", saved,
                 current, checkpoint)
        try:
            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            args = argparse.Namespace(
                input_folder=os.path.join(state_dir, DEEPSPEED_TAG), output_folder=os.path.join(out, DEEPSPEED_TAG),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True,
            )
            chatter = io.StringIO()
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):  # prints, bars
                ds_to_universal(args)
            log.debug("%s", chatter.getvalue())
        except Exception as err:  # noqa: BLE001 - reported on every rank below
            error = f"{type(err).__name__}: {err}"
    error = dist.all_gather_object(error)[0]
    if error:
        shutil.rmtree(out, ignore_errors=True)
        raise CheckpointError(f"converting {checkpoint} (ZeRO state of {saved} ranks) for {current} ranks failed "
                              f"({error}); resume on {saved} ranks, or pass resume=false to start over")
    try:
        yield out
    finally:
        dist.barrier()
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(out, ignore_errors=True)
