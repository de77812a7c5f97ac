"""Data pipeline: distft's prepare + pack against raw fast-tokenizer throughput, and packing efficiency.

What it measures, on the shipped synthetic instruction data (`--rows`, 20,000 by default, the
default job's size) with distft's built-in tokenizer (a Rust `tokenizers` fast tokenizer):

- raw tokenizer: one batched `tokenizer(texts)` call over the rows' full texts (prompt and
  response as the template lays them out), the most a tokenizer alone can do;
- distft pipeline: `prepare_data` (load, clean with counts and de-duplication, template, tokenize
  each row's whole text once, masked by offsets, split, report) and then one epoch of packed rows
  (`TrainBatches`: shuffle, pack, shuffle rows) as training sees them.

    ratio = pipeline tokens/s / raw tokenizer tokens/s   (same tokens)

and packing efficiency (the share of non-pad tokens in the packed rows) for both strategies,
best_fit (the default) and in_order, at `--seq` lengths. Medians of `--reps` repetitions.

Why. The pipeline does more than tokenizing (validation, masks, de-duplication, packing); the
ratio shows what that costs next to the tokenizer, and the fill shows how much compute packing
wastes on padding. Target: >= 99% non-pad tokens.

    python bench/data_pipeline.py [--rows 20000] [--seq 256 2048] [--reps 3] [--record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 2048], help="max_seq_len values for the fill")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)
    command = command_line()

    from distft.batching import PACK_STRATEGIES, TrainBatches, pack
    from distft.config import DataConfig, SyntheticDataConfig
    from distft.data import load_rows, prepare_data, to_canonical
    from distft.model import build_offline_tokenizer
    from distft.templates import render_row

    tokenizer = build_offline_tokenizer()
    cfg = DataConfig(template="plain", synthetic=SyntheticDataConfig(num_examples=args.rows),
                     max_seq_len=args.seq[0])  # conf/data/synthetic.yaml
    raw, _ = load_rows(cfg)
    texts = []
    for r in raw:
        kind, row = to_canonical(r.value, cfg.format, cfg)
        texts.append(render_row(row, kind, cfg.template, tokenizer).text)

    raw_times, pipe_times, raw_tokens, pipe_tokens = [], [], 0, 0
    for _ in range(args.reps):
        started = time.perf_counter()
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        raw_times.append(time.perf_counter() - started)
        raw_tokens = sum(map(len, encoded))

        started = time.perf_counter()
        data = prepare_data(cfg, tokenizer)
        epoch = TrainBatches(data.train, 4, cfg.max_seq_len, True, tokenizer.pad_token_id, seed=0)
        pipe_times.append(time.perf_counter() - started)
        pipe_tokens = data.report.train_tokens + sum(len(s["input_ids"]) for s in data.eval)
        assert epoch.rows_per_epoch == data.report.train_sequences

    raw_s, pipe_s = statistics.median(raw_times), statistics.median(pipe_times)
    rows = ["| stage | tokens | median s | tokens/s | vs raw tokenizer |", "|---|---:|---:|---:|---:|",
            f"| raw tokenizer (batched) | {raw_tokens:,} | {raw_s:.3f} | {raw_tokens / raw_s:,.0f} | 1.00 |",
            f"| distft prepare + pack | {pipe_tokens:,} | {pipe_s:.3f} | {pipe_tokens / pipe_s:,.0f} | "
            f"{(pipe_tokens / pipe_s) / (raw_tokens / raw_s):.2f} |"]
    fill_rows = ["| max_seq_len | strategy | rows | non-pad share | pack s |", "|---:|---|---:|---:|---:|"]
    fills: dict[tuple[int, str], float] = {}
    for seq in args.seq:
        samples = [s for s in data.train if len(s["input_ids"]) <= seq]
        tokens = sum(len(s["input_ids"]) for s in samples)
        for strategy in PACK_STRATEGIES:
            started = time.perf_counter()
            packed = pack(samples, seq, tokenizer.pad_token_id, strategy)
            seconds = time.perf_counter() - started
            fills[seq, strategy] = tokens / (len(packed) * seq)
            fill_rows.append(f"| {seq} | {strategy} | {len(packed):,} | {fills[seq, strategy]:.2%} | {seconds:.3f} |")
    table = "\n".join(rows) + "\n\n" + "\n".join(fill_rows)
    summary = (f"pipeline / raw tokenizer = {(pipe_tokens / pipe_s) / (raw_tokens / raw_s):.2f}   (tokens/s)\n"
               + "\n".join(f"packing fill at {seq}: best_fit {fills[seq, 'best_fit']:.2%}, "
                           f"in_order {fills[seq, 'in_order']:.2%}" for seq in args.seq))
    lengths = sorted(len(s["input_ids"]) for s in data.train)
    details = (f"data: {args.rows:,} synthetic rows (template plain), distft's offline character-level fast "
               f"tokenizer; sample lengths {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}); "
               f"median of {args.reps}")
    report("data_pipeline", command, details, table, summary, args.record)


if __name__ == "__main__":
    main()
