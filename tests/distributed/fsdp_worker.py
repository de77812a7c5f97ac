"""One 2-rank process group that puts the FSDP engine through every technique on every FSDP
layout (test_fsdp.py).

Started once for the module by `python -m torch.distributed.run --nproc_per_node=2
tests/distributed/fsdp_worker.py OUT_DIR PLAN.json`, so the ~10 s start-up of a launch is paid
once for every layout's cells. PLAN.json lists the layouts: `[{"layout": NAME, "parallel":
PARALLEL, "args": [override ..., --meta, --extras, --only=T,T]}, ...]`. Each technique runs the
trainer's own pieces: config from `preflight`, model from `build_trainable_model`, engine from
`build_engine`, data from `prepare_data` + `TrainBatches`, steps from `train.optimizer_step`. Each
rank writes what it saw to OUT_DIR/rank<R>.json, by layout; the test asserts on the numbers.

`--only` picks techniques, `--extras` adds mixed-precision cells (EXTRA_CELLS). `--meta` (one
layout) first checks meta-device loading: a sharded meta model filled from rank 0 equals the
eagerly built one, and what host memory that costs each rank.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from distft import dist  # noqa: E402
from distft.config import grad_accum_steps  # noqa: E402
from distft.data.batching import TrainBatches, eval_batches  # noqa: E402
from distft.data.pipeline import prepare_data  # noqa: E402
from distft.engines import autocast_context, autocast_dtype, build_engine  # noqa: E402
from distft.evaluation.evaluate import generate_answers, held_out_loss  # noqa: E402
from distft.model.build import load_tokenizer, resolve_dtype  # noqa: E402
from distft.preflight import preflight  # noqa: E402
from distft.techniques.build import build_trainable_model, keep_4bit_training_layout  # noqa: E402
from distft.tracking import _proc_status_bytes, _reset_peak_rss  # noqa: E402
from distft.train import optimizer_step, seed_everything  # noqa: E402

CPU = torch.device("cpu")
TECHNIQUES = ("full", "lora", "dora", "qlora", "prefix", "prompt")
# With --extras: mixed precision. bf16 gathers parameters in bf16 (FSDP's MixedPrecisionPolicy);
# QLoRA with its 4-bit bytes stored as float32 must not be cast to bf16 (engine falls back to
# autocast alone).
EXTRA_CELLS = {
    "full_bf16": ("full", ["train.precision=bf16"]),
    "qlora_bf16_fp32_storage": (
        "qlora", ["train.precision=bf16", "technique.quant_storage=float32", "model.dtype=float32"]
    ),
}
# Optimizer steps per technique (LR and warm-up are the tiny_<technique> experiment's): on a
# random base, virtual tokens learn slowly.
STEPS = {"full": 6, "lora": 6, "dora": 6, "qlora": 6, "prefix": 10, "prompt": 10}
EVAL_BATCHES = 2
PROMPTS, NEW_TOKENS = 4, 4


def config(technique: str, parallel: str, overrides: list[str]):
    # Rows packed in order: the layouts' tolerances (test_fsdp.py) were measured on these batches.
    # With best-fit rows the QLoRA cell meets a grad-norm spike (x4) at step 5, after which bf16
    # compute amplifies any reduction-order difference ~20x a step (hybrid mesh: 2e-5 at step 4,
    # 3e-3 at step 6): a property of that trajectory, not of where the parameters live.
    cfg, errors = preflight([
        f"+experiment=tiny_{technique}", f"parallel={parallel}", "launcher.nproc_per_node=2",
        f"train.max_steps={STEPS[technique]}", "data.pack_strategy=in_order", *overrides,
    ])
    return cfg, errors


def build(cfg, tokenizer):
    seed_everything(cfg.train.seed)
    return build_trainable_model(cfg, resolve_dtype(cfg.model.dtype, CPU), tokenizer)


def fsdp_layout(model) -> dict:
    """What fully_shard made of the model: units, mesh, placements, offload, local share."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    params = list(model.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    local = sum(p.to_local().numel() for p in sharded)
    return {
        "units": len(units),
        "root_is_model": isinstance(model, FSDPModule),
        "not_sharded": sorted(n for n, p in model.named_parameters() if not isinstance(p, DTensor)),
        "mesh": list(sharded[0].device_mesh.mesh.shape),
        "placements": [str(p) for p in sharded[0].placements],
        # Private, but the only place FSDP2 keeps the policy it was given.
        "offload": sorted({type(group.offload_policy).__name__
                           for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups}),
        "local_fraction": local / sum(p.numel() for p in sharded),
    }


