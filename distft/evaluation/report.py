"""The evaluation report and the predictions file: what a person reads after an evaluation.

- `write_report`: `eval_report.md` of a run or `python -m distft.evaluate` (base vs tuned), and
  `write_comparison`: the same shape for any number of models (`python -m distft.compare`). Both
  render one table of metrics, exact match per task, how each number is computed, and the first
  samples side by side, answers cut at `eval.max_new_tokens` marked.
- `write_predictions`: every scored prompt with each model's answer, scores and truncated flag as
  JSON Lines beside the report (`predictions_path`); the review page reads it.
- `overfitting`: the report's warning when the eval loss rose while the train loss fell.

Files are written to a temporary name and renamed (distft.files), so a reader never sees half
of one; callers make sure only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

from distft.evaluation.forgetting import forgetting_line
from distft.files import write_text
from distft.model.build import MAX_LOSS_FOR_PERPLEXITY

REPORT_METRICS = ("loss", "perplexity", "exact_match", "exact_match_strict", "f1", "rouge_l")

GENERAL_METRICS = ("general_loss", "general_perplexity")  # the forgetting check's rows, when it ran
# objective=dpo's held-out pairs (distft/objective.py preference_eval), when they were scored
PREFERENCE_METRICS = ("preference_accuracy", "preference_margin", "reward_accuracy", "reward_margin")
_META_KEYS = ("experiment", "technique", "model", "checkpoint", "steps")  # first in the report, in this order


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


_GENERAL_DEFINITION = (
    "- general_loss, general_perplexity: the same loss over every token of the general-text corpus "
    "eval.general_path (documents cut into windows of data.max_seq_len): how much general language "
    "modelling the tuning kept (the forgetting check, distft.evaluation.forgetting).")


_PREFERENCE_DEFINITION = (
    "- preference_accuracy, preference_margin: over the held-out preference pairs, the share whose chosen "
    "answer the model finds likelier than the rejected one (summed log-probabilities of the answer tokens), and "
    "the mean difference. reward_accuracy, reward_margin: the same for DPO's implicit reward, objective.beta "
    "times the log-probability ratio against the reference (the model training started from, which scores 0 "
    "on both). Loss and the generation metrics take the chosen answer as the reference.")


def overfitting(records: Sequence[dict[str, Any]], evals: int) -> Optional[str]:
    """A sentence when the periodic eval loss rose `evals` times in a row while the train loss
    fell over the same steps (the first such stretch), else None.

    `records`: a run's metrics (tracking.read_metrics): eval_loss at its periodic evals (step 0,
    the base model, left out), loss at logged steps. The train loss of each stretch between two
    evals is the mean of the losses logged in it; "fell" compares the first stretch of the
    rising run with its last."""
    if evals <= 0:
        return None
    points = [(r["step"], r["eval_loss"]) for r in records
              if r.get("step", 0) > 0 and isinstance(r.get("eval_loss"), (int, float))]
    points = list({step: loss for step, loss in points}.items())  # one per step: the last logged
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]

    def mean_train(after: int, upto: int) -> Optional[float]:
        losses = [loss for step, loss in train if after < step <= upto]
        return sum(losses) / len(losses) if losses else None

    for start in range(1, len(points) - evals + 1):
        window = points[start - 1 : start + evals]  # evals + 1 points: `evals` rises
        if not all(b[1] > a[1] for a, b in zip(window, window[1:])):
            continue
        first = mean_train(points[start - 2][0] if start >= 2 else 0, window[0][0])
        last = mean_train(window[-2][0], window[-1][0])
        if first is None or last is None or last >= first:
            continue
        return (f"**Overfitting**: from step {window[0][0]} to step {window[-1][0]} the eval loss rose {evals} evals "
                f"in a row ({window[0][1]:.4f} -> {window[-1][1]:.4f}) while the train loss fell ({first:.4f} -> "
                f"{last:.4f}): the model is memorising its training rows. Use the best checkpoint "
                "(checkpoint.keep_best=true, or early stopping), fewer steps, a lower learning rate or more data.")
    return None


def predictions_path(report_path: str) -> str:
    """The predictions file of a report: `eval_report.md` -> `eval_report.predictions.jsonl`, beside it."""
    return os.path.splitext(report_path)[0] + ".predictions.jsonl"


def prediction_records(results: dict[str, Optional[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per scored prompt: {index, task, prompt, reference, outputs: {label: {text,
    truncated, exact_match, exact_match_strict, f1, rouge_l}}}, for `results` = {label:
    evaluate_model result} scored on the same rows (base and tuned; or the models of a
    comparison). None results are left out; rows are paired by position and must agree."""
    present = {label: r for label, r in results.items() if r is not None}
    first = next(iter(present.values()), None)
    if first is None:
        return []
    records = []
    for index, sample in enumerate(first.get("samples") or []):
        outputs = {}
        for label, result in present.items():
            other = (result.get("samples") or [])[index] if index < len(result.get("samples") or []) else None
            if other is None or other["prompt"] != sample["prompt"]:
                raise ValueError(f"the results of {label!r} were not scored on the same prompts")
            outputs[label] = {"text": other["prediction"], "truncated": other.get("truncated", False),
                              **(other.get("scores") or {})}
        records.append({"index": index, "task": sample.get("task"), "prompt": sample["prompt"],
                        "reference": sample["reference"], "outputs": outputs})
    return records


