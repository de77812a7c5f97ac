"""The forgetting check: does fine-tuning cost the model its general capabilities?

Two instruments, both off until asked for:
- `eval.general_path`: a corpus of general text (plain text, documents separated by a blank line;
  or JSON Lines with a `text` field), scored as perplexity by the base and by the tuned model
  (every token a target, documents cut into windows of `data.max_seq_len`, at most
  `eval.general_max_tokens` tokens). The report shows the change, and warns when the tuned
  model's perplexity is more than `eval.general_warn` (relative, 0.1 = 10%) above the base's: the
  run traded general language modelling for its task.
- `eval.lm_eval_tasks`: lm-evaluation-harness tasks (its Python API, `lm_eval.simple_evaluate`)
  run on the tuned model and its base after training or by `python -m distft.evaluate`; a task
  directory of one's own goes in `eval.lm_eval_include_path`. Needs `pip install 'distft[lm-eval]'`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from distft.data.templates import bos_ids
from distft.errors import DataError
from distft.files import open_regular

LM_EVAL_HINT = "pip install 'distft[lm-eval]' (or lm-eval)"


BUILTIN_GENERAL = "builtin:general"  # eval.general_path's name for the sample distft ships


def corpus_file(path: str) -> str:
    """The file eval.general_path names: `builtin:general` is the general-text sample shipped in
    the package (distft/evaluation/corpora/general.txt: 40 paragraphs of encyclopedic prose, ~4,500 words,
    written for distft); anything else is a path."""
    if path == BUILTIN_GENERAL:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpora", "general.txt")
    return os.path.expanduser(path)


def read_corpus(path: str) -> list[str]:
    """The documents of a general-text corpus; DataError naming the problem for a missing, empty or
    unreadable file."""
    path = corpus_file(path)
    if not os.path.isfile(path):
        raise DataError(f"eval.general_path={path} does not exist; point it at a text or JSON Lines file of general "
                        "text, or set eval.general_path=null")
    try:
        with open_regular(path, "rb", follow_links=True) as f:  # never a FIFO's endless wait (distft.files)
            text = f.read().decode("utf-8", errors="replace")
    except OSError as err:
        raise DataError(f"eval.general_path={path} cannot be read ({err}); point it at a regular text or JSON Lines "
                        "file") from None
    if path.endswith((".jsonl", ".json")):
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                raise DataError(f"eval.general_path={path}: line {number} is not JSON; give one "
                                '{"text": ...} object per line, or a plain .txt file') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'eval.general_path={path}: line {number} has no "text" string field')
            docs.append(record["text"])
    else:
        docs = [d.strip() for d in text.split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"eval.general_path={path} holds no text")
    return docs


def general_batches(path: str, tokenizer, max_seq_len: int, batch_size: int, max_tokens: int) -> list[dict]:
    """Padded batches of the corpus for `evaluate.held_out_loss`: each document as the tokenizer encodes it (its bos where it adds one) + its tokens
    + eos, cut into windows of at most max_seq_len tokens, every real token a target, until
    `max_tokens` tokens. The same for every model with this tokenizer."""
    import torch

    from distft.model.build import IGNORE_INDEX  # lazy: torch (validation imports this module, torch-free)

    bos = bos_ids(tokenizer)  # what the tokenizer's own call puts in front: [] for ChatML models
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    windows: list[list[int]] = []
    budget = max_tokens
    for doc in read_corpus(path):
        ids = bos + tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
        for start in range(0, len(ids), max_seq_len):
            window = ids[start : start + max_seq_len][:budget]
            if len(window) > 1:
                windows.append(window)
                budget -= len(window)
            if budget <= 1:
                break
        if budget <= 1:
            break
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    batches = []
    for i in range(0, len(windows), batch_size):
        rows = windows[i : i + batch_size]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            input_ids[j, : len(row)] = labels[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def forgetting_line(base: Optional[dict], tuned: Optional[dict], warn: float) -> Optional[str]:
    """The report's sentence on general-text perplexity, base against tuned; None without both."""
    if not base or not tuned or base.get("general_perplexity") is None or tuned.get("general_perplexity") is None:
        return None
    before, after = base["general_perplexity"], tuned["general_perplexity"]
    change = after / before - 1 if before > 0 else math.inf
    numbers = (f"perplexity on general text (eval.general_path, {tuned.get('general_tokens')} tokens) "
               f"{before:.4f} -> {after:.4f} ({change:+.1%})")
    if change > warn:
        return (f"**Forgetting**: {numbers}, more than eval.general_warn={warn:.0%} above the base: fine-tuning cost "
                "general language modelling. A lower learning rate, fewer steps, LoRA instead of full fine-tuning or "
                "mixing general data into training (data.sources) keep more of it.")
    if change <= 0:
        return f"General capabilities kept: {numbers}, no higher than the base's."
    return f"General capabilities kept: {numbers}, within eval.general_warn={warn:.0%} of the base's."


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: Optional[str], limit: Optional[int],
                batch_size: int, device) -> dict[str, Any]:
    """{task: {metric: value}} of lm-evaluation-harness on `model` (a loaded model, wrapped in its
    HFLM), numeric metrics only. DataError for an unknown task or a missing package."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DataError(f"eval.lm_eval_tasks needs lm-evaluation-harness: {LM_EVAL_HINT}") from None
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in eval.lm_eval_include_path={include_path})" if include_path else ""
        raise DataError(f"eval.lm_eval_tasks: lm-evaluation-harness has no task {', '.join(unknown)}{where}")
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    results = simple_evaluate(model=wrapped, tasks=list(tasks), task_manager=manager, limit=limit,
                              log_samples=False, bootstrap_iters=0)
    # Its keys are "<metric>,<filter>" ("acc,none"), beside bookkeeping ("alias", "sample_len").
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if "," in k and isinstance(v, (int, float)) and "_stderr" not in k}
            for task, metrics in results["results"].items()}
