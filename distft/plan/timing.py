"""How long a planned run takes: tokens/s, step time, communication, time per epoch.

Time: tokens/s = GPUs x peak FLOP/s x plan.mfu / FLOPs per token (the MFU formula of
distft/tracking.py); per step, the data-parallel traffic of one rank (gradient all-reduce,
or ZeRO-3/FSDP's gathers and reduce-scatter) at the profile's bandwidth (the inter-node one
shared by a node's GPUs as soon as there are 2 nodes) is reported too; a step takes the
longer of the two (communication overlaps compute). Time per epoch: the run's data pipeline
on up to plan.epoch_sample_rows rows with the model's own tokenizer (local files only; none:
no epoch estimate), packed into sequences, extrapolated to all rows.
"""

from __future__ import annotations

import math
from typing import Optional

from distft.config import Config, grad_accum_steps, world_size
from distft.data.cache import find
from distft.data.pipeline import DataError, load_rows, prepare_data
from distft.engines.kinds import engine_kind
from distft.model.build import ModelLoadError, ParameterCounts, load_tokenizer
from distft.plan.memory import param_bytes, rows_per_micro_batch
from distft.techniques.kinds import technique_kind
from distft.tracking import flops_per_token


def comm_traffic_bytes(cfg: Config, counts: ParameterCounts) -> int:
    """Bytes one rank sends per optimizer step for data parallelism (ring collectives: an
    all-reduce sends 2(W-1)/W of the buffer, an all-gather or reduce-scatter (W-1)/W).
    DDP and ZeRO-1/2 reduce gradients (ZeRO also gathers updated weights) once per step; ZeRO-3
    and FSDP gather weights for forward and again for backward, and reduce-scatter gradients,
    on every micro-batch."""
    ws, kind = world_size(cfg), engine_kind(cfg.parallel.strategy)
    if ws == 1 or kind.collectives == "none":
        return 0
    share = (ws - 1) / ws
    t, p, b = counts.trainable, counts.total - counts.quantized, param_bytes(cfg)
    width = 2 if kind.deepspeed else b  # DeepSpeed communicates its 16-bit copies
    if kind.collectives == "per_step":
        return int(2 * share * t * width)
    gathers = kind.gathers_per_micro_batch(cfg.parallel)
    return int(share * (gathers * p + t) * width * grad_accum_steps(cfg))


def throughput(cfg: Config, counts: ParameterCounts) -> dict:
    """tokens/s and step time from the cluster's peak FLOP/s at an assumed MFU, and the
    data-parallel communication time per step at the profile's bandwidth."""
    flops = flops_per_token(counts.total, cfg.model.num_hidden_layers, cfg.model.hidden_size, cfg.data.max_seq_len,
                            full=technique_kind(cfg.technique.name).trains_all_weights)
    out = {"flops_per_token": flops, "assumed_mfu": cfg.plan.mfu, "tokens_per_s": None, "compute_time_s": None,
           "comm_bytes_per_step": comm_traffic_bytes(cfg, counts), "comm_time_s": None, "step_time_s": None,
           "time_for_max_steps_s": None, "reference_tokens_per_s": None}
    c = cfg.cluster
    per_gpu_gbps = c.intra_node_gbps if cfg.launcher.nnodes == 1 else \
        min(c.intra_node_gbps or math.inf, c.inter_node_gbps / max(cfg.launcher.nproc_per_node, 1))
    if per_gpu_gbps and math.isfinite(per_gpu_gbps):
        out["comm_time_s"] = out["comm_bytes_per_step"] / (per_gpu_gbps * 1e9)
    if c.peak_tflops <= 0:
        return out
    compute_tokens_per_s = world_size(cfg) * c.peak_tflops * 1e12 * cfg.plan.mfu / flops
    # objective=dpo: a step's global batch is pairs, two rows each; a live reference adds a
    # forward of them (2N + the attention's forward third), a precomputed one a forward of every
    # training pair before the first step (`epoch`'s reference_time_s).
    rows = rows_per_micro_batch(cfg) // max(cfg.train.micro_batch_size, 1)
    step_tokens = cfg.train.global_batch_size * rows * cfg.data.max_seq_len
    forward = 2.0 * counts.total + 4.0 * cfg.model.num_hidden_layers * cfg.model.hidden_size * cfg.data.max_seq_len
    out["reference_tokens_per_s"] = compute_tokens_per_s * flops / forward if rows > 1 else None
    live = rows > 1 and cfg.objective.reference == "live"
    out["compute_time_s"] = step_tokens / compute_tokens_per_s * ((flops + forward) / flops if live else 1.0)
    out["step_time_s"] = max(out["compute_time_s"], out["comm_time_s"] or 0.0)
    out["tokens_per_s"] = step_tokens / out["step_time_s"]
    out["time_for_max_steps_s"] = out["step_time_s"] * cfg.train.max_steps
    return out