def write_predictions(path: str, results: dict[str, Optional[dict[str, Any]]], root: Optional[str] = None) -> str:
    """Every scored prompt with each model's answer and scores (`prediction_records`) as JSON
    Lines at `path`, written to a temporary name and renamed, nothing followed below `root` (a
    run directory: distft.files). Returns the path."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prediction_records(results))
    write_text(path, lines, "the predictions file", root)
    return path


def _truncation_line(results: dict[str, Optional[dict[str, Any]]]) -> Optional[str]:
    """A sentence on answers cut at eval.max_new_tokens, or None when none was."""
    cut = {label: r for label, r in results.items() if r and r.get("num_truncated")}
    if not cut:
        return None
    limits = sorted({r.get("max_new_tokens") for r in cut.values()}, key=str)
    counts = ", ".join(f"{label} {r['num_truncated']} of {r['num_generated']}" for label, r in cut.items())
    return (f"**Cut short**: answers that reached eval.max_new_tokens={'/'.join(map(str, limits))} without a stop "
            f"token ({counts}) are scored as cut, marked below; raise eval.max_new_tokens when the references are "
            "longer.")


def _write(path: str, lines: list[str], what: str, root: Optional[str]) -> None:
    write_text(path, "\n".join(lines).rstrip() + "\n", what, root)  # a full disk, a planted link: one OutputError


def _body(results: dict[str, dict[str, Any]], change: Optional[tuple[str, str]], num_samples: int,
          predictions: Optional[str], what: str) -> list[str]:
    """Metrics, exact match per task, definitions and samples of `results` ({label: evaluate_model
    result}, all scored on the same rows), one column per label; `change`: (from, to) labels whose
    difference gets a column of its own."""
    labels = list(results)
    columns = labels + (["change"] if change else [])
    first = next(iter(results.values()))
    lines = ["", "## Metrics", ""]
    if first.get("tokens"):
        lines.append(f"Loss and perplexity over {first['tokens']} {what} target tokens (lower is better).")
    if first.get("num_generated"):
        lines.append(f"Generation metrics over {first['num_generated']} {what} prompts, in [0, 1] (higher is better); "
                     'see "How the metrics are computed" below.')
    truncation = _truncation_line(results)
    if truncation:
        lines += ["", truncation]
    if change:
        warn = results[change[1]].get("general_warn")
        forgetting = forgetting_line(results[change[0]], results[change[1]], warn if warn is not None else 0.1)
        if forgetting:
            lines += ["", forgetting]

    def cells(values: list[Optional[float]]) -> list[str]:
        out = [_number(v) for v in values]
        if change:
            out.append(_change(values[labels.index(change[0])], values[labels.index(change[1])]))
        return out

    lines += ["", "| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    general = any(r.get("general_perplexity") is not None for r in results.values())
    preference = any(r.get("preference_accuracy") is not None for r in results.values())
    for metric in REPORT_METRICS + (GENERAL_METRICS if general else ()) + (PREFERENCE_METRICS if preference else ()):
        lines.append(f"| {metric} | " + " | ".join(cells([r.get(metric) for r in results.values()])) + " |")

    tasks = sorted(set().union(*[set(r.get("per_task") or {}) for r in results.values()]))
    if tasks:
        lines += ["", "## Exact match per task", ""]
        lines += ["| task | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
        for task in tasks:
            per = [(r.get("per_task") or {}).get(task, {}) for r in results.values()]
            count = next((p["count"] for p in reversed(per) if "count" in p), None)
            lines.append(f"| {_cell(task)} | {_number(count)} | "
                         + " | ".join(cells([p.get("exact_match") for p in per])) + " |")

    harness = [r.get("lm_eval") or {} for r in results.values()]
    if any(harness):
        lines += ["", "## lm-evaluation-harness", "", "| task | metric | " + " | ".join(columns) + " |",
                  "|---|---|" + "---:|" * len(columns)]
        for task in sorted(set().union(*harness)):
            for metric in sorted(set().union(*[set(h.get(task) or {}) for h in harness])):
                values = [(h.get(task) or {}).get(metric) for h in harness]
                lines.append(f"| {_cell(task)} | {_cell(metric)} | " + " | ".join(cells(values)) + " |")

    lines += ["", "## How the metrics are computed", "", *_METRIC_DEFINITIONS]
    if general:
        lines.append(_GENERAL_DEFINITION)
    if preference:
        lines.append(_PREFERENCE_DEFINITION)

    records = prediction_records(results)
    if records:
        kept = f"; all {len(records)} in `{os.path.basename(predictions)}`" if predictions else ""
        lines += ["", "## Samples", "", f"The first {min(num_samples, len(records))} of {len(records)} scored "
                  f"prompts{kept}.", ""]
        for number, record in enumerate(records[:num_samples], 1):
            task = f" ({record['task']})" if record.get("task") else ""
            lines += [f"### Sample {number}{task}", "", "Prompt:", "", _fenced(record["prompt"]), ""]
            lines += ["| reference | " + " | ".join(f"{label} output" for label in labels) + " |",
                      "|---|" + "---|" * len(labels)]
            row = [_cell(record["reference"])]
            for label in labels:
                output = record["outputs"][label]
                row.append(_cell(output["text"]) + (f" *(cut at {results[label].get('max_new_tokens')} tokens)*"
                                                    if output["truncated"] else ""))
            lines += ["| " + " | ".join(row) + " |", ""]
    return lines


def _head(title: str, meta: dict[str, Any], notes: Sequence[str], notes_title: str, intro: str = "") -> list[str]:
    lines = [f"# {title}", ""] + ([intro, ""] if intro else [])
    for key in _META_KEYS:
        if meta.get(key) is not None:
            lines.append(f"- {key}: {meta[key]}")
    lines += [f"- {key}: {value}" for key, value in meta.items() if key not in _META_KEYS]
    if notes:
        lines += ["", f"## {notes_title}", ""]
        for note in notes:
            lines += [note, ""]
        lines.pop()
    return lines


def write_report(
    path: str,
    before: Optional[dict[str, Any]],
    after: dict[str, Any],
    meta: dict[str, Any],
    num_samples: int = 8,
    predictions: Optional[str] = None,
    notes: Sequence[str] = (),
    intro: str = "",
    root: Optional[str] = None,
) -> None:
    """Write `eval_report.md`: meta, a base-vs-tuned metric table, per-task exact match, how each
    metric is computed, the first `num_samples` samples (answers cut at max_new_tokens marked).

    `before` is the base model's `evaluate_model` result, or None (then only the tuned column).
    Samples are paired by position (both scored the same rows). `predictions`: the predictions
    file written beside it (`write_predictions`), which the report names. `notes`: paragraphs on
    the training (the best checkpoint, overfitting) under "## Training"; `intro`: the opening
    paragraph, before everything else (what the default job shows: synthetic.what_it_shows).
    `root`: the directory the report belongs to (a run directory), below which nothing is followed.
    """
    results = {"base": before, "tuned": after} if before is not None else {"tuned": after}
    lines = _head(f"Evaluation report: {meta.get('experiment') or 'distft'}", meta, notes, "Training", intro)
    lines += _body(results, ("base", "tuned") if before is not None else None, num_samples, predictions, "held-out")
    _write(path, lines, "the evaluation report", root)


def write_comparison(path: str, results: dict[str, dict[str, Any]], meta: dict[str, Any], num_samples: int = 8,
                     predictions: Optional[str] = None, notes: Sequence[str] = (), what: str = "held-out",
                     root: Optional[str] = None) -> None:
    """Write a comparison report of several models scored on the same prompts: one column per
    model (`results`: {label: evaluate_model result}, in order); with exactly two, a change column
    (second minus first)."""
    change = tuple(results) if len(results) == 2 else None
    lines = _head(f"Comparison: {', '.join(results)}", meta, notes, "Models")
    lines += _body(results, change, num_samples, predictions, what)
    _write(path, lines, "the comparison report", root)
