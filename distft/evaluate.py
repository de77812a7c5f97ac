"""Evaluation: held-out loss and perplexity, generation metrics, and the base-vs-tuned report.

What it owns, in the order a run uses it:
- metrics on strings (`exact_match`, `token_f1`, `rouge_l`, `generation_metrics`): pure Python;
- `held_out_loss`: the token-weighted loss over eval batches, the same `token_loss` the trainer
  minimises, so the eval loss and the train loss are the same quantity;
- `generate_answers`: greedy, deterministic answers to held-out prompts;
- `evaluate_model`: both of the above for one model, in one dict;
- `write_report` / `metrics_only`: `eval_report.md` (base vs tuned) and the numbers for summary.json.

Choices worth knowing:
- exact_match and f1 are SQuAD v1.1's: both strings are normalised (lowercase, drop ASCII
  punctuation, drop the articles a/an/the, collapse whitespace), then compared whole or as token
  bags, so the numbers compare with published ones. That makes exact match blind to case and
  punctuation ("hello" scores 1.0 against "HELLO", "-5" against "5", "3.14" against "314"), which
  flatters case/sign tasks, so `generation_metrics` also reports `exact_match_strict`: the
  stripped strings are identical.
- rouge_l is exactly `rouge_score`'s rougeL F-measure, `RougeScorer(["rougeL"]).score(reference,
  prediction)`: its own default tokenizer and no stemming, so that it equals the per-example rougeL
  of Hugging Face `evaluate`'s "rouge" (use_aggregator=False; its default is use_stemmer=False too),
  and because the Porter stemmer, English-only, would count "running" as a match for "runs", which
  an answer-level metric should not. That tokenizer lowercases and turns every character outside
  [a-z0-9] into a space: "3.14" is ["3", "14"] (0.0 against "314"), accented words are cut ("café"
  is ["caf"]), and an answer without Latin letters or digits (Cyrillic, CJK) has no tokens and
  scores 0.0, even against itself; so does an empty answer. On such data read exact_match and f1.
  Unlike f1, ROUGE-L rewards word order (longest common subsequence).
- In exact_match and f1, an answer that normalises to nothing scores 1.0 only against a reference
  that also normalises to nothing (SQuAD 2.0's rule). Scoring no answers at all is an error, not a
  row of zeros.
- Perplexity is exp(loss) with the loss capped at `MAX_LOSS_FOR_PERPLEXITY` so a diverged model
  reports a huge finite number (JSON has no inf) instead of overflowing.
- Prompt-learning PEFT models (prompt/prefix tuning) are decoded by a plain greedy loop over the
  training-time forward, not `model.generate`: peft 0.21's generation hooks look up
  `past_key_values`, which transformers 5 renamed to `cache`, so they re-inject the virtual
  tokens at every step (prompt tuning) or drop the prefix (prefix tuning), and the answers come
  out wrong. Other models use `model.generate` with its KV cache.

Nothing here imports torch.distributed: `held_out_loss` takes an optional `reduce_sum` (for
example the engine's all-reduce) to sum its counts over ranks.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import torch

from distft.config import EvalConfig, model_label
from distft.files import write_text, writing
from distft.model import model_inputs, token_loss

MAX_LOSS_FOR_PERPLEXITY = 100.0  # exp(100) ~ 2.7e43: finite, and far above any real model's loss
REPORT_METRICS = ("loss", "perplexity", "exact_match", "exact_match_strict", "f1", "rouge_l")
GENERATION_METRICS = ("exact_match", "exact_match_strict", "f1", "rouge_l")
_META_KEYS = ("experiment", "technique", "model", "checkpoint", "steps")  # first in the report, in this order

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


# --------------------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop ASCII punctuation and articles, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def exact_match_strict(prediction: str, reference: str) -> float:
    """Identical after stripping surrounding whitespace: case and punctuation count."""
    return float(prediction.strip() == reference.strip())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalised token bags."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError("ROUGE-L needs the rouge_score package: pip install rouge-score") from e
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # its default tokenizer (module docstring)


def rouge_l(prediction: str, reference: str) -> float:
    """rouge_score's rougeL F-measure (longest common subsequence), default tokenizer, no stemming.

    Exactly rouge_score's number, 0.0 included for an answer or reference without [a-z0-9] tokens
    (empty, or non-Latin text); see the module docstring for why.
    """
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact_match, exact_match_strict, f1 and rouge_l (each in [0, 1]) over the pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score (an empty eval set has no generation metrics)")
    scorers = {"exact_match": exact_match, "exact_match_strict": exact_match_strict, "f1": token_f1, "rouge_l": rouge_l}
    n = len(predictions)
    return {name: sum(fn(p, r) for p, r in zip(predictions, references)) / n for name, fn in scorers.items()}


# ------------------------------------------------------------------------------- model helpers


def _autocast(autocast_ctx: Any):
    """`autocast_ctx` may be a (re-enterable) context manager, a callable returning one, or None."""
    if autocast_ctx is None:
        return contextlib.nullcontext()
    if hasattr(autocast_ctx, "__enter__"):
        return autocast_ctx
    return autocast_ctx()


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """Eval mode and no autograd for the block; the caller's train/eval mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    """A PEFT model whose adapter is virtual tokens in front of the sequence (prompt/prefix tuning)."""
    peft_config = getattr(model, "active_peft_config", None)
    return bool(getattr(peft_config, "is_prompt_learning", False))


