"""Save an engine's training state on N ranks, load it on M, and dump every tensor (test_resume.py).

`python -m torch.distributed.run --standalone --nproc_per_node=N tests/distributed/reshard_worker.py
OUT_DIR PARALLEL TECHNIQUE save|load STATE_DIR [OVERRIDE ...]`:
- `save`: build the engine as the trainer does, train 3 steps, `engine.save_state(STATE_DIR)`;
- `load`: build a fresh engine (other initial weights: another seed), `engine.load_state(STATE_DIR)`,
  then train one more step.
Both write OUT_DIR/<mode>.safetensors on rank 0: every trainable weight and every optimizer
state tensor at full size (fp32 master weights under ZeRO), gathered from all ranks, so the test
can compare them tensor by tensor across rank counts; and OUT_DIR/<mode>.json (lr, each param
group's hyperparameters, the step after).
"""

from __future__ import annotations

import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from distft import dist  # noqa: E402
from distft.config import grad_accum_steps  # noqa: E402
from distft.preflight import preflight  # noqa: E402
from distft.run import build_run  # noqa: E402
from distft.train import optimizer_step, seed_everything  # noqa: E402

CPU = torch.device("cpu")
STEPS = 3
ZERO3_PARTITION_ALL = "+parallel.deepspeed.overrides.zero_optimization={stage3_param_persistence_threshold:0}"


def full_state(engine) -> dict[str, torch.Tensor]:
    """Every rank (collective): `weight/<name>` and `<state>/<name>` for each trainable parameter,
    full size, on rank 0 (empty elsewhere)."""
    out: dict[str, torch.Tensor] = {}
    if hasattr(engine, "ds"):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        optimizer = engine.ds.optimizer
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 links each parameter to its optimizer-state fragment right after the first
            # group's first step, before AdamW created the other groups' states: parameters of
            # the no-decay group stay linked to nothing (DeepSpeed 0.19.8). Link again.
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
        for name, param in engine.ds.module.named_parameters():
            if not param.requires_grad:
                continue
            out[f"weight/{name}"] = safe_get_full_fp32_param(param)
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(engine.unwrapped(), engine.optimizer, options=options)
        out.update({f"weight/{k}": v for k, v in model_state.items()})
        for name, states in optim_state.get("state", {}).items():  # full state: rank 0 only
            # bitsandbytes nests its moments (uint8 + block scales, or fp32) under a key of its own.
            nested = {**states, **states.get("__bnb_optimizer_quant_state__", {})}
            out.update({f"{key}/{name}": v for key, v in nested.items() if torch.is_tensor(v) and v.dim()})
    if dist.from_env().rank != 0:
        return {}
    # Copies: on one rank the full state dict holds the live parameters themselves. 8-bit moments
    # stay uint8 (compared as stored).
    return {k: (v if v.dtype == torch.uint8 else v.float()).detach().cpu().clone().contiguous() for k, v in out.items()}


def adam_steps(engine) -> list[float]:
    """Adam's step count of every state this rank holds (each must advance by one per step)."""
    return [float(state["step"]) for state in engine.optimizer.state.values() if "step" in state]


def main() -> None:
    out_dir, parallel, technique, mode, state_dir = sys.argv[1:6]
    extra = sys.argv[6:]
    info = dist.from_env()
    dist.share_cpu_threads(CPU)
    dist.init(info, "gloo", 300, CPU)
    overrides = [f"+experiment=tiny_{technique}", f"parallel={parallel}",
                 f"launcher.nproc_per_node={info.world_size}", "train.warmup_steps=2", "train.max_steps=10"]
    if parallel == "zero3":
        overrides.append(ZERO3_PARTITION_ALL)
    overrides += extra
    cfg, errors = preflight(overrides)
    assert not errors, errors
    seed_everything(cfg.train.seed if mode == "save" else cfg.train.seed + 1)  # load: other initial weights
    run = build_run(cfg, info, CPU)  # what the trainer builds, the same way
    engine = run.engine
    accum = grad_accum_steps(cfg)
    batches = iter(run.batches)
    engine.train()
    if mode == "save":
        for _ in range(STEPS):
            optimizer_step(engine, [next(batches) for _ in range(accum)])
        engine.save_state(state_dir)
        dist.barrier()
    else:
        engine.load_state(state_dir)
    tensors = full_state(engine)
    report = {"lr": engine.lr(), "world_size": info.world_size,
              "groups": [{k: group[k] for k in ("lr", "weight_decay", "betas", "eps")}
                         for group in engine.optimizer.param_groups]}
    report["adam_steps"] = adam_steps(engine)
    if mode == "load":  # training goes on from the loaded state
        loss, targets, grad_norm, _ = optimizer_step(engine, [next(batches) for _ in range(accum)])
        report.update(loss=loss / targets, grad_norm=grad_norm, lr_after=engine.lr(), adam_steps_after=adam_steps(engine))
    if info.is_main:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(out_dir, f"{mode}.safetensors"))
        with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: ~1 s per rank (see distft/cli.py, _exit_now)
