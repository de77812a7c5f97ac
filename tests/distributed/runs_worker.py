"""Rank process for the whole runs the tests declare (helpers.declare_run / declare_state): a list
of jobs run one after the other in one process, so the suite pays the start-up (torch,
transformers, DeepSpeed imports) once per launch, not once per run.

`python -m torch.distributed.run --standalone --nproc_per_node=N tests/distributed/runs_worker.py PLAN.json`

PLAN.json is a list of jobs; each rank R writes each job's result (by name) to PLAN.rank<R>.json:
- `{"kind": "train", "name", "argv", "faults", "resume_from": {"run_dir", "step"}}`: a whole run,
  `distft.train.train(cfg)` with the config `preflight(argv)` composes, as the command line's rank
  process runs it; with several ranks in the process group made here (train() leaves a group it
  did not make to its caller), on one rank in the group the engine makes and train() ends. `faults`
  is DISTFT_FAULTS for this job alone. `resume_from`: first, rank 0 makes the run directory what a
  run killed right after its step-N checkpoint leaves behind: that run's config dump and tracker id,
  its metrics up to step N, the committed checkpoint of step N, nothing later, no summary.
  `poisoned: {"run_dir", "step", "kind", "markers"}`: first, rank 0 copies that finished run
  (without its summary: a run stopped after its step-N checkpoint) and tampers with its step-N
  checkpoint (tests/payloads.py poison_checkpoint; a payload that runs leaves a file in `markers`).
  Result: `run_dir`, `error` (type and message, when train() raised: every rank raises alike) and
  `log` (this rank's output: its log lines, and rank 0's progress); `poisoned_file` and `markers`
  on rank 0 (the file tampered with, the payloads' marker directory).
- `{"kind": "state", "name", "mode", "out_dir", "parallel", "technique", "overrides"}`: the engine's
  state alone (resharding, tensor for tensor). `save`: build the run as the trainer does
  (`build_run`), train 3 steps, `engine.save_state(OUT_DIR/checkpoint/state)`; `load`: build a fresh
  one (other initial weights: another seed), `engine.load_state(...)`, train one more step. Both
  write OUT_DIR/<mode>.safetensors on rank 0: every trainable weight and every optimizer state
  tensor at full size (fp32 master weights under ZeRO), gathered from all ranks, so the test can
  compare them across rank counts; and OUT_DIR/<mode>.json (lr, each param group's
  hyperparameters, Adam's step counts, the step after).
A job that raises anything but a run's own error ends the launch with its traceback (a peer may be
stuck in a collective).
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
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


def state_job(job: dict, info) -> dict:
    out_dir, parallel, technique, mode = job["out_dir"], job["parallel"], job["technique"], job["mode"]
    state_dir = os.path.join(out_dir, "checkpoint", "state")
    overrides = [f"+experiment=tiny_{technique}", f"parallel={parallel}",
                 f"launcher.nproc_per_node={info.world_size}", "train.warmup_steps=2", "train.max_steps=10"]
    if parallel == "zero3":
        overrides.append(ZERO3_PARTITION_ALL)
    overrides += job.get("overrides", [])
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
    return {}


def as_if_killed_after(source: str, step: int, run_dir: str) -> None:
    """Rank 0: `run_dir` as a run of `source`'s config killed right after its step-`step` checkpoint."""
    name = f"step_{step:06d}"
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    shutil.copytree(os.path.join(source, "checkpoints", name), os.path.join(run_dir, "checkpoints", name))
    for kept in ("config.yaml", "tracker_run_id"):
        shutil.copy(os.path.join(source, kept), os.path.join(run_dir, kept))
    with open(os.path.join(source, "metrics.jsonl")) as f, open(os.path.join(run_dir, "metrics.jsonl"), "w") as out:
        out.writelines(line for line in f if json.loads(line).get("step", 0) <= step)


def poisoned_copy(source: dict, run_dir: str) -> str:
    """Rank 0: `run_dir` as the finished run `source["run_dir"]` stopped after its last checkpoint,
    that checkpoint then poisoned (tests/payloads.py). Returns the file tampered with."""
    from tests.payloads import poison_checkpoint

    shutil.copytree(source["run_dir"], run_dir)
    os.remove(os.path.join(run_dir, "summary.json"))
    os.makedirs(source["markers"], exist_ok=True)
    checkpoint = os.path.join(run_dir, "checkpoints", f"step_{source['step']:06d}")
    return poison_checkpoint(checkpoint, source["kind"], source["markers"])


class Tee(io.TextIOBase):
    """This rank's stdout, and a copy of it."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def train_job(job: dict, info) -> dict:
    from distft import faults
    from distft.config import run_dir as config_run_dir
    from distft.errors import NonFiniteError, UserError
    from distft.train import train

    cfg, errors = preflight(job["argv"])
    assert not errors, errors
    run_dir = config_run_dir(cfg)
    result: dict = {"run_dir": run_dir}
    source = job.get("resume_from")
    if source and info.is_main:
        as_if_killed_after(source["run_dir"], source["step"], run_dir)
    if job.get("poisoned") and info.is_main:
        result.update(poisoned_file=poisoned_copy(job["poisoned"], run_dir), markers=job["poisoned"]["markers"])
    dist.barrier()
    faults._fired.clear()
    if job.get("faults"):
        os.environ[faults.ENV] = job["faults"]
    stdout, sys.stdout = sys.stdout, Tee(sys.stdout)
    try:
        train(cfg)
    except (NonFiniteError, UserError) as err:  # the CLI's clean exits (distft/errors.py exit_code 3, 2)
        result["error"] = f"{type(err).__name__}: {err}"
    finally:
        result["log"] = sys.stdout.copy.getvalue()
        sys.stdout = stdout
        os.environ.pop(faults.ENV, None)
    return result


def main() -> None:
    plan_path = sys.argv[1]
    with open(plan_path) as f:
        jobs = json.load(f)
    info = dist.from_env()
    dist.share_cpu_threads(CPU)
    if info.world_size == 1:
        # The 1-rank group FSDP and DeepSpeed make for themselves when there is none
        # (engines/fsdp.py, engines/deepspeed.py), made once for every job here: DeepSpeed keeps
        # the group it first saw, so one made and destroyed by each run would break the next.
        os.environ.setdefault("LOCAL_RANK", "0")
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    else:
        dist.init(info, "gloo", 300, CPU)
    results = {}
    for job in jobs:
        results[job["name"]] = (train_job if job["kind"] == "train" else state_job)(job, info)
        gc.collect()
    with open(plan_path.removesuffix(".json") + f".rank{info.rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    from distft.commands.train import exit_now

    main()
    exit_now(0)  # no interpreter teardown: ~1 s per rank
