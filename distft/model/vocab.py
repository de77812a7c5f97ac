"""The tokenizer's length against the model's embedding rows, checked before anything runs.

A tokenizer with more tokens than the model has embedding rows (usually tokens added to a
published tokenizer: tool tags, chat markers) otherwise ends in `IndexError: index out of range
in self` from the first forward that meets one of them. One decision (`vocab_problem`), applied in
two places:

- `python -m distft`'s preflight (`preflight_problems`), without torch or transformers: only
  when the tokenizer is a local directory holding `tokenizer.json` (counted by the `tokenizers`
  library in milliseconds) and the embedding size is known without loading weights (the preset's
  `model.vocab_size`, a local `config.json`). Hub ids and SentencePiece-only tokenizers are left to
  the trainer, which checks right after loading the tokenizer, before data or model work;
- wherever the base model is built (`fit_embeddings`, called by `techniques.build_base`), so the
  trainer, FSDP's meta-device build, evaluation's base model and export all see the same shape.

The decision, for `len(tokenizer) > embedding rows` (fewer tokens than rows is normal: LLaMA
checkpoints pad their vocabulary, and nothing is done):
- a from-scratch preset (`model.name_or_path: null`) is refused: its size is a config key, so
  the fix is `model.vocab_size=<len(tokenizer)>`;
- a model from a path with `technique=full` gets its input embeddings and output head resized to
  exactly `len(tokenizer)` rows (transformers' `resize_token_embeddings`; not padded to a
  multiple, so the saved checkpoint's `vocab_size` is the tokenizer's length), logged in one line.
  The new rows start at the mean of the existing rows of each matrix (Hewitt, "Initializing New
  Word Embeddings for Pretrained Language Models": new tokens start at the average logit and
  barely move the base's predictions), computed, not drawn, so every rebuild of the base is the
  same bits and no random number is taken from the caller's generator;
- adapters and virtual tokens (lora, qlora, dora, prefix, prompt) are refused: they freeze the
  embeddings, so the new rows would never be trained. The fixes: `technique=full`, or a tokenizer
  without the added tokens.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from distft.config import Config, ModelConfig
from distft.errors import ModelLoadError
from distft.files import read_json
from distft.techniques.kinds import TECHNIQUES, technique_kind

log = logging.getLogger("distft")


def _tokenizer_where(model: ModelConfig) -> str:
    if model.tokenizer:
        return f"the tokenizer model.tokenizer={model.tokenizer!r}"
    if model.name_or_path:
        return f"the tokenizer of model.name_or_path={model.name_or_path!r}"
    return "the built-in offline tokenizer"


def vocab_problem(cfg: Config, tokenizer_len: int, embedding_rows: int) -> Optional[str]:
    """Why a run with a tokenizer of `tokenizer_len` tokens and a model of `embedding_rows`
    embedding rows cannot start (one line naming both numbers and the fix), or None when it can:
    the tokenizer fits, or it is a full fine-tuning of a path model, whose embeddings
    `fit_embeddings` resizes."""
    if tokenizer_len <= embedding_rows:
        return None
    model, technique = cfg.model, cfg.technique.name
    where = _tokenizer_where(model)
    extra = tokenizer_len - embedding_rows
    if model.name_or_path is None:
        return (f"{where} has {tokenizer_len} tokens, more than the model.vocab_size={embedding_rows} embedding rows "
                f"of model={model.name} (built from scratch): token ids {embedding_rows}..{tokenizer_len - 1} would index "
                f"past the embedding; set model.vocab_size={tokenizer_len} (or more)")
    kind = TECHNIQUES.get(technique)  # None: an unknown name, which validation reports (this runs beside it)
    if kind is not None and kind.trains_embeddings:
        return None
    return (f"{where} has {tokenizer_len} tokens, more than the {embedding_rows} embedding rows of "
            f"model.name_or_path={model.name_or_path!r}; technique={technique} keeps the embeddings frozen, so the "
            f"{extra} token(s) past them would index out of range and could never be learned: use technique=full "
            f"(which resizes the embeddings to {tokenizer_len} rows), or a tokenizer without the added tokens "
            "(model.tokenizer=<directory>)")


def _config_vocab_size(config: dict) -> Optional[int]:
    """`vocab_size` of a config.json (top level, or a multimodal model's text_config)."""
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def local_embedding_rows(model: ModelConfig) -> Optional[int]:
    """Embedding rows known without loading weights or transformers: the preset's
    `model.vocab_size` for a from-scratch model, a local directory's config.json `vocab_size`;
    None otherwise (a hub id, an unreadable config.json: reported elsewhere)."""
    if model.name_or_path is None:
        return model.vocab_size
    path = os.path.join(os.path.expanduser(model.name_or_path), "config.json")
    try:
        config = read_json(path, follow_links=True)
    except (OSError, ValueError):
        return None
    return _config_vocab_size(config) if isinstance(config, dict) else None


def embedding_rows(model: ModelConfig) -> Optional[int]:
    """Embedding rows of the model training will build, from its config alone (no weights): as
    `local_embedding_rows`, else a hub id's config through transformers. None when the config
    cannot be read: loading the model then reports why, and `fit_embeddings` checks the real
    model."""
    rows = local_embedding_rows(model)
    if rows is not None or model.name_or_path is None:
        return rows
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model.name_or_path, trust_remote_code=model.trust_remote_code)
        return int(config.get_text_config().vocab_size)
    except Exception:  # noqa: BLE001 - any failure to read it is reported by the model load itself
        return None


