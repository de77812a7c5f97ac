"""Preference tuning in the trainer (objective=dpo): the reference's log-probs, the optimizer step
and the held-out preference metrics. The math is distft/model/preference.py; the pairs are
distft/data/preference.py.

The reference is the model training starts from: for adapter techniques (LoRA, DoRA, QLoRA,
prefix, prompt) the base with the adapter disabled, for full fine-tuning the model before its
first step. Its log-probs of every pair's answers are computed once, before the first step (and
before a resume loads trained weights, so from the same start), by the ranks together (each a
share of the pairs, gathered), and kept in the run directory (`reference_logps.safetensors`,
read as plain tensors, checked against the split's size); a step then needs no reference forward
and no second copy of the model, under every engine. This is TRL's `precompute_ref_log_probs`.
`objective.reference=live` (adapter and virtual-token techniques) scores each micro-batch's
reference in its step instead, with the adapter off (one more forward per step, no gradients):
for runs that train on a small part of a large pair set, where scoring every pair up front would
cost more than the training; the held-out pairs' table is computed up front either way.

The step: each micro-batch's pairs (chosen rows, then rejected) in one forward; the summed
per-pair loss divided by the number of pairs of the whole step (all ranks, all accumulation
micro-batches), so every pair weighs the same however the step is split; metrics summed the same
way and logged under TRL's names.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch

from distft import dist, faults, preemption
from distft.model.loss import computing_token_logps
from distft.model.preference import answer_sums, pair_losses, pair_metrics, split_pairs

log = logging.getLogger("distft")
REFERENCE_FILE = "reference_logps.safetensors"


def _adapters_off(model):
    """The reference's forward: a PEFT model with its adapter disabled, anything else as it is."""
    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) and hasattr(model, "peft_config") else contextlib.nullcontext()


