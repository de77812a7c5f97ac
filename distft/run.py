"""The run as built, and the loop's state.

`build_run(cfg, info, device)` is the one place a config becomes what training works with:
tokenizer (checked against the model's embedding), data (cleaned, split, tokenized), the model
with its technique, the engine, the training batches and the held-out batches. The trainer uses
it, and so can anything else that needs the same objects (evaluation, benchmarks, test workers)
instead of wiring them again by hand and drifting from the trainer.

`TrainState` is the loop's own state (step, counters, early stopping, the base's evaluation): what a
checkpoint's trainer_state.json holds under "loop" (the same keys as ever, so older checkpoints
load).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from distft.config import Config, grad_accum_steps, model_label
from distft.data.batching import TrainBatches, eval_batches
from distft.data.cache import prepared_for_run
from distft.dist import DistInfo
from distft.engines import build_engine, build_model_for_engine, weights_dtype
from distft.engines.compile import compile_layers
from distft.errors import DataError, ModelLoadError
from distft.evaluation.forgetting import general_batches
from distft.model.build import count_parameters, load_tokenizer
from distft.model.vocab import embedding_rows, vocab_problem
from distft.techniques.kinds import technique_kind
from distft.tracking import MemoryMeter

log = logging.getLogger("distft")


@dataclass
class TrainState:
    step: int = 0
    train_tokens: int = 0
    train_target_tokens: int = 0
    train_time_s: float = 0.0
    best_eval_loss: float = math.inf
    best_step: Optional[int] = None  # the step of best_eval_loss (periodic evals)
    evals_without_improvement: int = 0
    stopped_early: bool = False
    eval_before: Optional[dict] = None
    nonfinite_steps: int = 0
    # Over the applied steps: the run's token-weighted mean loss.
    train_loss_sum: float = 0.0
    train_loss_tokens: int = 0
    # The last applied step's loss: a rerun from the final checkpoint (after a stop during the
    # final evaluation) takes no step and still reports it.
    last_train_loss: Optional[float] = None

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Fields the checkpoint has; one written before a field existed leaves it at its default."""
        known = {f.name for f in dataclasses.fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)


@dataclass
class Run:
    cfg: Config
    info: DistInfo
    device: torch.device
    tokenizer: Any
    data: Any  # distft.data.pipeline.PreparedData
    dtype: torch.dtype  # what the model was built in (engines.weights_dtype)
    memory: Any  # distft.tracking.MemoryMeter, counting from just before the model build
    model: torch.nn.Module
    model_build: str  # "eager" or "meta" (engines.build_model_for_engine)
    trainable: int
    total: int
    engine: Any
    batches: Any  # distft.data.batching.TrainBatches: this rank's micro-batches, resumable
    held_out: list  # the eval split's batches (train.eval_max_batches of them when set)
    general: Optional[list] = None  # eval.general_path's batches: the forgetting check (distft.evaluation.forgetting)
    pairs: Any = None  # objective=dpo: distft.data.preference.PreparedPairs (train and eval pairs)
    reference: Optional[dict] = None  # objective=dpo: the reference's log-probs {"train", "eval"} (distft.objective)
    data_fingerprint: dict = field(default_factory=dict)  # the data files by content (sources.data_fingerprint)


def check_vocab(cfg: Config, tokenizer) -> None:
    """A tokenizer longer than the model's embedding stops the run here, before the data and the
    model load (`vocab.vocab_problem`); a full fine-tuning that can resize goes on, and the base
    build resizes (`vocab.fit_embeddings`)."""
    rows = embedding_rows(cfg.model)
    problem = vocab_problem(cfg, len(tokenizer), rows) if rows is not None else None
    if problem:
        raise ModelLoadError(problem)


