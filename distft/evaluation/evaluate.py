"""Evaluation: held-out loss and perplexity, generation metrics, and the base-vs-tuned command.

What it owns, in the order a run uses it:
- metrics on strings (`exact_match`, `token_f1`, `rouge_l`, `generation_metrics`): pure Python;
- `held_out_loss`: the token-weighted loss over eval batches, computed as the trainer computes the
  loss it minimises (distft.model.loss: the head and the cross-entropy in chunks, never the full
  logits), so the eval loss and the train loss are the same quantity at the same memory;
- `generate_outputs` / `generate_answers`: greedy, deterministic answers to held-out prompts,
  each flagged when it was cut at max_new_tokens; optionally sampled (`Sampling`) and heard token
  by token (`on_token`), for the chat (distft/evaluation/chat.py), which shares this decoding;
- `evaluate_model`: both of the above for one model, in one dict, every answer with its scores;
- `AnswerLog`: the final evaluation's answers, kept in the run directory as they come, so that an
  evaluation a stop signal cut resumes with them (only the rest are generated);
- `metrics_only`: the numbers for summary.json; `evaluate_checkpoint`: a checkpoint scored against
  its base (the `distft evaluate` command, distft/commands/evaluate.py). The report and the
  predictions file are distft.evaluation.report's.

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
- Prompt-learning PEFT models (prompt/prefix tuning) are not decoded by `model.generate`: peft
  0.21's generation hooks look up `past_key_values`, which transformers 5 renamed to `cache`, so
  they re-inject the virtual tokens at every step (prompt tuning) or drop the prefix (prefix
  tuning), and the answers come out wrong. `_generate_virtual_cached` decodes them greedily with
  a KV cache of its own, calling the base model directly (the virtual tokens' keys and values
  first, then the prompt, then one token a step): the tokens of the training-time forward re-run
  for every token (`_generate_full_forward`, kept as the reference it is tested against), at
  `model.generate`'s speed per token (bench/generation.py). Other models, and a prompt-learning
  model inside `disable_adapter()` (its base), use `model.generate` with its KV cache.

Nothing here imports torch.distributed: `held_out_loss` takes an optional `reduce_sum` (for
example the engine's all-reduce) to sum its counts over ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import torch

from distft import faults
from distft.checkpoint.export import load_base, load_model
from distft.checkpoint.store import MANIFEST, read_meta
from distft.checkpoint.verify import resolve_checkpoint
from distft.config import EvalConfig, model_label
from distft.data.cache import prepared_for_run
from distft.data.pipeline import eval_batches
from distft.data.templates import bos_ids
from distft.dist import share_cpu_threads
from distft.engines import autocast_context, autocast_dtype
from distft.engines.compile import eager
from distft.errors import CheckpointError
from distft.evaluation.forgetting import general_batches, run_lm_eval
from distft.evaluation.report import predictions_path, write_predictions, write_report
from distft.files import NotAFile, append_line, describe, open_regular, write_text
from distft.model.build import MAX_LOSS_FOR_PERPLEXITY, model_inputs
from distft.model.loss import computing_loss
from distft.tracking import GenerationProgress

GENERATION_METRICS = ("exact_match", "exact_match_strict", "f1", "rouge_l")

log = logging.getLogger("distft")

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


_SCORERS = {"exact_match": exact_match, "exact_match_strict": exact_match_strict, "f1": token_f1, "rouge_l": rouge_l}


def sample_scores(prediction: str, reference: str) -> dict[str, float]:
    """exact_match, exact_match_strict, f1 and rouge_l of one answer."""
    return {name: fn(prediction, reference) for name, fn in _SCORERS.items()}


def mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each generation metric over per-sample `sample_scores`."""
    if not scores:
        raise ValueError("no predictions to score (an empty eval set has no generation metrics)")
    return {name: sum(s[name] for s in scores) / len(scores) for name in GENERATION_METRICS}


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact_match, exact_match_strict, f1 and rouge_l (each in [0, 1]) over the pairs."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return mean_scores([sample_scores(p, r) for p, r in zip(predictions, references)])


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
            with computing_loss(model, labels) as armed:  # as the trainer's loss: no full logits
                batch_sum, batch_tokens = armed.result(model(**inputs, use_cache=False).logits)
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


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampled decoding instead of greedy (the chat's --temperature and --top-p; the evaluation
    never samples, so its answers stay deterministic): each token is drawn from the softmax of the
    logits divided by `temperature`, kept to the likeliest tokens whose probabilities reach
    `top_p`. Every decoder draws as `model.generate(do_sample=True)` does (`_next_tokens`), from
    torch's global generator: seed it to repeat the draws."""

    temperature: float
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, not {self.temperature}, {self.top_p}")


