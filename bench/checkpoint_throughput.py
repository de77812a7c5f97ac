"""Checkpoint throughput: distft's save and verified load against plain sequential disk I/O, on the CPU.

What it measures. A from-scratch LLaMA (~100 MB of fp32 weights by default) with full fine-tuning and
one AdamW step (so the Adam moments exist) is checkpointed with `distft.checkpoint.store.save_checkpoint`:
sharded state through torch.distributed.checkpoint, RNG, the Hugging Face copy under model/, a sha256
manifest and the commit marker. In the same run, on the same filesystem, the same number of bytes is
written with plain sequential `f.write` of 4 MiB chunks and one fsync, and read back in 4 MiB chunks.

    save / seq write = baseline write time / save_checkpoint time (same bytes)
    load / seq read  = baseline read time / (verify + engine.load_state) time (same bytes)
    async blocked    = baseline write time / time save_checkpoint(background=True) blocks

`engine.save_state` alone (the sharded state, no HF copy, no hashing) is timed too, which shows what
the manifest hashing and the HF copy add. `checkpoint.async_save` is timed as the trainer sees it:
how long `save_checkpoint(background=True)` blocks (staging the state in host memory, the HF copy,
RNG), and the time until `commit_checkpoint` returns with nothing else running (an upper bound:
in training the write overlaps steps). Every figure is the median of `--reps` repetitions; the
baseline and the save are interleaved so that background load affects both alike.

Why. A checkpoint should cost about what the disk costs; a ratio far below 1 points at overhead
(hashing, pickling, copies) rather than at the disk. Ratios are comparable across machines,
absolute timings are not.

Caveats. The page cache is not dropped (that needs root): the reads, baseline and checkpoint alike,
come from memory right after the writes, so the load ratio compares CPU-side read paths (and the
sha256 of `verify`), not the disk. The baseline fsyncs its file; DCP fsyncs its shards, the HF copy
is written without fsync, so the save is timed as distft does it.

    python bench/checkpoint_throughput.py [--dir /tmp] [--layers 2] [--hidden 1024] [--reps 3] [--record]

`--record` appends a dated section (date, CPU, command, table) to bench/RESULTS.md; without it
nothing is written outside the temporary directory, which is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402

CHUNK = 4 << 20  # 4 MiB, as distft's own hashing reads


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(parent, n)) for parent, _, names in os.walk(path) for n in names)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(seconds, result) of `fn(*args)`."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def seq_write(path: str, nbytes: int, block: bytes) -> None:
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(block if left >= len(block) else block[:left])
        f.flush()
        os.fsync(f.fileno())


def seq_read(path: str) -> int:
    buf = bytearray(CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def build(args, run_root: str):
    """(cfg, tokenizer, engine) for a full fine-tune of the enlarged tiny model, after one AdamW step."""
    import torch

    from distft.engines import build_engine, build_model_for_engine
    from distft.model.build import load_tokenizer, resolve_dtype
    from distft.preflight import preflight

    overrides = [
        "+experiment=tiny_full",
        f"run.root={run_root}",
        f"model.hidden_size={args.hidden}",
        f"model.intermediate_size={args.intermediate}",
        f"model.num_hidden_layers={args.layers}",
        f"model.num_attention_heads={args.heads}",
        "model.dtype=float32",
        "train.device=cpu",
        "checkpoint.keep_last=1000",  # no retention while timing
    ]
    cfg, errors = preflight(overrides)
    if errors or cfg is None:
        raise SystemExit("preflight refused the benchmark config:\n  " + "\n  ".join(errors))
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg.model)
    model, _ = build_model_for_engine(cfg, resolve_dtype(cfg.model.dtype, device), tokenizer, world_size=1)
    engine = build_engine(cfg, model, device)
    for param in engine.unwrapped().parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    engine.step()  # allocates the Adam moments, advances the schedule
    return cfg, tokenizer, engine


def run(args) -> tuple[list[tuple[str, int, float, float]], dict]:
    """Rows (name, bytes, median seconds, ratio to its baseline) and facts about the model."""
    from distft.checkpoint import store as checkpoint

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave the output
    except ImportError:
        pass

    parent = os.path.abspath(args.dir)
    work = tempfile.mkdtemp(prefix="distft-ckpt-bench-", dir=parent)
    try:
        run_dir = os.path.join(work, "run")
        cfg, tokenizer, engine = build(args, run_dir)
        n_params = sum(p.numel() for p in engine.unwrapped().parameters())
        trainer_state = {"step": 1, "loop": {}, "data": {}, "world_size": 1, "parallel": "single"}

        # Warm-up save: fixes the byte count the baseline writes and pays one-time costs (imports).
        first = checkpoint.save_checkpoint(run_dir, 1, engine, tokenizer, cfg, trainer_state, None)
        total = dir_bytes(first)
        block = os.urandom(CHUNK)

        write_t, save_t, state_t, state_bytes = [], [], [], 0
        blocked_t, async_t = [], []
        ckpts = []
        for rep in range(args.reps):
            seconds, _ = timed(seq_write, os.path.join(work, f"baseline_{rep}.bin"), total, block)
            write_t.append(seconds)
            seconds, ckpt = timed(
                checkpoint.save_checkpoint, run_dir, 2 + rep, engine, tokenizer, cfg, trainer_state, None
            )
            save_t.append(seconds)
            ckpts.append(ckpt)
            # checkpoint.async_save: what the training thread waits for, then the background rest.
            seconds, pending = timed(
                checkpoint.save_checkpoint, run_dir, 100 + rep, engine, tokenizer, cfg, trainer_state, None, True
            )
            blocked_t.append(seconds)
            async_t.append(seconds + timed(checkpoint.commit_checkpoint, pending)[0])
            shutil.rmtree(pending.final)
            state_dir = os.path.join(work, f"state_only_{rep}")
            state_t.append(timed(engine.save_state, state_dir)[0])
            state_bytes = dir_bytes(state_dir)
            if rep:  # only the newest baseline file is kept: it is read back below
                os.remove(os.path.join(work, f"baseline_{rep - 1}.bin"))
        baseline = os.path.join(work, f"baseline_{args.reps - 1}.bin")

        read_t, verify_t, load_t = [], [], []
        for ckpt in ckpts:
            read_t.append(timed(seq_read, baseline)[0])
            seconds, problems = timed(checkpoint.verify, ckpt)
            if problems:
                raise SystemExit(f"verify found problems in a fresh checkpoint {ckpt}: {problems}")
            verify_t.append(seconds)
            load_t.append(timed(engine.load_state, os.path.join(ckpt, checkpoint.STATE_DIR))[0])
        ckpt_bytes = {dir_bytes(c) for c in ckpts}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    w, s, st = med(write_t), med(save_t), med(state_t)
    r, v, ld = med(read_t), med(verify_t), med(load_t)
    vl = med(a + b for a, b in zip(verify_t, load_t))
    state_base = w * state_bytes / total  # the baseline's time for the state's bytes
    rows = [
        ("seq write (4 MiB + fsync)", total, w, 1.0),
        ("save_checkpoint", total, s, w / s),
        ("  engine.save_state only", state_bytes, st, state_base / st),
        ("async save: training blocked", total, med(blocked_t), w / med(blocked_t)),
        ("async save: until committed", total, med(async_t), w / med(async_t)),
        ("seq read (4 MiB, page cache)", total, r, 1.0),
        ("  checkpoint.verify", total, v, r / v),
        ("  engine.load_state", state_bytes, ld, r * state_bytes / total / ld),
        ("verify + load_state", total, vl, r / vl),
    ]
    facts = {
        "params": n_params,
        "weights_mb": n_params * 4 / 1e6,
        "checkpoint_bytes": total,
        "sizes_equal": ckpt_bytes == {total},
        "dir": parent,
        "reps": args.reps,
    }
    return rows, facts


def table(rows: list[tuple[str, int, float, float]]) -> str:
    lines = [
        "| phase | MB | median s | MB/s | vs baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, nbytes, seconds, ratio in rows:
        lines.append(f"| {name} | {nbytes / 1e6:.1f} | {seconds:.3f} | {nbytes / 1e6 / seconds:.0f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="parent of the temporary run root (the disk)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816, help="a multiple of 64")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)
    command = command_line()

    rows, facts = run(args)
    ratios = {name: ratio for name, _, _, ratio in rows}
    summary = (
        f"save / seq write = {ratios['save_checkpoint']:.2f}   "
        f"(state only {ratios['  engine.save_state only']:.2f})\n"
        f"async blocked    = {ratios['async save: training blocked']:.2f}   "
        f"(until committed {ratios['async save: until committed']:.2f})\n"
        f"load / seq read  = {ratios['verify + load_state']:.2f}   "
        f"(verify {ratios['  checkpoint.verify']:.2f}, load_state {ratios['  engine.load_state']:.2f})"
    )
    details = (
        f"model: {facts['params'] / 1e6:.1f}M params ({facts['weights_mb']:.0f} MB fp32), full fine-tune, "
        f"1 AdamW step; checkpoint {facts['checkpoint_bytes']:,} bytes"
        f"{'' if facts['sizes_equal'] else ' (sizes varied between repetitions)'}; "
        f"median of {facts['reps']}; filesystem of {facts['dir']}; page cache not dropped"
    )
    report("checkpoint_throughput", command, details, table(rows), summary, args.record)


if __name__ == "__main__":
    main()