def held_out_loss(
    model: torch.nn.Module,
    batches: Iterable[dict],
    device: torch.device | str,
    autocast_ctx: Any = None,
    reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, float]:
    """Token-weighted mean loss over every target token of `batches`, and its perplexity.

    Sum of per-batch loss sums over the total token count (not a mean of batch means, which would
    over-weight short batches). Batches are packed (`position_ids`) or padded (`attention_mask`).
    `reduce_sum`, when given, sums a float64 tensor [loss_sum, tokens] over ranks in place or by
    return value, so every rank reports the global number.
    """
    loss_sum, tokens = 0.0, 0
    with _eval_mode(model), _autocast(autocast_ctx):
        for batch in batches:
            inputs = {k: v.to(device) for k, v in model_inputs(batch).items()}
            labels = batch["labels"].to(device)
            # use_cache=False: with a cache, transformers 5 ignores packed position_ids when it
            # builds the attention mask, and packed samples would attend to each other.
            logits = model(**inputs, use_cache=False).logits
            batch_sum, batch_tokens = token_loss(logits, labels)  # drops prompt tuning's virtual positions
            loss_sum += float(batch_sum)
            tokens += int(batch_tokens)
    if reduce_sum is not None:
        totals = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64, device=device)
        reduced = reduce_sum(totals)
        totals = reduced if reduced is not None else totals
        loss_sum, tokens = float(totals[0]), int(round(float(totals[1])))
    if tokens == 0:
        raise ValueError("held-out loss over zero target tokens: the eval batches are empty or fully masked")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, MAX_LOSS_FOR_PERPLEXITY)), "tokens": tokens}


def _eos_ids(model: torch.nn.Module, tokenizer: Any, stop_ids: Sequence[int] = ()) -> list[int]:
    """What ends an answer: `stop_ids` (the run's: eos, the chat template's end-of-turn token,
    data.stop_tokens; see templates.stop_token_ids), the tokenizer's eos and the model's own
    generation_config eos (chat models end turns with e.g. <|eot_id|>)."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    for value in (list(stop_ids), tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    if not ids:
        raise ValueError("the tokenizer has no eos token and the model's generation config names none")
    return ids


def _generate_cached(model, rows: list[list[int]], max_new_tokens: int, eos_ids, pad_id, device) -> list[list[int]]:
    """`model.generate` on a left-padded batch (left, so every row continues at the same index)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        # Explicit so a hub generation_config (sampling defaults, other pad/eos) cannot change
        # the decoding or warn about unused sampling flags.
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
    )
    return output[:, width:].tolist()


