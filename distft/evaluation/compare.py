"""Several models scored on the same prompts, one report: `distft compare` / `python -m distft.compare
RUN_OR_CHECKPOINT ...` (the command line: distft/commands/compare.py).

The models are checkpoints or run directories (a run's best checkpoint when it made that its
result, else its newest: `checkpoint.resolve_checkpoint`), and the untuned base of the first one
unless `--no-base`; at least two in all. They are scored one at a time (loaded, scored, freed), so
comparing 13B variants needs the memory of one.

The prompts, decided here:
- by default the first model's held-out split, rebuilt from its config exactly as its run scored
  it (the tokenized-data cache is reused), with held-out loss and perplexity for every model whose
  tokenizer is the first one's;
- `--prompts FILE`: held-out rows in any shape distft trains on (alpaca, chat or ShareGPT rows;
  JSON Lines, JSON, CSV or Parquet), read with the first model's data settings; the reference is
  the row's last answer. Rows of the form `{"prompt": ..., "reference": ..., "task": ...}` are
  taken as one instruction each, `reference` optional: a file without references is compared side
  by side only (no metrics); references for some rows but not others is refused.
- Prompts are rendered with the first model's template. A model whose tokenizer differs gets the
  same prompt text, tokenized by its own tokenizer, and no loss (its tokens are other tokens).

It writes `--out` (default `./compare-<time>/`): `compare_report.md` (metrics per model, exact
match per task, samples side by side), `compare_report.predictions.jsonl` (every prompt, every
model's answer and scores: what `python -m distft.review` shows) and `compare.json` (models,
checkpoints, metrics). Nothing is written into a checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import sys
import time
from typing import Any, Optional

from distft.checkpoint.export import checkpoint_config, load_base, load_model, load_tokenizer_from
from distft.checkpoint.store import read_meta
from distft.checkpoint.verify import resolve_checkpoint
from distft.config import model_label
from distft.data.cache import prepared_for_run, tokenizer_fingerprint
from distft.data.pipeline import Example, RejectedRow, eval_batches, eval_row, to_canonical
from distft.data.sources import read_eval_path, reader_for
from distft.data.templates import stop_token_ids, trained_format
from distft.engines import autocast_context, autocast_dtype
from distft.errors import CheckpointError, DataError, TemplateError
from distft.evaluation.evaluate import GENERATION_METRICS, evaluate_model, metrics_only
from distft.evaluation.report import predictions_path, write_comparison, write_predictions
from distft.files import write_json

REPORT = "compare_report.md"
SUMMARY = "compare.json"
PLAIN_FIELDS = ("prompt", "reference", "task")  # the plain prompts-file row
PLACEHOLDER = "A"


@dataclasses.dataclass
class Entrant:
    label: str
    checkpoint: Optional[str]  # None: the first model's base
    cfg: Any = None


def _labels(checkpoints: list[str]) -> list[str]:
    """`<experiment>/<step dir>` per checkpoint, numbered when two would read the same."""
    labels = []
    for checkpoint in checkpoints:
        label = f"{checkpoint_config(checkpoint).run.experiment}/{os.path.basename(checkpoint)}"
        n, unique = 2, label
        while unique in labels or unique == "base":
            unique, n = f"{label}#{n}", n + 1
        labels.append(unique)
    return labels


def _plain(value: Any) -> bool:
    return isinstance(value, dict) and "prompt" in value and set(value) <= set(PLAIN_FIELDS) | {"id"}


def prompt_rows(path: str, cfg, tokenizer) -> list[dict]:
    """Eval rows ({prompt, prompt_ids, reference, task?}, as PreparedData.eval_rows) of a prompts
    file, rendered with `cfg` (a DataConfig) and `tokenizer`; DataError naming the row for a row
    that is neither a training row nor a plain prompt. A row without a reference gets "" and
    `has_reference` False."""
    if not os.path.exists(path):
        raise DataError(f"--prompts {path} does not exist")
    cfg = dataclasses.replace(cfg, eval_path=path, path=path, sources=[], source=reader_for(path))
    rows = []
    for raw in read_eval_path(cfg):
        value = raw.value
        has_reference = True
        if _plain(value):
            has_reference = isinstance(value.get("reference"), str) and value["reference"].strip() != ""
            # No reference: a placeholder answer marks where the prompt ends (an empty answer has no
            # target to find it by); its tokens are never fed, and the reference is left empty.
            value = {cfg.instruction_field: value["prompt"],
                     cfg.output_field: value["reference"] if has_reference else PLACEHOLDER,
                     **({"task": value["task"]} if "task" in value else {})}
        try:
            kind, row = to_canonical(value, "auto" if _plain(raw.value) else cfg.format, cfg)
        except RejectedRow as rejected:
            raise DataError(f"--prompts: {raw.where} is {rejected.rule}: {rejected.reason}; each row is a training "
                            'row (alpaca, chat, ShareGPT) or {"prompt": ..., "reference": ...}') from None
        if kind == "text":
            raise DataError(f"--prompts: {raw.where} is plain text, which has no prompt to answer; give "
                            'instruction/output or messages rows, or {"prompt": ..., "reference": ...}')
        entry = eval_row(Example(kind, row, ((), ())), cfg, tokenizer)
        if entry is None:
            raise DataError(f"--prompts: {raw.where}: its prompt alone is far longer than data.max_seq_len="
                            f"{cfg.max_seq_len}")
        rows.append({**entry, "has_reference": has_reference, **({} if has_reference else {"reference": ""})})
    if not rows:
        raise DataError(f"--prompts {path} holds no rows")
    with_reference = [r["has_reference"] for r in rows]
    if any(with_reference) and not all(with_reference):
        missing = [i for i, has in enumerate(with_reference) if not has]
        raise DataError(f"--prompts {path}: rows {', '.join(map(str, missing[:5]))} have no reference while others "
                        "do; give every row a reference (to score them) or none (to compare side by side)")
    return rows


def _device(cfg):
    import torch

    if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _score(model, cfg, tokenizer, rows, batches, eval_cfg, stop_ids) -> dict:
    device = _device(cfg)
    if not getattr(model, "is_loaded_in_4bit", False):
        model = model.to(device)
    amp = autocast_dtype(cfg.train.precision, device)
    return evaluate_model(model, tokenizer, batches, rows, eval_cfg, device,
                          autocast_ctx=lambda: autocast_context(amp, device), stop_ids=stop_ids)


def _without_scores(result: dict) -> dict:
    """A result on prompts without references: answers only."""
    result.update(dict.fromkeys(GENERATION_METRICS))
    result.pop("per_task", None)
    for sample in result["samples"]:
        sample["scores"] = {}
    return result


def compare(checkpoints: list[str], out: str, prompts: Optional[str] = None, base: bool = True,
            num_samples: Optional[int] = None, max_new_tokens: Optional[int] = None,
            trust_remote_code: bool = False) -> dict:
    """Score the models and write the report; returns compare.json's content."""
    if len(checkpoints) + int(base) < 2:
        raise CheckpointError("compare needs two models or more: give two checkpoints or run directories, or one "
                              "with its base (drop --no-base)")
    checkpoints = [resolve_checkpoint(c, announce=True) for c in checkpoints]
    out = os.path.abspath(os.path.expanduser(out))
    for checkpoint in checkpoints:
        real = os.path.realpath(checkpoint)
        if os.path.commonpath([os.path.realpath(out), real]) == real:
            raise CheckpointError(f"--out {out} is inside the checkpoint {checkpoint}, which is never written to; "
                                  "choose a directory outside it")
    first_cfg = checkpoint_config(checkpoints[0], trust_remote_code)
    first_tokenizer = load_tokenizer_from(checkpoints[0], trust_remote_code)
    eval_cfg = dataclasses.replace(first_cfg.eval)
    if num_samples is not None:
        eval_cfg.num_samples = num_samples
    if max_new_tokens is not None:
        eval_cfg.max_new_tokens = max_new_tokens
    batches = None
    if prompts:
        # Plain prompts in the format the first model was trained in (chat for messages rows).
        trained = dataclasses.replace(first_cfg.data, template=trained_format(checkpoints[0], first_cfg))
        rows = prompt_rows(prompts, trained, first_tokenizer)
        eval_cfg.num_samples = num_samples if num_samples is not None else len(rows)
        scored = all(r["has_reference"] for r in rows)
    pairs = None
    if not prompts:
        data = prepared_for_run(first_cfg, first_tokenizer).data
        rows, scored = data.eval_rows, True
        if data.report.pairs:  # a dpo run's held-out pairs: every model with its tokenizer scores them too
            from distft.data.preference import pairs_from_prepared

            pairs = pairs_from_prepared(data).eval
        batches = eval_batches(data.eval, eval_cfg.batch_size, first_cfg.data.max_seq_len, first_cfg.data.packing,
                               first_tokenizer.pad_token_id, first_cfg.data.pack_strategy)
        if first_cfg.train.eval_max_batches:
            batches = batches[: first_cfg.train.eval_max_batches]
    fingerprint = tokenizer_fingerprint(first_tokenizer)

    entrants = [Entrant(label, checkpoint) for label, checkpoint in zip(_labels(checkpoints), checkpoints)]
    if base:
        entrants.insert(0, Entrant("base", None))
    results: dict[str, dict] = {}
    pair_logps: dict = {}
    models = []
    for entrant in entrants:
        started = time.time()
        if entrant.checkpoint is None:
            cfg, tokenizer = first_cfg, first_tokenizer
            model = load_base(first_cfg, tokenizer=first_tokenizer)
        else:
            cfg, model, tokenizer = load_model(entrant.checkpoint, trust_remote_code=trust_remote_code)
        same = tokenizer_fingerprint(tokenizer) == fingerprint
        own_rows = rows if same else [{k: v for k, v in r.items() if k != "prompt_ids"} for r in rows]
        try:
            stop_ids = stop_token_ids(tokenizer, cfg.data.stop_tokens)
        except TemplateError as err:
            raise DataError(f"{entrant.checkpoint}: {err}") from None
        result = _score(model, cfg, tokenizer, own_rows, batches if same else None, eval_cfg, stop_ids)
        results[entrant.label] = result if scored else _without_scores(result)
        if pairs is not None and same:
            from distft.objective import add_preference_metrics, model_pair_scores

            device = _device(cfg)
            autocast = functools.partial(autocast_context, autocast_dtype(cfg.train.precision, device), device)
            pair_logps[entrant.label] = model_pair_scores(model, pairs, first_cfg, tokenizer, device, autocast)
            # Rewards against the base, the dpo run's reference (the first entrant, when compared).
            mine = {entrant.label: pair_logps[entrant.label], **{k: v for k, v in pair_logps.items() if k == "base"}}
            add_preference_metrics({entrant.label: result}, mine, "base", first_cfg.objective.beta)
        models.append({"label": entrant.label, "checkpoint": entrant.checkpoint,
                       "base_of": checkpoints[0] if entrant.checkpoint is None else None,
                       "experiment": cfg.run.experiment, "technique": "none (base)" if entrant.checkpoint is None
                       else cfg.technique.name, "model": model_label(cfg.model),
                       "steps": read_meta(entrant.checkpoint)["step"] if entrant.checkpoint else 0,
                       "same_tokenizer": same, "seconds": round(time.time() - started, 1),
                       "metrics": metrics_only(results[entrant.label])})
        print(f"distft: scored {entrant.label} in {time.time() - started:.0f} s", file=sys.stderr)
        del model
        gc.collect()

    report = os.path.join(out, REPORT)
    predictions = write_predictions(predictions_path(report), results)
    what = f"prompts of {os.path.basename(prompts)}" if prompts else "held-out"
    meta = {"experiment": ", ".join(m["label"] for m in models), "prompts": prompts or
            f"the held-out split of {checkpoints[0]}", "max_new_tokens": eval_cfg.max_new_tokens}
    notes = [f"- {m['label']}: {m['checkpoint'] or 'the untuned base of ' + m['base_of']} ({m['technique']}, "
             f"{m['model']}, {m['steps']} steps){'' if m['same_tokenizer'] else '; another tokenizer: no loss'}"
             for m in models]
    if not scored:
        notes.append("The prompts have no references: answers side by side, no metrics.")
    write_comparison(report, results, meta, num_samples=eval_cfg.report_samples, predictions=predictions,
                     notes=notes, what=what)
    summary = {"report": report, "predictions": predictions, "prompts": prompts, "scored": scored, "models": models}
    write_json(os.path.join(out, SUMMARY), summary, what="the comparison's summary")
    return summary