def run_cell(name: str, technique: str, parallel: str, overrides: list[str], prebuilt: dict, rank: int,
             out_dir: str) -> dict:
    cfg, errors = config(technique, parallel, overrides)
    if errors:
        return {"rejected": errors}
    started = time.time()
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.data.seed)
    pad_id = tokenizer.pad_token_id
    held_out = eval_batches(data.eval, 8, cfg.data.max_seq_len, cfg.data.packing, pad_id,
                            cfg.data.pack_strategy)[:EVAL_BATCHES]
    prompts = [row["prompt"] for row in data.eval_rows[:PROMPTS]]
    model = prebuilt.pop(name, None) or build(cfg, tokenizer)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # The engine keeps bitsandbytes from repacking 4-bit weights for its CPU eval kernels; the
    # unsharded reference must run the same kernels to compare exactly.
    keep_4bit_training_layout(model, refuse_repacked=True)

    # The same model before and after sharding: evaluation and generation on the sharded one
    # (every rank in lockstep, as the trainer runs them) must give the same numbers.
    amp = functools.partial(autocast_context, autocast_dtype(cfg.train.precision, CPU), CPU)
    before = held_out_loss(model, held_out, CPU, autocast_ctx=amp)["loss"]
    answers_before = generate_answers(model, tokenizer, prompts, NEW_TOKENS, PROMPTS, CPU, autocast_ctx=amp)
    engine = build_engine(cfg, model, CPU)
    result: dict = {"engine": type(engine).__name__, **fsdp_layout(engine.unwrapped())}
    result["eval_sharded"] = held_out_loss(engine.unwrapped(), held_out, CPU, autocast_ctx=engine.autocast)["loss"]
    result["eval_unsharded"] = before
    result["answers_unsharded"] = answers_before
    result["answers_sharded"] = generate_answers(engine.unwrapped(), tokenizer, prompts, NEW_TOKENS, PROMPTS, CPU,
                                                 autocast_ctx=engine.autocast)

    batches = iter(TrainBatches(
        data.train, cfg.train.micro_batch_size, cfg.data.max_seq_len, cfg.data.packing, pad_id,
        seed=cfg.train.seed, shuffle=cfg.data.shuffle, rank=rank, world_size=2,
        accumulation_steps=grad_accum_steps(cfg), pack_strategy=cfg.data.pack_strategy,
    ))
    torch.manual_seed(cfg.train.seed + rank)
    engine.train()
    losses, grad_norms = [], []
    for _ in range(cfg.train.max_steps):
        loss_total, targets, grad_norm, _ = optimizer_step(engine, [next(batches) for _ in range(grad_accum_steps(cfg))])
        losses.append(loss_total / targets)
        grad_norms.append(grad_norm)
    result["losses"], result["grad_norms"], result["accumulation"] = losses, grad_norms, grad_accum_steps(cfg)
    result["eval_trained"] = held_out_loss(engine.unwrapped(), held_out, CPU, autocast_ctx=engine.autocast)["loss"]

    gathered = engine.gathered_state_dict()
    if gathered is None:
        result["gathered"] = None
    else:
        trainable = {n for n, p in engine.unwrapped().named_parameters() if p.requires_grad}
        result["gathered"] = {
            "same_keys": sorted(gathered) == sorted(initial),
            "same_shapes": all(gathered[k].shape == initial[k].shape for k in gathered if k in initial),
            "plain_cpu": all(type(v) is torch.Tensor and v.device.type == "cpu" for v in gathered.values()),
            "trainable": len(trainable),
            # Real weights, not shards: what training changed differs from the initial value,
            # everything frozen comes back byte for byte (packed 4-bit bytes can be NaN as floats).
            "trainable_changed": all(not torch.equal(gathered[k], initial[k]) for k in trainable),
            "frozen_identical": all(torch.equal(_bytes(gathered[k]), _bytes(initial[k]))
                                    for k in initial if k not in trainable and k in gathered),
        }
    # The trainer's own checkpoint save, on every rank: each writes its shards of the training
    # state (DCP), rank 0 the gathered weights; the checkpoint must score what the sharded model scored.
    from distft.checkpoint.export import load_model
    from distft.checkpoint.store import save_checkpoint

    path = save_checkpoint(os.path.join(out_dir, parallel, "runs", name), cfg.train.max_steps, engine, tokenizer, cfg,
                           {"step": cfg.train.max_steps}, gathered)
    result["state_files"] = sorted(os.listdir(os.path.join(path, "state")))
    if gathered is not None:
        reloaded = load_model(path)[1]
        result["eval_reloaded"] = held_out_loss(reloaded, held_out, CPU, autocast_ctx=amp)["loss"]
    dist.barrier()
    result["seconds"] = time.time() - started
    return result


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8) if tensor.dim() else tensor