def epoch(cfg: Config, step_time_s: Optional[float], reference_tokens_per_s: Optional[float] = None) -> dict:
    """`_epoch`; for objective=dpo counted in pairs (a step's global batch is pairs), with the
    time a precomputed reference takes before the first step (`reference_time_s`: a forward of
    both answers of every training pair, at `reference_tokens_per_s`)."""
    found = _epoch(cfg, step_time_s)
    if cfg.objective.name == "dpo" and "unknown" not in found:
        found["pairs"] = found["sequences"]
        if cfg.objective.reference == "precomputed" and reference_tokens_per_s:
            found["reference_time_s"] = 2 * found["pairs"] * cfg.data.max_seq_len / reference_tokens_per_s
    return found


def _epoch(cfg: Config, step_time_s: Optional[float]) -> dict:
    """Sequences, tokens and optimizer steps in one pass over the training data, and its time.

    From the tokenized-data cache when the data was prepared before (exact); else the run's own
    pipeline (load, clean, template, tokenize, pack) on up to plan.epoch_sample_rows training
    rows, scaled to all of them. Needs the model's tokenizer
    on local disk (never downloaded here); without it: {"unknown": why}."""
    import random

    try:
        tokenizer = load_tokenizer(cfg.model, local_files_only=True)
    except (ModelLoadError, OSError, ValueError):
        where = cfg.model.tokenizer or cfg.model.name_or_path
        return {"unknown": f"the tokenizer {where!r} is not on local disk; set model.tokenizer=<local directory> "
                           "for a time per epoch"}
    pairs = cfg.objective.name == "dpo"  # counted in pairs: a report of pairs' train_sequences is 2 a pair
    try:
        cached = find(cfg.data, tokenizer, cfg.data.seed, cfg.run.root, cfg.objective.name)
    except (DataError, OSError, ValueError) as err:
        return {"unknown": f"the data could not be read: {err}"}
    if cached is not None:  # prepared before (python -m distft.data, or a run): exact, nothing tokenized
        report = cached.data.report
        sequences = report.train if pairs else report.train_sequences
        steps = math.ceil(sequences / cfg.train.global_batch_size)
        return {"train_rows": report.train, "rows_read": report.train, "extrapolated": False, "cache": cached.path,
                "sequences": sequences,
                "tokens": report.train_sequences * cfg.data.max_seq_len if cfg.data.packing and not pairs
                else report.train_tokens,
                "steps": steps, "time_s": steps * step_time_s if step_time_s else None}
    if cfg.data.sources:
        return {"unknown": "a mix of data.sources is counted from its cache: prepare it first with "
                           "`python -m distft.data <the same overrides>`"}
    try:
        if pairs and cfg.data.source == "synthetic":  # the pairs are made from the config: all of them, no sample
            from distft.data.preference import build_pairs

            report = build_pairs(cfg.data, tokenizer).report
            steps = math.ceil(report.train / cfg.train.global_batch_size)
            return {"train_rows": report.train, "rows_read": report.train, "extrapolated": False,
                    "sequences": report.train, "tokens": report.train_tokens, "steps": steps,
                    "time_s": steps * step_time_s if step_time_s else None}
        train_raw, eval_raw = load_rows(cfg.data)
        sample = train_raw
        if len(train_raw) > cfg.plan.epoch_sample_rows > 0:
            sample = random.Random(cfg.data.seed).sample(train_raw, cfg.plan.epoch_sample_rows)
        if pairs:
            from distft.data.preference import build_pairs

            data = build_pairs(cfg.data, tokenizer, rows=(sample, eval_raw))
        else:
            data = prepare_data(cfg.data, tokenizer, seed=cfg.data.seed, rows=(sample, eval_raw))
    except (DataError, OSError, ValueError) as err:
        return {"unknown": f"the data could not be read: {err}"}
    scale = len(train_raw) / len(sample)
    sequences = math.ceil(data.report.train_sequences * scale)
    if pairs and eval_raw is None:  # the kept share of all rows, less the held-out pairs (an eval_size is not scaled)
        report = data.report
        sequences = max(0, round(report.kept / max(report.loaded, 1) * len(train_raw)) - report.eval)
    elif pairs:  # the held-out pairs are a file of their own
        sequences = math.ceil(data.report.train * scale)
    steps = math.ceil(sequences / cfg.train.global_batch_size)
    return {"train_rows": len(train_raw), "rows_read": len(sample), "extrapolated": scale != 1,
            "sequences": sequences, "tokens": sequences * cfg.data.max_seq_len if cfg.data.packing and not pairs else
            math.ceil(data.report.train_tokens * scale), "steps": steps,
            "time_s": steps * step_time_s if step_time_s else None}