def scored_answers(model, forward, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each answer's (summed log-prob, answer tokens) in a pair micro-batch, chosen then rejected:
    `forward(batch)` (an engine's, or a plain model call) returns what `model`'s head gives, the
    head and the log-softmax in chunks, no full logits (distft.model.loss)."""
    labels = batch["labels"].to(device)
    with computing_token_logps(model, labels) as armed:
        token_logps = armed.result(forward(batch))
    return answer_sums(token_logps, labels, batch.get("sequences"))


@contextlib.contextmanager
def scoring(model, adapters_off: bool = False):
    """The model in eval mode without gradients (its adapter disabled for the reference), put
    back in its own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (_adapters_off(model) if adapters_off else contextlib.nullcontext()):
            yield
    finally:
        model.train(was_training)


def _logps(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return scored_answers(engine.unwrapped(), engine.forward, batch, engine.device)


def compute_reference(engine, pairs: list, batch_pairs: int, pad_id: int) -> torch.Tensor:
    """[n, 2] float32: the reference's log-probs of each pair's (chosen, rejected) answers. The
    pairs go in fixed chunks of `batch_pairs` consecutive pairs, chunk k to rank k % world (every
    rank as many forwards, as sharded engines need: a rank short of chunks repeats its last), so
    a pair is scored in the same batch, to the same bits, on any number of ranks; gathered."""
    from distft.data.preference import pair_batch

    info = dist.from_env()
    chunks = [list(range(start, min(start + batch_pairs, len(pairs)))) for start in range(0, len(pairs), batch_pairs)]
    mine = chunks[info.rank::info.world_size]
    per_rank = -(-len(chunks) // info.world_size)
    work = mine + mine[-1:] * (per_rank - len(mine)) if mine else chunks[:1] * per_rank
    values: dict[int, tuple[float, float]] = {}
    with scoring(engine.unwrapped(), adapters_off=True), engine.autocast():
        for chunk in work:
            logps, _ = _logps(engine, pair_batch([pairs[i] for i in chunk], pad_id))
            chosen, rejected = split_pairs(logps.float().cpu())
            for k, i in enumerate(chunk):
                values[i] = (float(chosen[k]), float(rejected[k]))
    table = torch.zeros((len(pairs), 2), dtype=torch.float32)
    for part in dist.all_gather_object({i: values[i] for chunk in mine for i in chunk}):
        for i, (c, r) in part.items():
            table[i, 0], table[i, 1] = c, r
    return table


def reference_tables(run, run_dir: str) -> dict[str, torch.Tensor]:
    """{"train": [n, 2], "eval": [m, 2]}: read from the run directory when it holds tables of these
    sizes, else computed (`compute_reference`) and written there by rank 0."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    from distft.files import write_bytes

    pairs = run.pairs
    sizes = {"train": len(pairs.train), "eval": len(pairs.eval)}
    if run.cfg.objective.reference == "live":  # the training pairs' are scored in their steps
        del sizes["train"]
    path = os.path.join(run_dir, REFERENCE_FILE)
    tables: Optional[dict] = None
    if os.path.isfile(path) and not os.path.islink(path):
        try:
            loaded = load_file(path)
            if {k: tuple(v.shape) for k, v in loaded.items()} == {k: (n, 2) for k, n in sizes.items()}:
                tables = loaded
        except (SafetensorError, OSError, ValueError):
            tables = None
    if tables is not None:
        return {"train": None, **tables}
    batch_pairs = max(1, run.cfg.eval.batch_size)
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    tables = {name: compute_reference(run.engine, getattr(pairs, name), batch_pairs, pad_id) for name in sizes}
    if run.info.is_main:
        # Atomic, and never through a link planted in the run directory (distft.files).
        write_bytes(path, save(tables), "the reference log-probs", root=run_dir)
        log.info("reference log-probs of %s and %d eval pairs: %s", f"{sizes['train']} train" if "train" in sizes
                 else "no train pairs (objective.reference=live)", sizes["eval"], path)
    dist.barrier()
    return {"train": None, **tables}


def live_reference(engine, batch: dict) -> torch.Tensor:
    """[n, 2] fp32: the reference's log-probs of a micro-batch's pairs, scored now (objective.
    reference=live): the model with its adapter disabled, in eval mode and without gradients, as
    `compute_reference` scores them (the same numbers, up to the rounding of another batch)."""
    with scoring(engine.unwrapped(), adapters_off=True):
        logps, _ = _logps(engine, batch)
    return torch.stack(split_pairs(logps.float()), dim=1)


def preference_step(engine, micro_batches: list[dict], cfg, reference: Optional[torch.Tensor],
                    step: int = 0) -> tuple[float, int, float, bool, dict]:
    """One optimizer step of preference tuning over this rank's micro-batches: (summed loss over
    all ranks, pairs in the step, grad norm, this rank's loss finite, metrics summed over all ranks,
    `answer_tokens` among them). `reference`: the training pairs' precomputed table, or None to
    score each micro-batch's reference in the step (`live_reference`)."""
    device = engine.device
    faults.wait_for_signal(step, preemption.received)  # the drills' faults, as optimizer_step has them
    faults.crash(step)
    faults.kill_at(step)
    step_pairs = torch.tensor(float(sum(b["pair_index"].numel() for b in micro_batches)), device=device)
    dist.all_reduce_sum(step_pairs)
    loss_total = torch.zeros((), device=device)
    sums: dict[str, torch.Tensor] = {}
    answer_tokens = 0
    for i, batch in enumerate(micro_batches):
        ref = (reference[batch["pair_index"]] if reference is not None else live_reference(engine, batch)).to(device)
        with engine.accumulating(last_micro_step=i == len(micro_batches) - 1):
            logps, tokens = _logps(engine, batch)
            (pc, pr), (tc, tr) = split_pairs(logps), split_pairs(tokens)
            losses, chosen_rewards, rejected_rewards = pair_losses(pc, pr, ref[:, 0], ref[:, 1], cfg.beta, cfg.loss,
                                                                   tc, tr)
            loss_sum = losses.sum()
            if i == 0 and faults.corrupt_loss(step):
                loss_sum = loss_sum * float("nan")
            engine.backward(loss_sum / step_pairs.clamp(min=1))
        loss_total += loss_sum.detach()
        answer_tokens += int(tokens.sum())
        for key, value in pair_metrics(chosen_rewards, rejected_rewards, pc, pr).items():
            sums[key] = sums.get(key, torch.zeros((), device=device)) + value.float()
    local_finite = bool(torch.isfinite(loss_total))
    grad_norm = engine.step()
    keys = sorted(sums)
    packed = torch.stack([loss_total.float(), *[sums[k] for k in keys],
                          torch.tensor(float(answer_tokens), device=device)])
    dist.all_reduce_sum(packed)
    pairs = max(int(step_pairs.item()), 1)
    metrics = {k: float(packed[1 + j]) / pairs for j, k in enumerate(keys)}
    metrics["answer_tokens"] = int(packed[-1])
    return float(packed[0]), int(step_pairs.item()), grad_norm, local_finite, metrics


def pair_scores(model, forward, pairs, batch_pairs: int, pad_id: int, device,
                autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) [n] fp32: the summed log-probs of `pairs`' answers under `model` (eval
    mode, no grad), `batch_pairs` pairs a forward, unpacked (the reference's layout)."""
    from distft.data.preference import pair_batch

    chosen_all, rejected_all = [torch.zeros(0)], [torch.zeros(0)]
    with scoring(model), autocast():
        for start in range(0, len(pairs), batch_pairs):
            logps, _ = scored_answers(model, forward, pair_batch(pairs[start:start + batch_pairs], pad_id), device)
            chosen, rejected = split_pairs(logps.float().cpu())
            chosen_all.append(chosen)
            rejected_all.append(rejected)
    return torch.cat(chosen_all), torch.cat(rejected_all)


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, reference: torch.Tensor, beta: float) -> dict:
    """`preference_accuracy`, the share of pairs whose chosen answer the model finds likelier than
    the rejected one (summed log-probs), and `preference_margin`, their mean difference;
    `reward_accuracy` and `reward_margin`, the same relative to the reference ([n, 2]; DPO's
    implicit reward: beta x the log-prob ratio; 0 and 0 for the model training starts from)."""
    rewards = beta * ((chosen - reference[:, 0]) - (rejected - reference[:, 1]))
    return {"preference_accuracy": float((chosen > rejected).float().mean()),
            "preference_margin": float((chosen - rejected).mean()),
            "reward_accuracy": float((rewards > 0).float().mean()),
            "reward_margin": float(rewards.mean()),
            "pairs": len(chosen)}


def model_pair_scores(model, pairs, cfg, tokenizer, device, autocast=contextlib.nullcontext):
    """`pair_scores` of a plain model (not an engine's: `distft.evaluate`, `distft.compare`)."""
    from distft.model.build import model_inputs

    def forward(batch):
        with autocast():
            return model(**{k: v.to(device) for k, v in model_inputs(batch).items()}, use_cache=False).logits

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pair_scores(model, forward, pairs, max(1, cfg.eval.batch_size), pad_id, device)


def add_preference_metrics(results: dict, scores: dict, reference: Optional[str], beta: float) -> None:
    """`preference_metrics` into each `results[label]` from its `scores[label]` (chosen, rejected);
    the rewards against `scores[reference]` (a dpo run's base: the model it started from), left
    out when there is no reference among them."""
    for label in results:
        chosen, rejected = scores[label]
        ref = scores.get(reference) if reference is not None else None
        found = preference_metrics(chosen, rejected, torch.stack(ref if ref is not None else (chosen, rejected), 1),
                                   beta)
        if ref is None:
            for key in ("reward_accuracy", "reward_margin"):
                found.pop(key)
        results[label].update(found)


def preference_eval(run, reference: torch.Tensor) -> dict:
    """The held-out pairs scored by the model as it is now (`preference_metrics`)."""
    pairs, engine = run.pairs.eval, run.engine
    if not len(pairs):
        return {}
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    chosen, rejected = pair_scores(engine.unwrapped(), engine.forward, pairs, max(1, run.cfg.eval.batch_size), pad_id,
                                   engine.device, engine.autocast)
    return preference_metrics(chosen, rejected, reference, run.cfg.objective.beta)