def rss_peak_reset() -> int:
    """The resident set now, with the kernel's peak (VmHWM) reset to it."""
    assert _reset_peak_rss(), "cannot reset the peak RSS (/proc/self/clear_refs)"
    return _proc_status_bytes("VmRSS")


def meta_checks(out: dict, rank: int, out_dir: str) -> None:
    """Meta-device loading: host memory on a 57M-param model, correctness on tiny ones."""
    from distft.engines.fsdp import FSDPEngine
    from distft.techniques.build import build_meta_model

    # Each path's peak resident set above the process's size when it starts (the kernel's
    # high-water mark reset first, as tracking.MemoryMeter does).
    big = ["model.hidden_size=768", "model.intermediate_size=2048", "model.num_hidden_layers=8",
           "model.num_attention_heads=12"]
    cfg, errors = config("full", "fsdp", big)
    assert not errors, errors
    start = rss_peak_reset()
    seed_everything(0)
    engine = FSDPEngine(cfg, build_meta_model(cfg, torch.float32), CPU)
    meta_delta = _proc_status_bytes("VmHWM") - start
    params = list(engine.unwrapped().parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in params)
    local_bytes = sum(p.to_local().numel() * p.element_size() for p in params)
    del engine, params
    gc.collect()
    # Control: the eager path (what every rank does without meta loading) on the same model.
    start = rss_peak_reset()
    eager = build(cfg, None)
    eager_delta = _proc_status_bytes("VmHWM") - start
    del eager
    out["memory"] = {"full_bytes": full_bytes, "local_bytes": local_bytes,
                     "meta_delta_bytes": meta_delta, "eager_delta_bytes": eager_delta}

    # Correctness: every tensor and the held-out loss (rotary buffers included) as built eagerly,
    # for the shapes the meta path must handle: adapters, PEFT's aliased word embeddings (prompt
    # tuning), tied embeddings, and a local model directory (rank 0 loads it with from_pretrained).
    local_dir = os.path.join(out_dir, "local_model")
    if rank == 0:
        from distft.model.build import build_model, build_offline_tokenizer

        build_model(config("full", "fsdp", [])[0].model).save_pretrained(local_dir)
        build_offline_tokenizer().save_pretrained(local_dir)
    dist.barrier()
    cases = {
        "lora": ("lora", ["technique.dropout=0.0"]),
        "prompt_text_init": ("prompt", ["technique.prompt_init_text=Answer"]),
        "full_tied": ("full", ["model.tie_word_embeddings=true"]),
        "full_local_dir": ("full", [f"model.name_or_path={local_dir}"]),
    }
    out["meta"] = {}
    for case, (technique, overrides) in cases.items():
        cfg, errors = config(technique, "fsdp", overrides)
        assert not errors, errors
        tokenizer = load_tokenizer(cfg.model)
        data = prepare_data(cfg.data, tokenizer, seed=cfg.data.seed)
        pad_id = tokenizer.pad_token_id
        held_out = eval_batches(data.eval, 8, cfg.data.max_seq_len, cfg.data.packing, pad_id,
                            cfg.data.pack_strategy)[:EVAL_BATCHES]
        eager = build(cfg, tokenizer)
        eager_state = {k: v.clone() for k, v in eager.state_dict().items()}
        eager_loss = held_out_loss(eager, held_out, CPU)["loss"]
        del eager
        seed_everything(cfg.train.seed)  # as train.py: seed, build, engine (rank 0 builds the real one)
        meta_model = build_meta_model(cfg, torch.float32, tokenizer)
        on_meta = all(p.is_meta for p in meta_model.parameters())
        engine = FSDPEngine(cfg, meta_model, CPU)
        gathered = engine.gathered_state_dict()
        out["meta"][case] = {
            "built_on_meta": on_meta,
            "eager_loss": eager_loss,
            "meta_loss": held_out_loss(engine.unwrapped(), held_out, CPU)["loss"],
            "state_equal": None if gathered is None else (
                sorted(gathered) == sorted(eager_state)
                and all(torch.equal(gathered[k], eager_state[k]) for k in gathered)
            ),
        }


