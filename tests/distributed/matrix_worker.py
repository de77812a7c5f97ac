"""Rank process for the engine matrices (test_ddp.py, test_deepspeed.py): every technique on every
DDP/ZeRO preset, one launch per test module.

Started by torch's elastic launcher on 2 gloo ranks (`python -m torch.distributed.run
--nproc_per_node=2 tests/distributed/matrix_worker.py OUT.json [--techniques=a,b] PRESET...
-- OVERRIDES`).
One process group serves every cell, so the matrix pays the start-up (torch, transformers,
DeepSpeed imports) once instead of once per cell. Each cell is built as the trainer builds a run:
`preflight` (compose + validate), `distft.run.build_run` (tokenizer, data, model + technique,
engine, batches), then `optimizer_step`.

Per cell it records (rank 0 writes OUT.json):
- `rejected`: validate()'s messages, when the config is refused; nothing is built then;
- `losses`: the step losses; `grad_norms`; `eval_loss_before`: held-out loss before training;
- `eval_loss`: held-out loss of `engine.unwrapped()` after training, run on every rank in lockstep
  (ZeRO-3 gathers layers in its forward hooks), per rank; `tokens`: exactly NEW_TOKENS greedy
  tokens for 2 held-out prompts by generate_answers' decoders (no stop at eos), per rank;
- `reloaded_eval_loss` / `reloaded_tokens`: the same on rank 0 alone, for a fresh model of the
  same technique loaded from `engine.gathered_state_dict()` (ZeRO-3) or `unwrapped().state_dict()`
  (ZeRO-1/2, whose weights are replicated), PEFT adapters extracted on rank 0 alone as a checkpoint
  save does: checks that what a checkpoint would save is the trained model;
- `gathered`: whether the engine returned gathered weights; `state_keys_match`: their keys are
  those of `unwrapped().state_dict()`; `weights_nonempty`: the saved tensors are real and not all zero.
A cell that raises ends the job with the traceback on stderr (its peer may be stuck in a collective).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch

TECHNIQUES = ("full", "lora", "dora", "qlora", "prefix", "prompt")
NEW_TOKENS = 4  # greedy tokens generated per prompt


def run_cell(preset: str, technique: str, overrides: list[str], info) -> dict:
    from distft.config import grad_accum_steps
    from distft.evaluation.evaluate import held_out_loss
    from distft.preflight import preflight
    from distft.run import build_run
    from distft.train import optimizer_step, seed_everything

    argv = [f"+experiment=tiny_{technique}", f"parallel={preset}", "launcher.nproc_per_node=2", *overrides]
    if technique in ("prefix", "prompt"):
        # Virtual tokens on a random base learn slowly: a higher LR makes the fall clear in a few steps.
        argv.append("train.lr=0.1")
    cfg, errors = preflight(argv)
    if errors:
        return {"rejected": errors}
    seed_everything(cfg.train.seed)
    device = torch.device("cpu")
    run = build_run(cfg, info, device)  # tokenizer, data, model, engine and batches, as the trainer builds them
    engine, tokenizer = run.engine, run.tokenizer
    accum = grad_accum_steps(cfg)
    batches = iter(run.batches)
    held_out = run.held_out[:1]
    prompts = [row["prompt"] for row in run.data.eval_rows[:2]]
    model = engine.unwrapped()
    eval_before = held_out_loss(model, held_out, device, autocast_ctx=engine.autocast)["loss"]
    torch.manual_seed(cfg.train.seed + info.rank)
    engine.train()
    losses, grad_norms = [], []
    for _ in range(cfg.train.max_steps):
        loss_total, targets, grad_norm, _ = optimizer_step(engine, [next(batches) for _ in range(accum)])
        losses.append(loss_total / targets)
        grad_norms.append(grad_norm)
    result = {
        "losses": losses,
        "grad_norms": grad_norms,
        "eval_loss_before": eval_before,
        "eval_loss": held_out_loss(model, held_out, device, autocast_ctx=engine.autocast)["loss"],
        "tokens": _forced_tokens(model, tokenizer, prompts, device),
    }
    gathered = engine.gathered_state_dict()  # collective
    state = model.state_dict()  # local: under ZeRO-3 its values are this rank's empty placeholders
    if info.rank == 0:
        weights = gathered if gathered is not None else state
        result["gathered"] = gathered is not None
        result["state_keys_match"] = list(weights) == list(state)
        result.update(_reload_on_one_process(cfg, tokenizer, model, weights, held_out, prompts, device))
    for key in ("tokens", "eval_loss"):  # every rank's, to check they ran in lockstep
        gathered_values = [None] * info.world_size
        torch.distributed.all_gather_object(gathered_values, result[key])
        result[key] = gathered_values
    engine.close()  # DeepSpeed keeps global state between engines
    return result


def _reload_on_one_process(cfg, tokenizer, model, weights: dict, held_out, prompts, device) -> dict:
    """A fresh model of the same technique, loaded the way a checkpoint save extracts the weights
    (PEFT: `get_peft_model_state_dict` of the trained model, on rank 0 only, as save_checkpoint
    does), then scored on rank 0 alone."""
    from distft.evaluation.evaluate import held_out_loss
    from distft.model.build import resolve_dtype
    from distft.techniques.build import build_trainable_model, is_peft

    fresh = build_trainable_model(cfg, resolve_dtype(cfg.model.dtype, device), tokenizer)
    for module in fresh.modules():
        # The engine keeps 4-bit weights in their stored layout (no CPU repacking, see
        # engines/deepspeed.py): score the reloaded model with the same kernel.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    if is_peft(fresh):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapter = get_peft_model_state_dict(model, state_dict=weights)
        set_peft_model_state_dict(fresh, adapter)
        tensors = list(adapter.values())
    else:
        fresh.load_state_dict(weights, strict=True)
        tensors = list(weights.values())
    return {
        "reloaded_eval_loss": held_out_loss(fresh, held_out, device)["loss"],
        "reloaded_tokens": _forced_tokens(fresh, tokenizer, prompts, device),
        "weights_nonempty": all(t.numel() > 0 for t in tensors) and any(bool(t.abs().sum() > 0) for t in tensors),
    }


def _forced_tokens(model, tokenizer, prompts, device) -> list[list[int]]:
    """Exactly NEW_TOKENS greedy tokens per prompt (no eos stop), by the decoders generate_answers
    uses: a barely trained model often answers eos first, which would leave one forward to check."""
    from distft.evaluation.evaluate import _generate_cached, _generate_full_forward, _is_prompt_learning

    decode = _generate_full_forward if _is_prompt_learning(model) else _generate_cached
    rows = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        tokens = decode(model, rows, NEW_TOKENS, [], tokenizer.pad_token_id, device)
    model.train(was_training)
    return tokens


def main() -> None:
    from distft import dist

    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    out, presets, overrides = args[0], args[1:split], args[split + 1 :]
    techniques = TECHNIQUES
    if presets and presets[0].startswith("--techniques="):
        techniques = tuple(presets.pop(0).split("=", 1)[1].split(","))
    info = dist.from_env()
    dist.init(info, "gloo", 120, torch.device("cpu"))
    results: dict[str, dict] = {}
    for preset in presets:
        for technique in techniques:
            started = time.time()
            try:
                results[f"{preset}/{technique}"] = run_cell(preset, technique, overrides, info)
                results[f"{preset}/{technique}"]["seconds"] = round(time.time() - started, 2)
            except Exception:
                # The other rank may be waiting in a collective this one will never join: report
                # and end the job (the launcher stops the other rank) instead of hanging.
                print(f"[rank{info.rank}] {preset}/{technique} failed:\n{traceback.format_exc()}", file=sys.stderr,
                      flush=True)
                os._exit(1)
            gc.collect()
            if info.rank == 0:
                with open(out, "w") as f:
                    json.dump(results, f, indent=1)
    dist.shutdown()


if __name__ == "__main__":
    from distft.commands.train import exit_now

    main()
    exit_now(0)  # no interpreter teardown: ~1 s per rank