def _generate_full_forward(
    model, rows: list[list[int]], max_new_tokens: int, eos_ids, pad_id, device
) -> list[list[int]]:
    """Greedy decoding by re-running the training-time forward on a right-padded batch.

    No KV cache and right padding: exactly the layout the model was trained on (virtual tokens,
    then the sample from position 0), so it is correct for prompt and prefix tuning, where
    `model.generate` is not (module docstring). Costs one full forward per new token.
    """
    lengths = [len(r) for r in rows]
    width = max(lengths) + max_new_tokens
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, device=device)
        attention_mask[i, : len(row)] = 1
    new_tokens: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        end = max(lengths)
        logits = model(input_ids=input_ids[:, :end], attention_mask=attention_mask[:, :end], use_cache=False).logits
        logits = logits[:, -end:]  # drop prompt tuning's virtual-token positions
        last = torch.tensor(lengths, device=logits.device) - 1
        next_tokens = logits[torch.arange(len(rows), device=logits.device), last].argmax(-1).tolist()
        for i, token in enumerate(next_tokens):
            if done[i]:
                continue
            new_tokens[i].append(token)
            input_ids[i, lengths[i]] = token
            attention_mask[i, lengths[i]] = 1
            lengths[i] += 1
            done[i] = token in eos_ids
        if all(done):
            break
    return new_tokens


class EvalInterrupted(Exception):
    """A stop signal arrived during an evaluation (evaluate_model's `should_stop`)."""


def _check_stop(should_stop: Optional[Callable[[], bool]]) -> None:
    if should_stop is not None and should_stop():
        raise EvalInterrupted


def _stoppable(batches: Iterable[dict], should_stop: Callable[[], bool]):
    for batch in batches:
        _check_stop(should_stop)
        yield batch


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
    autocast_ctx: Any = None,
    stop_ids: Sequence[int] = (),
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[str]:
    """Greedy answers to `prompts`, in order: the decoded new tokens up to the first stop token
    (`_eos_ids`), stripped.

    A prompt is token ids (a held-out row's `prompt_ids`: exactly its training prefix, bos
    included) or text, tokenised as bos id + the text with add_special_tokens=False. Rows are
    padded by hand, so the caller's tokenizer is never modified. They are batched by length to waste little on padding; greedy decoding makes
    the answers independent of the batching up to float rounding. `model` is the bare model or
    PeftModel (not a DDP wrapper, which has no `generate`).
    """
    if not prompts:
        return []
    eos_ids = _eos_ids(model, tokenizer, stop_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else [int(t) for t in p]
               for p in prompts]
    if any(not row for row in encoded):
        raise ValueError("cannot generate from an empty prompt with a tokenizer that has no bos token")
    decode_batch = _generate_full_forward if _is_prompt_learning(model) else _generate_cached
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # stable: deterministic
    answers: list[str] = [""] * len(encoded)
    with _eval_mode(model), _autocast(autocast_ctx):
        for start in range(0, len(order), batch_size):
            _check_stop(should_stop)
            indices = order[start : start + batch_size]
            outputs = decode_batch(model, [encoded[i] for i in indices], max_new_tokens, eos_ids, pad_id, device)
            for i, tokens in zip(indices, outputs):
                stop = next((k for k, t in enumerate(tokens) if t in eos_ids), len(tokens))
                answers[i] = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
    return answers


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    eval_batches: Optional[Iterable[dict]],
    eval_rows: Iterable[dict],
    cfg: EvalConfig,
    device: torch.device | str,
    autocast_ctx: Any = None,
    stop_ids: Sequence[int] = (),
    should_stop: Optional[Callable[[], bool]] = None,
) -> dict[str, Any]:
    """Held-out loss and generation metrics of one model, plus the scored samples.

    `should_stop` (the trainer's stop signal, a collective: every rank calls it at the same
    points) is asked before each batch; when it says stop, EvalInterrupted is raised.

    Keys: loss, perplexity, tokens (None when `eval_batches` is None); exact_match,
    exact_match_strict, f1, rouge_l, num_generated (metrics None when no rows are scored); per_task
    ({task: metrics + count}, when rows name a task); samples (list of {prompt, reference,
    prediction, task}). Generation scores the first `cfg.num_samples` rows, always the same ones.
    """
    result: dict[str, Any] = {"loss": None, "perplexity": None, "tokens": None}
    if eval_batches is not None:
        if should_stop is not None:
            eval_batches = _stoppable(eval_batches, should_stop)
        result.update(held_out_loss(model, eval_batches, device, autocast_ctx))

    rows = list(itertools.islice(eval_rows, cfg.num_samples))
    predictions = generate_answers(
        model, tokenizer, [r.get("prompt_ids") or r["prompt"] for r in rows], cfg.max_new_tokens, cfg.batch_size,
        device, autocast_ctx, stop_ids=stop_ids, should_stop=should_stop,
    )
    references = [r["reference"] for r in rows]
    result.update(generation_metrics(predictions, references) if rows else dict.fromkeys(GENERATION_METRICS))
    result["num_generated"] = len(rows)

    tasks = [r.get("task") for r in rows]
    if any(task is not None for task in tasks):
        per_task = {}
        for task in sorted({t for t in tasks if t is not None}):
            idx = [i for i, t in enumerate(tasks) if t == task]
            scores = generation_metrics([predictions[i] for i in idx], [references[i] for i in idx])
            per_task[task] = {"count": len(idx), **scores}
        result["per_task"] = per_task

    result["samples"] = [
        {"prompt": r["prompt"], "reference": r["reference"], "prediction": p, "task": r.get("task")}
        for r, p in zip(rows, predictions)
    ]
    return result