def build_run(cfg: Config, info: DistInfo, device: torch.device) -> Run:
    """Everything a run trains with, built in the order the trainer always used (the RNG draws of
    the model's initialisation depend on it)."""
    tokenizer = load_tokenizer(cfg.model)
    check_vocab(cfg, tokenizer)
    cached = prepared_for_run(cfg, tokenizer, info.rank)
    pairs = None
    if cached.data.report.pairs:  # objective=dpo: preference pairs, cached as SFT samples are
        from distft.data.preference import pairs_from_prepared

        pairs = pairs_from_prepared(cached.data)
    data = cached.data
    if not data.eval:  # validate() refuses an empty split it can see; a dataset's own split can be empty too
        raise DataError(f"no held-out rows: {data.report.summary()}; every run scores the model on held-out rows "
                        "before and after training: set data.eval_size / data.eval_fraction above 0, or data.eval_path")
    if info.is_main:  # every rank prepared the same data: its report is said once
        log.info("%s", data.report.summary())
    if cached.path:  # this rank's own: it built the cache, or read it (and how long that took)
        log.info("data: %s the cache %s in %.1f s", "built" if cached.built else "read", cached.path, cached.seconds)
    for level, line in data.report.notes(cfg.data) if info.is_main else ():
        getattr(log, level)("%s", line)

    dtype = weights_dtype(cfg, device)
    if cfg.train.pure_bf16 and info.is_main:
        log.warning("train.pure_bf16=true: weights, gradients and AdamW state in bf16, no fp32 master weights; "
                    "updates below bf16's resolution (~1/256 of a weight) are lost, so a small train.lr trains little")
    memory = MemoryMeter(device, cfg.tracking.cpu_memory_steps)  # the model, its training state, activations
    model, model_build = build_model_for_engine(cfg, dtype, tokenizer, info.world_size)
    counts = count_parameters(model, quantized_base=technique_kind(cfg.technique.name).quantized_base)
    trainable, total = counts.trainable, counts.total
    if info.is_main:
        log.info(
            "model %s, technique %s: %s trainable of %s parameters (%.2f%%), built %s",
            model_label(cfg.model), cfg.technique.name, f"{trainable:,}", f"{total:,}",
            100.0 * trainable / max(1, total),
            "on the meta device, filled from rank 0" if model_build == "meta" else "on every rank",
        )
    if cfg.train.compile:  # before any engine wraps the layers (engines/compile.py)
        compiled = compile_layers(model)
        if info.is_main:
            log.info("train.compile=true: %d decoder layers compiled; the first step builds their graph", compiled)
    engine = build_engine(cfg, model, device)

    pad_id = tokenizer.pad_token_id
    if pairs is not None:
        from distft.data.preference import PairBatches

        batches = PairBatches(pairs.train, cfg.train.micro_batch_size, pad_id, seed=cfg.train.seed,
                              shuffle=cfg.data.shuffle, rank=info.rank, world_size=info.world_size,
                              accumulation_steps=grad_accum_steps(cfg),
                              pack_len=cfg.data.max_seq_len if cfg.data.packing else 0, sources=pairs.sources,
                              weights=[s["weight"] for s in data.report.sources] or None)
    else:
        batches = TrainBatches(
            data.train, cfg.train.micro_batch_size, cfg.data.max_seq_len, cfg.data.packing, pad_id,
            seed=cfg.train.seed, shuffle=cfg.data.shuffle, rank=info.rank, world_size=info.world_size,
            accumulation_steps=grad_accum_steps(cfg), pack_strategy=cfg.data.pack_strategy,
            sources=data.train_sources, weights=[s["weight"] for s in data.report.sources] or None,
        )
    held_out = eval_batches(data.eval, cfg.eval.batch_size, cfg.data.max_seq_len, cfg.data.packing, pad_id,
                            cfg.data.pack_strategy)
    if cfg.train.eval_max_batches:
        held_out = held_out[: cfg.train.eval_max_batches]
    general = None
    if cfg.eval.general_path:
        general = general_batches(cfg.eval.general_path, tokenizer, cfg.data.max_seq_len, cfg.eval.batch_size,
                                  cfg.eval.general_max_tokens)
    return Run(cfg, info, device, tokenizer, data, dtype, memory, model, model_build, trainable, total, engine,
               batches, held_out, general=general, pairs=pairs)