def local_tokenizer_len(model: ModelConfig) -> Optional[int]:
    """`len(tokenizer)` of a tokenizer in a local directory with tokenizer.json, counted by the
    `tokenizers` library (no transformers, no torch; the same count as transformers'
    `len(PreTrainedTokenizerFast)`, added tokens included); None for the built-in tokenizer, a hub
    id, a SentencePiece-only directory or a file that does not load (the trainer reports those)."""
    source = model.tokenizer or model.name_or_path
    if source is None:
        return None
    path = os.path.join(os.path.expanduser(source), "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - a tokenizer that does not load is reported when the trainer loads it
        return None


def preflight_problems(cfg: Config) -> list[str]:
    """The vocabulary problem of a config whose tokenizer and model size are on local disk, for
    `python -m distft` before anything starts (see the module docstring for what is left to the
    trainer). The built-in tokenizer against `model.vocab_size` is validate()'s rule already."""
    tokenizer_len = local_tokenizer_len(cfg.model)
    rows = local_embedding_rows(cfg.model) if tokenizer_len is not None else None
    problem = vocab_problem(cfg, tokenizer_len, rows) if rows is not None else None
    return [problem] if problem else []


def fit_embeddings(model: Any, cfg: Config, tokenizer: Any = None) -> Any:
    """`model` (a freshly built transformers base) with embeddings that fit the tokenizer, or a
    ModelLoadError with `vocab_problem`'s message.

    `tokenizer` None: the run's own tokenizer is loaded (`distft.model.build.load_tokenizer`) only where a
    resize can happen (technique=full on a path model), so every rebuild of a resized base
    (evaluation's base model, FSDP's rank-0 copy) resizes it the same way; other techniques are
    then left as built (the trainer checked them when it started). On the meta device only the
    shapes change (the engine fills the weights from rank 0's real, resized model)."""
    import torch

    from distft.model.build import load_tokenizer  # lazy: torch (preflight imports this module, torch-free)

    if tokenizer is None:
        if not technique_kind(cfg.technique.name).trains_embeddings or cfg.model.name_or_path is None:
            return model
        tokenizer = load_tokenizer(cfg.model)
    tokenizer_len = len(tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    problem = vocab_problem(cfg, tokenizer_len, rows)
    if problem:
        raise ModelLoadError(problem)
    if tokenizer_len <= rows:
        return model

    def weights() -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # (input, output head when not tied)
        embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings()
        return embedding, (head.weight if head is not None and head.weight is not embedding else None)

    means = [None if w is None or w.is_meta else w.detach().float().mean(dim=0) for w in weights()]
    # transformers draws the new rows from the generator before we overwrite them: keep the
    # caller's random state as if nothing had been drawn (builds stay reproducible).
    embedding = model.get_input_embeddings().weight
    with torch.random.fork_rng(devices=[embedding.device] if embedding.device.type == "cuda" else []):
        model.resize_token_embeddings(tokenizer_len, mean_resizing=False)
    with torch.no_grad():
        for weight, mean in zip(weights(), means):
            if weight is not None and mean is not None:
                weight[rows:] = mean.to(weight.dtype)
    if means[0] is None:
        return model  # the meta device: rank 0's real build announces the resize
    log.info("model.name_or_path=%r has %d embedding rows and %s has %d tokens: resized the input embeddings and "
             "the output head to %d rows (technique=full trains them); the %d new rows start at the mean of the "
             "existing rows", cfg.model.name_or_path, rows, _tokenizer_where(cfg.model), tokenizer_len,
             tokenizer_len, tokenizer_len - rows)
    return model