def _next_tokens(logits: torch.Tensor, sampling: Optional[Sampling]) -> torch.Tensor:
    """Each row's next token from its last position's logits (batch, vocab): the likeliest, or
    with `sampling` one draw as transformers' sampling makes it (float32 scores, its temperature
    then top-p warpers, softmax, one `torch.multinomial`), so the prompt-learning decoders sample
    as `model.generate` does for the other models (tests/unit/test_chat.py compares them)."""
    if sampling is None:
        return logits.argmax(-1)
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits.float())
    if sampling.top_p < 1:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


class _DecodeSteps:
    """A transformers streamer that hears each decoding step's tokens (`generate` first puts the
    prompt, which is skipped): counted into a tracking.GenerationProgress, and handed to
    `on_step` (one token per row) where there is one."""

    def __init__(self, progress, on_step: Optional[Callable[[list[int]], None]] = None):
        self.progress, self.on_step, self.prompt_seen = progress, on_step, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            if self.progress is not None:
                self.progress.decoded(value.numel())
            if self.on_step is not None:
                self.on_step(value.reshape(-1).tolist())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _generate_cached(model, rows: list[list[int]], max_new_tokens: int, eos_ids, pad_id, device,
                     progress=None, sampling: Optional[Sampling] = None, on_step=None) -> list[list[int]]:
    """`model.generate` on a left-padded batch (left, so every row continues at the same index);
    greedy, or sampled (`Sampling`); `on_step` hears each step's tokens, one per row."""
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
        do_sample=sampling is not None,
        num_beams=1,
        # Explicit so a hub generation_config (sampling defaults, other pad/eos) cannot change
        # the decoding or warn about unused sampling flags (top_k=None: no top-k cut when sampling,
        # as in the other decoders).
        temperature=sampling.temperature if sampling else None,
        top_p=sampling.top_p if sampling else None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        streamer=_DecodeSteps(progress, on_step) if progress is not None or on_step is not None else None,
    )
    return output[:, width:].tolist()