def layout_cells(layout: dict) -> tuple[dict, list[str], dict]:
    """(cells: name -> (technique, overrides), the layout's overrides, its --flags)."""
    flags = {a.partition("=")[0]: a.partition("=")[2] for a in layout["args"] if a.startswith("--")}
    overrides = [a for a in layout["args"] if not a.startswith("--")]
    techniques = flags["--only"].split(",") if "--only" in flags else TECHNIQUES
    cells = {t: (t, []) for t in techniques}
    if "--extras" in flags:
        cells.update(EXTRA_CELLS)
    return cells, overrides, flags


def main() -> None:
    out_dir, plan_path = sys.argv[1:]
    with open(plan_path) as f:
        layouts = json.load(f)
    info = dist.from_env()
    prebuilt: dict = {}
    # Known problem outside the engine: under an initialised process group, transformers 5's
    # save_pretrained writes only on rank 0, so distft.model.build._quantized_from_scratch (a temporary
    # save + reload) finds nothing on the other ranks. Build the QLoRA models before joining.
    for layout in layouts:
        cells, overrides, _ = layout_cells(layout)
        for name, (technique, extra) in cells.items():
            cfg, errors = config(technique, layout["parallel"], overrides + extra)
            if technique == "qlora" and not errors:
                prebuilt[layout["layout"], name] = build(cfg, load_tokenizer(cfg.model))
    dist.init(info, "gloo", 300, CPU)
    out: dict = {"rank": info.rank, "world_size": info.world_size, "layouts": {}}
    try:
        for layout in layouts:
            if "--meta" in layout_cells(layout)[2]:
                meta_checks(out["layouts"].setdefault(layout["layout"], {"cells": {}}), info.rank, out_dir)
        for layout in layouts:
            cells, overrides, _ = layout_cells(layout)
            parallel, done = layout["parallel"], out["layouts"].setdefault(layout["layout"], {"cells": {}})["cells"]
            mine = {name: model for (where, name), model in prebuilt.items() if where == layout["layout"]}
            for name, (technique, extra) in cells.items():
                try:
                    done[name] = run_cell(name, technique, parallel, overrides + extra, mine, info.rank, out_dir)
                except Exception as err:  # recorded for the test's message; the peer rank cannot go on alone
                    done[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
                    raise
    finally:
        with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as f:
            json.dump(out, f, indent=1)
        dist.shutdown()


if __name__ == "__main__":
    from distft.commands.train import exit_now

    main()
    exit_now(0)  # no interpreter teardown: ~1 s per rank
