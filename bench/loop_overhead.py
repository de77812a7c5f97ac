"""Training-loop overhead: distft's trainer against a bare PyTorch loop and the Hugging Face Trainer.

What it measures. The same from-scratch LLaMA (fp32, CPU), the same packed batches (distft's own
data pipeline and batcher produce them once; the baselines replay the very same tensors), the
same AdamW settings, gradient accumulation and clipping, the same number of torch threads, in
one process:

- distft: `distft.train.train(cfg)`, the trainer a user runs (engine, loss over target tokens,
  metrics log, progress, non-finite checks); step times from its metrics.jsonl.
- bare loop: `model(**batch, labels)`, `backward`, `clip_grad_norm_`, `AdamW.step`, `zero_grad`,
  nothing else.
- HF Trainer: `transformers.Trainer` with the same model, batches and optimizer settings
  (no logging, saving or evaluation); step times between its `on_step_end` callbacks.

    ratio = baseline median step time / distft median step time   (> 1: distft faster)

Every figure is the median step time over the steps after `--warmup`, then the median over
`--reps` repetitions run in turn (distft, bare, HF, distft, ...), so background load hits all
alike. Tokens per step are the same for all three (global batch x sequence length).

Why. The trainer does more than a bare loop (token-weighted loss across accumulation, global
loss and grad-norm reductions, checks, logging); this shows what that costs. Target: distft at
least as fast as the bare loop within noise.

    python bench/loop_overhead.py [--steps 30] [--hidden 256] [--layers 4] [--seq 256] [--micro 4] \
        [--accum 2] [--reps 3] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402


def config(args, root: str):
    from distft.preflight import preflight

    cfg, errors = preflight([
        "+experiment=tiny_full", f"run.root={root}", f"train.max_steps={args.steps}", "train.log_every=1",
        f"model.hidden_size={args.hidden}", f"model.intermediate_size={args.hidden * 3}",
        f"model.num_hidden_layers={args.layers}", f"data.max_seq_len={args.seq}",
        f"model.max_position_embeddings={max(512, args.seq)}", f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={args.micro * args.accum}", "train.warmup_steps=2", "train.eval_every=0",
        "eval.compare_base=false", "eval.num_samples=1", "eval.max_new_tokens=1", "train.eval_max_batches=1",
        "checkpoint.save_every=0", "tracking.plot=false", "tracking.progress_bar=false",
    ])
    assert not errors, errors
    return cfg


def batches(cfg, steps: int) -> list[list[dict]]:
    """The micro-batches of `steps` optimizer steps, exactly as distft's trainer draws them."""
    from distft.config import grad_accum_steps
    from distft.data.batching import TrainBatches
    from distft.data.pipeline import prepare_data
    from distft.model.build import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.data.seed)
    accum = grad_accum_steps(cfg)
    it = iter(TrainBatches(data.train, cfg.train.micro_batch_size, cfg.data.max_seq_len, cfg.data.packing,
                           tokenizer.pad_token_id, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                           accumulation_steps=accum, pack_strategy=cfg.data.pack_strategy))
    return [[next(it) for _ in range(accum)] for _ in range(steps)]


def run_distft(args) -> list[float]:
    from distft.train import train

    with tempfile.TemporaryDirectory() as root:
        summary = train(config(args, root))
        with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
            return [r["step_time_s"] for r in map(json.loads, f) if "step_time_s" in r]


def _model_and_optimizer(cfg):
    import torch

    from distft.model.build import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).train()
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    return model, optimizer


def run_bare(cfg, steps: list[list[dict]]) -> list[float]:
    import torch

    model, optimizer = _model_and_optimizer(cfg)
    times = []
    for micro_batches in steps:
        started = time.perf_counter()
        for batch in micro_batches:
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                        use_cache=False)
            (out.loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def run_hf(cfg, steps: list[list[dict]], out_dir: str) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    model, _ = _model_and_optimizer(cfg)
    rows = [{k: batch[k][i] for k in ("input_ids", "position_ids", "labels")}
            for micro_batches in steps for batch in micro_batches for i in range(batch["input_ids"].shape[0])]
    t = cfg.train
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_, **__):
            marks.append(time.perf_counter())

        def on_train_begin(self, *_, **__):
            marks.append(time.perf_counter())

    arguments = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=len(steps[0]), max_steps=len(steps), learning_rate=t.lr,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_eps, weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip, lr_scheduler_type="cosine", warmup_steps=t.warmup_steps, logging_strategy="no",
        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=t.seed,
    )
    Trainer(model=model, args=arguments, train_dataset=rows, data_collator=default_data_collator,
            callbacks=[StepClock()]).train()
    return [b - a for a, b in zip(marks, marks[1:])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)
    command = command_line()
    import logging

    import torch

    with tempfile.TemporaryDirectory() as scratch:
        cfg = config(args, scratch)
        steps = batches(cfg, args.steps)
        medians: dict[str, list[float]] = {"distft": [], "bare loop": [], "HF Trainer": []}
        for _ in range(args.reps):
            medians["distft"].append(statistics.median(run_distft(args)[args.warmup:]))
            logging.getLogger("distft").setLevel(logging.WARNING)  # the trainer's own lines: once is enough
            medians["bare loop"].append(statistics.median(run_bare(cfg, steps)[args.warmup:]))
            medians["HF Trainer"].append(statistics.median(run_hf(cfg, steps, scratch)[args.warmup:]))
    tokens = args.micro * args.accum * args.seq
    step = {name: statistics.median(values) for name, values in medians.items()}
    rows = ["| loop | median step s | tokens/s | distft vs it |", "|---|---:|---:|---:|"]
    for name, seconds in step.items():
        rows.append(f"| {name} | {seconds:.4f} | {tokens / seconds:,.0f} | {seconds / step['distft']:.3f} |")
    table = "\n".join(rows)
    spread = {name: f"{min(v):.4f}-{max(v):.4f}" for name, v in medians.items()}
    summary = (f"distft / bare loop  = {step['bare loop'] / step['distft']:.3f}   (tokens/s ratio; > 1: distft faster)\n"
               f"distft / HF Trainer = {step['HF Trainer'] / step['distft']:.3f}")
    details = (f"model: hidden {args.hidden}, {args.layers} layers, fp32; {args.micro} x {args.seq} tokens per "
               f"micro-batch, {args.accum} micro-batches per step ({tokens:,} tokens); {args.steps} steps, first "
               f"{args.warmup} left out; median of {args.reps} repetitions (range per loop: {spread}); "
               f"torch threads {torch.get_num_threads()}")
    report("loop_overhead", command, details, table, summary, args.record)


if __name__ == "__main__":
    main()