def _generate_full_forward(
    model, rows: list[list[int]], max_new_tokens: int, eos_ids, pad_id, device, progress=None,
    sampling: Optional[Sampling] = None, on_step=None,
) -> list[list[int]]:
    """Greedy (or `sampling`) decoding by re-running the training-time forward on a right-padded
    batch; `on_step` hears each step's tokens, one per row.

    No KV cache and right padding: exactly the layout the model was trained on (virtual tokens,
    then the sample from position 0), so it is correct for prompt and prefix tuning, where
    `model.generate` is not (module docstring). Costs one full forward per new token, so
    generation uses `_generate_virtual_cached`; this is the reference it is tested against
    (tests/unit/test_generation_cache.py) and the bench's old decoder.
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
        next_tokens = _next_tokens(logits[torch.arange(len(rows), device=logits.device), last], sampling).tolist()
        if progress is not None:
            progress.decoded(len(rows))
        if on_step is not None:
            on_step(next_tokens)
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


def _generate_virtual_cached(
    model, rows: list[list[int]], max_new_tokens: int, eos_ids, pad_id, device, progress=None,
    sampling: Optional[Sampling] = None, on_step=None,
) -> list[list[int]]:
    """Greedy (or `sampling`) decoding of a prompt- or prefix-tuned PeftModel with a KV cache: the
    tokens of `_generate_full_forward` (its layout, the reference: tests/unit/test_generation_cache.py),
    at one token's forward per step instead of the whole sequence's; `on_step` hears each step's
    tokens, one per row.

    The base model is called directly, so PEFT's generation hooks (module docstring) never run.
    The virtual tokens' keys and values go into the cache first: prefix tuning's are PEFT's own
    `get_prompt` (the prefix encoder's output, through its projection MLP where there is one, as
    a DynamicCache: exactly what the training forward hands the base); prompt tuning's come from
    one forward of its P virtual-token embeddings at positions 0..P-1, for one row, repeated over
    the batch (they come first and attend only to each other, so they are the same in every row,
    and the prompt's forward then costs what the base's does). Rows are left-padded, so that every
    row continues at the same cache index; explicit position_ids give each real token the
    position the training forward gives it (P + its index in the sample), and the attention mask
    hides the pads between the virtual tokens and a shorter prompt. Same inputs, same positions,
    same visible keys: the logits differ from the full forward's by float rounding only (another
    order of summation), as batching already does. In fp32 that left every token the same (all
    three variants, SmolLM2 and the tiny model); under bf16 autocast a choice between two tokens
    a rounding step apart can go either way, in either decoder. So no variant keeps the full forward.
    """
    from peft import PeftType
    from transformers import DynamicCache

    if max_new_tokens <= 0:
        return [[] for _ in rows]
    peft_config = model.active_peft_config
    virtual = peft_config.num_virtual_tokens
    base = model.get_base_model()
    batch, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    sample_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        sample_mask[i, width - len(row) :] = 1
    input_ids, sample_mask = input_ids.to(device), sample_mask.to(device)
    # A real token's position: virtual + its index in its sample; a pad's is never attended to.
    positions = (virtual + sample_mask.cumsum(-1) - 1).clamp(min=virtual)
    attention_mask = torch.cat([torch.ones((batch, virtual), dtype=torch.long, device=device), sample_mask], dim=1)
    if peft_config.peft_type == PeftType.PREFIX_TUNING:
        cache = model.get_prompt(batch)  # a DynamicCache holding the prefix, `virtual` positions per layer
    else:
        prompts = model.get_prompt(batch_size=1).to(model.word_embeddings.weight.dtype)  # as PEFT's forward casts
        cache = DynamicCache(config=base.config)
        base(inputs_embeds=prompts, position_ids=torch.arange(virtual, device=device)[None], cache=cache,
             use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(batch)
    logits = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                  use_cache=True, logits_to_keep=1).logits
    next_position = positions[:, -1:] + 1  # every row's last column is a real token (left padding)
    new_tokens: list[list[int]] = [[] for _ in rows]
    done = [False] * batch
    for step in range(max_new_tokens):
        next_tokens = _next_tokens(logits[:, -1], sampling)
        if progress is not None:
            progress.decoded(batch)
        if on_step is not None:
            on_step(next_tokens.tolist())
        for i, token in enumerate(next_tokens.tolist()):
            if not done[i]:
                new_tokens[i].append(token)
                done[i] = token in eos_ids
        if all(done) or step == max_new_tokens - 1:
            break
        # A finished row goes on with its own tokens, which nothing reads: rows never see each other.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((batch, 1))], dim=1)
        logits = base(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=next_position,
                      cache=cache, use_cache=True).logits
        next_position = next_position + 1
    return new_tokens


def _decoder(model: torch.nn.Module) -> tuple[Callable, torch.nn.Module]:
    """The function that decodes a batch for `model`, and the module it runs on.

    A prompt-learning PeftModel inside PEFT's `disable_adapter()` (the base's scores during
    training, techniques.base_model_context) is its base: that base's own `generate` then.
    Under FSDP2 both would call the base past the sharded root, whose embeddings and head stay
    shards (`_fsdp_sharded`): prompt-learning models there decode with the full forward, which
    calls the root (tests/distributed/test_fsdp.py's prefix/prompt cells)."""
    if not _is_prompt_learning(model):
        return _generate_cached, model
    if _fsdp_sharded(model):  # the base called directly would skip FSDP2's unsharding of the root
        return _generate_full_forward, model
    if getattr(model, "_adapters_disabled", False):
        return _generate_cached, model.get_base_model()
    return _generate_virtual_cached, model


def _fsdp_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards `model` (its parameters are DTensors). Its root module gathers the
    root's own parameters (embeddings, head) only around a call of the root itself, so a decoder
    that calls the base model directly (`_generate_virtual_cached`) would read shards: there,
    prompt-learning models keep the full-forward decoder, which calls the root."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in model.parameters())


class EvalInterrupted(Exception):
    """A stop signal arrived during an evaluation (evaluate_model's `should_stop`), with how far it
    got: `answered` of `total` answers exist (kept from an interrupted evaluation, `AnswerLog`, or
    generated now), `answered_now` of them generated by this process before the stop. The trainer
    reads `answered_now == 0` as "the final evaluation made no progress in this segment"."""

    def __init__(self, answered_now: int = 0, answered: int = 0, total: int = 0):
        super().__init__(f"evaluation stopped with {answered} of {total} answers ({answered_now} generated by this "
                         "process)")
        self.answered_now, self.answered, self.total = answered_now, answered, total


def _check_stop(should_stop: Optional[Callable[[], bool]], answered_now: int = 0, answered: int = 0,
                total: int = 0) -> None:
    if should_stop is not None and should_stop():
        raise EvalInterrupted(answered_now, answered, total)


def _stoppable(batches: Iterable[dict], should_stop: Callable[[], bool]):
    for batch in batches:
        _check_stop(should_stop)
        yield batch


def generate_answers(*args: Any, **kwargs: Any) -> list[str]:
    """Greedy answers to `prompts`, in order: `generate_outputs` (same arguments) without the
    truncation flags."""
    return [text for text, _ in generate_outputs(*args, **kwargs)]


def generate_outputs(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    device: torch.device | str,
    autocast_ctx: Any = None,
    stop_ids: Sequence[int] = (),
    should_stop: Optional[Callable[[], bool]] = None,
    progress: Any = None,
    kept: Optional[Mapping[int, tuple[str, bool]]] = None,
    on_answers: Optional[Callable[[dict[int, tuple[str, bool]]], None]] = None,
    sampling: Optional[Sampling] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
) -> list[tuple[str, bool]]:
    """(answer, truncated) for each of `prompts`, in order. The answer is the decoded new tokens
    up to the first stop token (`_eos_ids`), stripped; truncated: no stop token came within
    `max_new_tokens`, so the answer was cut there (and may be missing its end).

    A prompt is token ids (a held-out row's `prompt_ids`: exactly its training prefix, bos
    included) or text, tokenised as the tokenizer tokenises it (`templates.bos_ids`: its bos where it adds one). Rows are
    padded by hand, so the caller's tokenizer is never modified. They are batched by length to waste little on padding; greedy decoding makes
    the answers independent of the batching up to float rounding. `model` is the bare model or
    PeftModel (not a DDP wrapper, which has no `generate`).

    `progress` (a tracking.GenerationProgress; None: an unlabelled one that logs, never draws a
    bar) hears of every decoding step and answered batch, and logs where a slow generation is.

    `kept` (answers by prompt index, from an interrupted evaluation: `AnswerLog`) skips every batch
    whose prompts all have one, and only those: the batches left are the very batches an
    uninterrupted run decodes, so their answers are too. `on_answers` hears of each batch's new
    answers as soon as it is decoded (to keep them); with it, the `signal_after_answers` fault is
    checked once the kept answers are in and after each batch.

    `sampling` (the chat's; None: greedy, as the evaluation always is) draws each token instead
    (`Sampling`). `on_token(prompt index, token id)` hears each token of an answer as it is
    decoded, up to its first stop token (not included): the chat streams an answer with it.
    """
    if not prompts:
        return []
    eos_ids = _eos_ids(model, tokenizer, stop_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    bos = bos_ids(tokenizer)
    encoded = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else [int(t) for t in p]
               for p in prompts]
    if any(not row for row in encoded):
        raise ValueError("cannot generate from an empty prompt with a tokenizer that adds no bos token")
    decode_batch, decoded_model = _decoder(model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # stable: deterministic
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    answers: list[tuple[str, bool]] = [("", False)] * len(encoded)
    kept, todo = kept or {}, []
    for indices in batches:  # a batch is reused whole or decoded whole (the same batch, the same answers)
        if all(i in kept for i in indices):
            for i in indices:
                answers[i] = (str(kept[i][0]), bool(kept[i][1]))
        else:
            todo.append(indices)
    answered, answered_now = len(encoded) - sum(len(indices) for indices in todo), 0
    if on_answers is not None:
        faults.signal_after_answers(answered)
    if progress is None:
        progress = GenerationProgress(bar=False)
    progress.start(len(encoded) - answered)
    with _eval_mode(model), _autocast(autocast_ctx), eager():  # compiled layers (train.compile) decode eagerly
        try:
            for indices in todo:
                _check_stop(should_stop, answered_now, answered, len(encoded))
                # Only where it shows: counting steps costs a device-to-host copy each (a GPU sync).
                outputs = decode_batch(decoded_model, [encoded[i] for i in indices], max_new_tokens, eos_ids, pad_id, device,
                                       progress=progress if progress.enabled else None, sampling=sampling,
                                       on_step=_answer_tokens(indices, eos_ids, on_token) if on_token else None)
                for i, tokens in zip(indices, outputs):
                    stop = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
                    text = tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip()
                    answers[i] = (text, stop is None and max_new_tokens > 0)
                progress.answered(len(indices))
                answered, answered_now = answered + len(indices), answered_now + len(indices)
                if on_answers is not None:
                    on_answers({i: answers[i] for i in indices})
                    faults.signal_after_answers(answered)
        finally:
            progress.close()
    return answers


def _answer_tokens(indices: list[int], eos_ids: Sequence[int], on_token: Callable[[int, int], None]):
    """A decoder's `on_step` for the batch of prompts `indices`: hands `on_token` (prompt index,
    token) each row's tokens up to its first stop token, as `generate_outputs` cuts its answer."""
    stopped: set[int] = set()

    def step(tokens: list[int]) -> None:
        for i, token in zip(indices, tokens):
            if i in stopped:
                continue
            if token in eos_ids:
                stopped.add(i)
            else:
                on_token(i, token)

    return step


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
    general: Optional[Iterable[dict]] = None,
    progress: Any = None,
    answers: Optional[AnswerLog] = None,
) -> dict[str, Any]:
    """Held-out loss and generation metrics of one model, plus the scored samples.

    `should_stop` (the trainer's stop signal, a collective: every rank calls it at the same
    points) is asked before each batch; when it says stop, EvalInterrupted is raised, saying how
    many answers exist. `answers` (the final evaluation's `AnswerLog`) keeps each batch's answers
    as they come and hands back those an interrupted run of this same evaluation kept: only the
    rest are generated, and the result is the uninterrupted one. The held-out (and general) loss is
    not kept: it is computed again, which is cheap next to generation and deterministic.

    Keys: loss, perplexity, tokens (None when `eval_batches` is None); exact_match,
    exact_match_strict, f1, rouge_l, num_generated (metrics None when no rows are scored);
    num_truncated and max_new_tokens (answers cut at max_new_tokens without a stop token); per_task
    ({task: metrics + count}, when rows name a task); samples (every scored row: {prompt,
    reference, prediction, task, truncated, scores}, scores being its `sample_scores`). Generation
    scores the first `cfg.num_samples` rows, always the same ones. With `general` (batches of
    general text, distft.evaluation.forgetting.general_batches): general_loss, general_perplexity,
    general_tokens and general_warn (the forgetting check). `progress`: generate_outputs'.
    """
    rows = list(itertools.islice(eval_rows, cfg.num_samples))
    prompts = [r.get("prompt_ids") or r["prompt"] for r in rows]
    kept = {}
    if answers is not None:
        kept = answers.resume(prompts, {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                                        "stop_ids": [int(t) for t in stop_ids], "decoding": "greedy"})
    result: dict[str, Any] = {"loss": None, "perplexity": None, "tokens": None}
    try:
        if eval_batches is not None:
            if should_stop is not None:
                eval_batches = _stoppable(eval_batches, should_stop)
            result.update(held_out_loss(model, eval_batches, device, autocast_ctx))
        if general is not None:
            if should_stop is not None:
                general = _stoppable(general, should_stop)
            scored = held_out_loss(model, general, device, autocast_ctx)
            result.update({f"general_{k}": v for k, v in scored.items()}, general_warn=cfg.general_warn)
    except EvalInterrupted:  # before any answer: those kept are all there is
        raise EvalInterrupted(0, len(kept), len(rows)) from None

    outputs = generate_outputs(
        model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, device, autocast_ctx, stop_ids=stop_ids,
        should_stop=should_stop, progress=progress, kept=kept, on_answers=answers.record if answers else None,
    )
    scores = [sample_scores(text, r["reference"]) for (text, _), r in zip(outputs, rows)]
    result.update(mean_scores(scores) if rows else dict.fromkeys(GENERATION_METRICS))
    result["num_generated"] = len(rows)
    result["num_truncated"] = sum(cut for _, cut in outputs)
    result["max_new_tokens"] = cfg.max_new_tokens

    tasks = [r.get("task") for r in rows]
    if any(task is not None for task in tasks):
        result["per_task"] = {
            task: {"count": len(idx), **mean_scores([scores[i] for i in idx])}
            for task in sorted({t for t in tasks if t is not None})
            for idx in [[i for i, t in enumerate(tasks) if t == task]]
        }

    result["samples"] = [
        {"prompt": r["prompt"], "reference": r["reference"], "prediction": text, "task": r.get("task"),
         "truncated": cut, "scores": score}
        for r, (text, cut), score in zip(rows, outputs, scores)
    ]
    return result


def metrics_only(result: dict[str, Any]) -> dict[str, Any]:
    """`result` without its samples: the part that goes into summary.json."""
    return {k: v for k, v in result.items() if k != "samples"}


# ------------------------------------------------------------------ answers kept across a stop
PARTIAL_ANSWERS = "eval_after.partial.jsonl"
# Far above what num_samples answers of max_new_tokens tokens take; a larger file is not distft's.
PARTIAL_MAX_BYTES = 64 << 20
_PARTIAL_HEADER = "distft: answers of a final evaluation, kept until it completes"
_PARTIAL_FORMAT = 1
# Which evaluation a header names, in the words a log line uses for the keys that differ.
_KEY_KINDS = {"checkpoint": "another checkpoint", "step": "another checkpoint",
              "checkpoint_sha256": "another checkpoint", "prompts": "other prompts",
              "prompts_sha256": "other prompts"}


class AnswerLog:
    """The final evaluation's answers, kept in `<run_dir>/eval_after.partial.jsonl` batch by batch
    as they are generated, so that an evaluation a stop signal cut (a time limit) resumes where
    it was instead of starting over: on SLURM, one longer than a job segment would otherwise never
    finish, requeue after requeue. Removed (`remove`) once the run's results are written.

    A run directory is untrusted: the file is read once, by rank 0 (`open`: a regular file, never
    through a link, at most PARTIAL_MAX_BYTES), and shared with every rank, so that every rank
    skips the same batches (FSDP decodes collectively). Its answers are used only when its header
    names this very evaluation (`resume`): the checkpoint (its path, step and the sha256 of its
    manifest, which hashes every file), the prompts (sha256 of their token ids or text), the
    generation settings (max_new_tokens, stop ids, greedy, and the batch size: the same batches
    give the same answers bit for bit), precision, device and parallel strategy. Anything else
    (another evaluation, a malformed line, not a regular file) is ignored with one log line and
    rewritten. Only rank 0 writes (`writes`)."""

    def __init__(self, path: str, root: str, evaluated: dict, text: Optional[str], unreadable: str, writes: bool):
        self.path, self.root, self.evaluated, self.writes = path, root, evaluated, writes
        self.text, self.unreadable = text, unreadable

    @classmethod
    def open(cls, run_dir: str, checkpoint: str, step: int, settings: dict, writes: bool,
             share: Callable[[Any], Any] = lambda seen: seen) -> AnswerLog:
        """Every rank, before the final evaluation of `checkpoint` (of `step`): rank 0 (`writes`)
        reads the kept answers and the checkpoint's manifest; `share` hands rank 0's object to
        every rank (all_gather_object's first; without ranks, the object itself). `settings`:
        the rest of what the answers depend on (precision, device, parallel strategy)."""
        path = os.path.join(run_dir, PARTIAL_ANSWERS)
        seen = None
        if writes:  # no exception past here before `share`: the other ranks wait in it
            seen = (None, None, "")
            try:
                with open_regular(os.path.join(checkpoint, MANIFEST), "rb", max_bytes=PARTIAL_MAX_BYTES) as f:
                    seen = (hashlib.sha256(f.read()).hexdigest(), *_read_partial(path))
            except OSError as err:  # nothing to tell this evaluation's answers by: none are reused
                if os.path.lexists(path):
                    seen = (None, None, f"cannot be checked against {checkpoint} ({describe(err)})")
        manifest_sha256, text, unreadable = share(seen)
        evaluated = {"checkpoint": os.path.relpath(checkpoint, run_dir), "step": int(step),
                     "checkpoint_sha256": manifest_sha256, **settings}
        return cls(path, run_dir, evaluated, text, unreadable, writes)

    def resume(self, prompts: Sequence[str | Sequence[int]], generation: dict) -> dict[int, tuple[str, bool]]:
        """Every rank, as the evaluation starts: the kept answers (by prompt index) if the file is
        of this evaluation of `prompts` with these `generation` settings, else none. Rank 0 says
        which, and (re)writes the file: its header and the answers kept, nothing else."""
        key = json.loads(json.dumps({**self.evaluated, "prompts": len(prompts),
                                     "prompts_sha256": _prompts_sha256(prompts), **generation}))
        kept, why, torn = ({}, self.unreadable, False) if self.text is None else _parse_partial(self.text, key)
        if self.writes:
            if why:
                log.warning("final evaluation: %s %s; its answers are not used, and it is rewritten", self.path, why)
            elif self.text is not None:
                if torn:
                    log.warning("final evaluation: %s: its last line is torn (cut while written); that batch is "
                                "generated again", self.path)
                log.info("final evaluation: %d of %d answers kept from the interrupted one", len(kept), len(prompts))
            lines = [json.dumps({"distft": _PARTIAL_HEADER, "format": _PARTIAL_FORMAT, "key": key})]
            if kept:
                lines.append(_answers_line(kept))
            write_text(self.path, "".join(line + "\n" for line in lines), what=_PARTIAL_WHAT, root=self.root)
        self.text = None  # read once: what is kept from here on is written, not read
        return kept

    def record(self, answers: dict[int, tuple[str, bool]]) -> None:
        """One batch's new answers, appended whole (rank 0)."""
        if self.writes:
            append_line(self.path, _answers_line(answers), what=_PARTIAL_WHAT, root=self.root)

    def remove(self) -> None:
        """Rank 0, once the run's results are written: a finished run directory keeps no partial
        answers (the link or file at the name is removed, never what a link points to)."""
        if self.writes:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


_PARTIAL_WHAT = "the final evaluation's answers so far"


def _read_partial(path: str) -> tuple[Optional[str], str]:
    """(the text of the kept answers or None, why it cannot be used when it exists but is unreadable)."""
    try:
        with open_regular(path, "rb", max_bytes=PARTIAL_MAX_BYTES) as f:
            return f.read().decode("utf-8"), ""
    except FileNotFoundError:
        return None, ""
    except NotAFile as err:
        return None, f"is unusable ({err})"
    except (OSError, UnicodeDecodeError) as err:
        return None, f"is unreadable ({describe(err)})"


def _prompts_sha256(prompts: Sequence[str | Sequence[int]]) -> str:
    rows = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _answers_line(answers: dict[int, tuple[str, bool]]) -> str:
    return json.dumps({"answers": [[int(i), str(text), bool(cut)] for i, (text, cut) in sorted(answers.items())]})


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _parse_partial(text: str, key: dict) -> tuple[dict[int, tuple[str, bool]], str, bool]:
    """(answers by prompt index, why none are used, whether a torn last line was dropped) of a
    partial-answers file's `text`, checked against this evaluation's `key`. A last line without its
    newline was cut while written (a crash mid-append): dropped, its batch generated again; any
    other damage makes the whole file unusable."""
    lines = text.split("\n")
    torn = bool(lines.pop())  # "" when the text ends with its newline
    if not lines:
        return {}, "holds no header", torn
    header = _json_line(lines[0])
    if (not isinstance(header, dict) or header.get("distft") != _PARTIAL_HEADER
            or header.get("format") != _PARTIAL_FORMAT or not isinstance(header.get("key"), dict)):
        return {}, "does not start with the header distft writes", torn
    theirs = header["key"]
    differ = sorted(k for k in key.keys() | theirs.keys() if k not in key or k not in theirs or theirs[k] != key[k])
    if differ:
        kinds = sorted({_KEY_KINDS.get(k, "other generation settings") for k in differ})
        return {}, f"holds the answers of another evaluation ({', '.join(kinds)}: {', '.join(differ)} differ)", torn
    kept: dict[int, tuple[str, bool]] = {}
    for number, line in enumerate(lines[1:], 2):
        record = _json_line(line)
        rows = record.get("answers") if isinstance(record, dict) and record.keys() == {"answers"} else None
        if not isinstance(rows, list) or not rows or not all(_is_answer(row, key["prompts"]) for row in rows):
            return {}, f"line {number} is not a batch of answers", torn
        if any(row[0] in kept for row in rows):
            return {}, f"line {number} answers a prompt already answered", torn
        kept.update((row[0], (row[1], row[2])) for row in rows)
    return kept, "", torn


def _is_answer(row: Any, total: int) -> bool:
    """[prompt index, answer, truncated], the index one of the evaluation's."""
    return (isinstance(row, list) and len(row) == 3 and type(row[0]) is int and 0 <= row[0] < total
            and isinstance(row[1], str) and type(row[2]) is bool)


# ------------------------------------------------------------------------------------------- CLI
# `python -m distft.evaluate CHECKPOINT`: the base-vs-tuned report for any checkpoint.
def report_root(checkpoint: str) -> str:
    """The directory `default_report_path` writes under: the checkpoint's run directory, or the
    current directory for a checkpoint outside a run. Nothing below it is followed (a run
    directory is untrusted: a planted `evals` link is refused, distft.files)."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else os.getcwd()


def default_report_path(checkpoint: str) -> str:
    """Where `python -m distft.evaluate` writes its report by default: never into the checkpoint.

    A checkpoint of a run (`<run_dir>/checkpoints/step_000300`): `<run_dir>/evals/step_000300/
    eval_report.md`, beside the run's own files. A checkpoint anywhere else (copied, downloaded,
    possibly on read-only storage): `evals/<its name>/eval_report.md` under the current directory."""
    return os.path.join(report_root(checkpoint), "evals", os.path.basename(os.path.abspath(checkpoint)),
                        "eval_report.md")


def evaluate_checkpoint(checkpoint: str, out: str | None = None, num_samples: int | None = None,
                        compare_base: bool = True, trust_remote_code: bool = False) -> tuple[str, dict, dict | None]:
    """Rebuild the run's held-out split from the checkpoint's config, score base and tuned model
    on it, and write the report (default: `default_report_path`). Settings that run code come from
    `trust_remote_code`, never from the checkpoint (`distft.checkpoint.export.checkpoint_config`).

    Nothing is ever written into the checkpoint: a committed checkpoint is sealed by its manifest,
    and an `out` inside it is refused (CheckpointError) before anything is loaded."""
    import torch

    checkpoint = resolve_checkpoint(checkpoint, announce=True)
    root = os.path.dirname(os.path.abspath(os.path.expanduser(out))) if out else report_root(checkpoint)
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
    if device.type == "cpu":  # as a run's ranks choose theirs (a loaded CPU: minutes, not seconds)
        import logging

        logging.getLogger("distft").info("torch threads: %d (%s)", *share_cpu_threads(device))
    data = prepared_for_run(cfg, tokenizer).data
    batches = eval_batches(data.eval, cfg.eval.batch_size, cfg.data.max_seq_len, cfg.data.packing,
                           tokenizer.pad_token_id, cfg.data.pack_strategy)
    if cfg.train.eval_max_batches:
        batches = batches[: cfg.train.eval_max_batches]
    amp = autocast_dtype(cfg.train.precision, device)

    def autocast():
        return autocast_context(amp, device)

    general = None
    if cfg.eval.general_path:
        general = general_batches(cfg.eval.general_path, tokenizer, cfg.data.max_seq_len, cfg.eval.batch_size,
                                  cfg.eval.general_max_tokens)

    pairs = None
    if data.report.pairs:  # objective=dpo: the held-out pairs too (distft/objective.py)
        from distft.data.preference import pairs_from_prepared

        pairs = pairs_from_prepared(data).eval
    pair_logps = {}

    def score(model, label: str):
        if not getattr(model, "is_loaded_in_4bit", False):
            model = model.to(device)
        if pairs is not None:
            from distft.objective import model_pair_scores

            pair_logps[label] = model_pair_scores(model, pairs, cfg, tokenizer, device, autocast)
        result = evaluate_model(model, tokenizer, batches, data.eval_rows, cfg.eval, device, autocast_ctx=autocast,
                                stop_ids=data.stop_ids, general=general,
                                progress=GenerationProgress(f"{label}: generating"))
        if cfg.eval.lm_eval_tasks:
            result["lm_eval"] = run_lm_eval(model, tokenizer, list(cfg.eval.lm_eval_tasks), cfg.eval.lm_eval_include_path,
                                            cfg.eval.lm_eval_limit, cfg.eval.batch_size, device)
        return result

    after = score(tuned, "tuned model")
    before = score(load_base(cfg, tokenizer=tokenizer), "base model") if compare_base else None
    if pairs is not None:
        # The reference of a dpo run is its base (the model training started from, adapters and
        # virtual tokens off): rewards need it, so without --compare-base only the preference itself.
        from distft.objective import add_preference_metrics

        scored = {"tuned model": after, **({"base model": before} if before is not None else {})}
        add_preference_metrics(scored, pair_logps, "base model", cfg.objective.beta)
    meta = {"experiment": cfg.run.experiment, "technique": cfg.technique.name, "model": model_label(cfg.model),
            "checkpoint": checkpoint, "steps": read_meta(checkpoint)["step"]}
    predictions = write_predictions(predictions_path(out), {"base": before, "tuned": after}, root)
    write_report(out, before, after, meta, num_samples=cfg.eval.report_samples, predictions=predictions, root=root)
    return out, after, before