def metrics_only(result: dict[str, Any]) -> dict[str, Any]:
    """`result` without its samples: the part that goes into summary.json."""
    return {k: v for k, v in result.items() if k != "samples"}


# ---------------------------------------------------------------------------------------- report


def _number(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4e}" if abs(value) >= 1e6 else f"{value:.4f}"


def _change(before: Optional[float], after: Optional[float]) -> str:
    if before is None or after is None:
        return "n/a"
    return f"{after - before:+.4e}" if abs(after - before) >= 1e6 else f"{after - before:+.4f}"


def _cell(text: Optional[str]) -> str:
    """Text as one Markdown table cell: inline markup, pipes and newlines escaped."""
    if text is None:
        return "n/a"
    if not text.strip():
        return "*(empty)*"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([\\`*_\[\]|~])", r"\\\1", text)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _fenced(text: str) -> str:
    """A code block that no backtick run inside `text` can close early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


_METRIC_DEFINITIONS = (  # the report's own account of its numbers (module docstring: why these choices)
    "- loss: the token-weighted mean negative log-likelihood over every held-out target token "
    "(the tokens training learns from: the response, and the prompt too with `data.train_on_prompt`); "
    f"perplexity = exp(loss), with the loss capped at {MAX_LOSS_FOR_PERPLEXITY:g} so it stays finite.",
    "- answers: greedy decoding of at most `eval.max_new_tokens` new tokens, cut at the first stop "
    "(end-of-sequence) token and stripped; each generation metric is the mean over the prompts.",
    "- exact_match, f1: SQuAD v1.1. Answer and reference are normalised (lowercase, ASCII punctuation "
    "and the articles a/an/the dropped, whitespace collapsed), then compared whole (exact_match) or as "
    "bags of tokens (f1: harmonic mean of token precision and recall).",
    "- exact_match_strict: 1 when answer and reference are identical after stripping surrounding "
    "whitespace (case and punctuation count).",
    "- rouge_l: the rougeL F-measure of the rouge-score package (longest common subsequence, so word "
    "order counts), with its default tokenizer (lowercase; every character outside a-z and 0-9 "
    "separates tokens) and no stemming. An answer without Latin letters or digits (e.g. Cyrillic) "
    "has no tokens and scores 0.",
)


def write_report(
    path: str,
    before: Optional[dict[str, Any]],
    after: dict[str, Any],
    meta: dict[str, Any],
    num_samples: int = 8,
) -> None:
    """Write `eval_report.md`: meta, a base-vs-tuned metric table, per-task exact match, how each
    metric is computed, samples.

    `before` is the base model's `evaluate_model` result, or None (then only the tuned column).
    Samples are paired by prompt. Written to a temporary name and renamed, so a reader never sees
    half a report; the caller makes sure only rank 0 calls this.
    """
    columns = ["base", "tuned", "change"] if before is not None else ["tuned"]
    title = meta.get("experiment") or "distft"
    lines = [f"# Evaluation report: {title}", ""]
    for key in _META_KEYS:
        if meta.get(key) is not None:
            lines.append(f"- {key}: {meta[key]}")
    lines += [f"- {key}: {value}" for key, value in meta.items() if key not in _META_KEYS]

    lines += ["", "## Metrics", ""]
    if after.get("tokens"):
        lines.append(f"Loss and perplexity over {after['tokens']} held-out target tokens (lower is better).")
    if after.get("num_generated"):
        lines.append(
            f"Generation metrics over {after['num_generated']} held-out prompts, in [0, 1] (higher is better); "
            'see "How the metrics are computed" below.'
        )
    lines += ["", "| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for metric in REPORT_METRICS:
        cells = [_number(after.get(metric))]
        if before is not None:
            cells = [_number(before.get(metric)), cells[0], _change(before.get(metric), after.get(metric))]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")

    tasks = sorted(set(after.get("per_task") or {}) | set((before or {}).get("per_task") or {}))
    if tasks:
        lines += ["", "## Exact match per task", ""]
        lines += ["| task | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
        for task in tasks:
            tuned = (after.get("per_task") or {}).get(task, {})
            cells = [_number(tuned.get("exact_match"))]
            if before is not None:
                base = (before.get("per_task") or {}).get(task, {})
                cells = [
                    _number(base.get("exact_match")),
                    cells[0],
                    _change(base.get("exact_match"), tuned.get("exact_match")),
                ]
            count = tuned.get("count", ((before or {}).get("per_task") or {}).get(task, {}).get("count"))
            lines.append(f"| {_cell(task)} | {_number(count)} | " + " | ".join(cells) + " |")

    lines += ["", "## How the metrics are computed", "", *_METRIC_DEFINITIONS]

    samples = (after.get("samples") or [])[:num_samples]
    if samples:
        base_by_prompt = {s["prompt"]: s["prediction"] for s in (before or {}).get("samples") or []}
        lines += ["", "## Samples", ""]
        for number, sample in enumerate(samples, 1):
            task = f" ({sample['task']})" if sample.get("task") else ""
            lines += [f"### Sample {number}{task}", "", "Prompt:", "", _fenced(sample["prompt"]), ""]
            if before is not None:
                lines += ["| reference | base output | tuned output |", "|---|---|---|"]
                outputs = [sample["reference"], base_by_prompt.get(sample["prompt"]), sample["prediction"]]
            else:
                lines += ["| reference | tuned output |", "|---|---|"]
                outputs = [sample["reference"], sample["prediction"]]
            lines += ["| " + " | ".join(_cell(o) for o in outputs) + " |", ""]

    directory = os.path.dirname(os.path.abspath(path))
    with writing(path, "the evaluation report"):
        os.makedirs(directory, exist_ok=True)
    write_text(path, "\n".join(lines).rstrip() + "\n", what="the evaluation report")  # a full disk: one OutputError


# ------------------------------------------------------------------------------------------- CLI
# `python -m distft.evaluate CHECKPOINT`: the base-vs-tuned report for any checkpoint.
def default_report_path(checkpoint: str) -> str:
    """Where `python -m distft.evaluate` writes its report by default: never into the checkpoint.

    A checkpoint of a run (`<run_dir>/checkpoints/step_000300`): `<run_dir>/evals/step_000300/
    eval_report.md`, beside the run's own files. A checkpoint anywhere else (copied, downloaded,
    possibly on read-only storage): `evals/<its name>/eval_report.md` under the current directory."""
    checkpoint = os.path.abspath(checkpoint)
    parent, name = os.path.split(checkpoint)
    if os.path.basename(parent) == "checkpoints":
        root = os.path.dirname(parent)
    else:
        root = os.getcwd()
    return os.path.join(root, "evals", name, "eval_report.md")


def evaluate_checkpoint(checkpoint: str, out: str | None = None, num_samples: int | None = None,
                        compare_base: bool = True, trust_remote_code: bool = False) -> tuple[str, dict, dict | None]:
    """Rebuild the run's held-out split from the checkpoint's config, score base and tuned model
    on it, and write the report (default: `default_report_path`). Settings that run code come from
    `trust_remote_code`, never from the checkpoint (`distft.export.checkpoint_config`).

    Nothing is ever written into the checkpoint: a committed checkpoint is sealed by its manifest,
    and an `out` inside it is refused (CheckpointError) before anything is loaded."""
    import torch

    from distft.checkpoint import CheckpointError, read_meta, resolve_checkpoint
    from distft.data import eval_batches, prepare_data
    from distft.datacache import prepared
    from distft.engines import autocast_context, autocast_dtype
    from distft.export import load_base, load_model

    checkpoint = resolve_checkpoint(checkpoint, announce=True)
    out = os.path.abspath(os.path.expanduser(out)) if out else default_report_path(checkpoint)
    real = os.path.realpath(checkpoint)
    if os.path.commonpath([os.path.realpath(out), real]) == real:
        raise CheckpointError(f"--out {out} is inside the checkpoint {checkpoint}, which is never written to after "
                              "its commit (it would no longer match its manifest); choose a path outside it")
    cfg, tuned, tokenizer = load_model(checkpoint, trust_remote_code=trust_remote_code)
    if num_samples is not None:
        cfg.eval.num_samples = num_samples
    device = torch.device("cpu")
    if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda")
    data = prepared(cfg.data, tokenizer, cfg.data.seed, cfg.run.root, prepare_data).data
    batches = eval_batches(data.eval, cfg.eval.batch_size, cfg.data.max_seq_len, cfg.data.packing,
                           tokenizer.pad_token_id, cfg.data.pack_strategy)
    if cfg.train.eval_max_batches:
        batches = batches[: cfg.train.eval_max_batches]
    amp = autocast_dtype(cfg.train.precision, device)

    def autocast():
        return autocast_context(amp, device)

    def score(model):
        if not getattr(model, "is_loaded_in_4bit", False):
            model = model.to(device)
        return evaluate_model(model, tokenizer, batches, data.eval_rows, cfg.eval, device, autocast_ctx=autocast,
                              stop_ids=data.stop_ids)

    after = score(tuned)
    before = score(load_base(cfg, tokenizer=tokenizer)) if compare_base else None
    meta = {"experiment": cfg.run.experiment, "technique": cfg.technique.name, "model": model_label(cfg.model),
            "checkpoint": checkpoint, "steps": read_meta(checkpoint)["step"]}
    write_report(out, before, after, meta, num_samples=cfg.eval.report_samples)
    return out, after, before


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from distft.checkpoint import CheckpointError
    from distft.data import DataError
    from distft.model import ModelLoadError

    parser = argparse.ArgumentParser(prog="python -m distft.evaluate",
                                     description="Score a checkpoint against its base and write eval_report.md")
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (uses its latest checkpoint)")
    parser.add_argument("--out", help="report path, outside the checkpoint (default: <run_dir>/evals/<checkpoint>/"
                                      "eval_report.md; for a checkpoint outside a run: ./evals/<checkpoint>/...)")
    parser.add_argument("--num-samples", type=int, help="held-out prompts to generate for (default: the run's)")
    parser.add_argument("--no-base", action="store_true", help="score the tuned model only")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the base model run its own Python code (never taken from the checkpoint)")
    args = parser.parse_args(argv)
    try:
        out, after, _ = evaluate_checkpoint(args.checkpoint, args.out, args.num_samples, not args.no_base,
                                            trust_remote_code=args.trust_remote_code)
    except (CheckpointError, DataError, ModelLoadError) as err:
        print(f"distft: {err}", file=sys.stderr)
        return 2
    print(f"report: {out}")
    print(" ".join(f"{k}={after[k]:.4f}" for k in ("loss", "perplexity", "exact_match", "f1", "rouge_l")))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
