"""GPU: tokens/s, MFU and peak memory of LoRA and QLoRA (AdamW, and paged 8-bit AdamW) on
random-initialised LLaMA-7B, QLoRA 13B and full fine-tuning of 7B under FSDP (bf16 compute, fp32
masters), each against the planner's estimate for the same command line.

What it measures. Each configuration is a real `python -m distft` run on one GPU (bf16; the
architecture of the preset built from scratch with random weights, so nothing is downloaded,
with distft's offline tokenizer; the random weights drawn on the GPU, model.init_device=cuda, since
the CPU's serial generator takes minutes for 7B), `--steps` optimizer steps of `--micro` x `--seq` tokens. From
its summary.json and metrics.jsonl: tokens/s over the whole run and in steady state (the median
step after the first two, which pay for CUDA's and cuBLAS's start-up), MFU (against `--cluster`'s
peak) and the peak allocated CUDA memory of training; from `python -m distft.plan` with the same overrides: the planned per-GPU bytes
(without the fixed overhead) and the assumed-MFU tokens/s.

    memory ratio = measured peak / planned      throughput ratio = measured / planned tokens/s

Why. The planner is what users trust before submitting; this is where its GPU numbers are
checked against reality (the CPU check is in tests/distributed/test_memory.py).

Needs a CUDA GPU (about 20 GB for 7B LoRA at the defaults); refuses to run without one.

    python bench/gpu_llama.py [--steps 20] [--seq 2048] [--micro 1] [--cluster h100_80g_8x] \
        [--timeout 300] [--logs DIR] [--record]

`--logs DIR` keeps each run's output (DIR/<config>.log) and rewrites DIR/table.md after every
configuration, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402

CONFIGS = {
    "LLaMA-7B LoRA": ["model=llama_7b", "technique=lora"],
    "LLaMA-7B QLoRA": ["model=llama_7b", "technique=qlora"],
    "LLaMA-13B QLoRA": ["model=llama_13b", "technique=qlora"],
    # QLoRA's own optimizer. Its paged state lives in CUDA unified memory, outside PyTorch's
    # allocator: neither the measured peak nor the plan's total counts it (the plan shows it as
    # `paged`), so the ratio compares the same things.
    "LLaMA-7B QLoRA paged AdamW 8-bit": ["model=llama_7b", "technique=qlora", "train.optimizer=paged_adamw_8bit"],
    # The precision policy at 7B: fp32 master weights, gradients and AdamW state (16 bytes per
    # parameter, ~100 GiB), bf16 compute through FSDP2's MixedPrecisionPolicy, recomputed
    # activations. Needs a GPU of ~110 GiB (H200); on an 80 GB one the table says "failed".
    "LLaMA-7B full FSDP bf16 compute, fp32 masters": ["model=llama_7b", "technique=full", "parallel=fsdp",
                                                     "launcher.nproc_per_node=1", "train.precision=bf16",
                                                     "train.gradient_checkpointing=true"],
    # The same two runs with compiled decoder layers (train.compile=true), so one bench run shows
    # before and after: steady-state tokens/s exclude the first steps, which pay for the compile.
    "LLaMA-7B LoRA compiled": ["model=llama_7b", "technique=lora", "train.compile=true"],
    "LLaMA-7B QLoRA compiled": ["model=llama_7b", "technique=qlora", "train.compile=true"],
}


def overrides(args, root: str, config: list[str]) -> list[str]:
    return [*config, "model.name_or_path=null", "model.tokenizer=null", "model.init_device=cuda", "data=synthetic",
            f"data.max_seq_len={args.seq}", f"model.max_position_embeddings={max(args.seq, 2048)}",
            f"train.micro_batch_size={args.micro}", f"train.global_batch_size={args.micro}",
            f"train.max_steps={args.steps}", "train.warmup_steps=2", "train.eval_every=0", "train.log_every=1",
            "eval.compare_base=false", "eval.num_samples=1", "eval.max_new_tokens=1", "train.eval_max_batches=1",
            "checkpoint.save_every=0", "tracking.wandb.mode=disabled", f"cluster={args.cluster}",
            f"run.root={root}"]


def steady_tokens_per_s(run_dir: str, tokens_per_step: int) -> float | None:
    """tokens/s of the median optimizer step after the first two (from metrics.jsonl)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        times = [r["step_time_s"] for r in map(json.loads, f) if "step_time_s" in r and r.get("step", 0) > 2]
    return tokens_per_step / statistics.median(times) if times else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--cluster", default="h100_80g_8x", help="the profile whose peak TFLOP/s MFU uses")
    parser.add_argument("--only", nargs="*", default=list(CONFIGS), help="a subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--timeout", type=int, default=300, help="seconds one configuration may take")
    parser.add_argument("--logs", help="directory for each run's output and the table so far")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)
    command = command_line()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_llama.py needs a CUDA GPU; on the CPU see tests/distributed/test_memory.py")
    gib = 2**30
    rows = ["| config | tokens/s (run) | tokens/s (steady) | MFU (steady) | planned tokens/s at its MFU | peak GiB "
            "| planned GiB | peak / planned |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines = []
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        for name in args.only:
            cli = overrides(args, root, CONFIGS[name])
            planning = subprocess.run([sys.executable, "-m", "distft.plan", *cli, "plan.format=json"],
                                      capture_output=True, text=True, cwd=REPO)
            if planning.returncode != 0:
                rows.append(f"| {name} | plan failed: {planning.stderr.strip()[-120:]} | | | | | | |")
                print(rows[-1], flush=True)
                continue
            plan = json.loads(planning.stdout)
            planned = (plan["per_gpu_bytes"]["total"] - plan["per_gpu_bytes"]["overhead"]) / gib
            try:
                run = subprocess.run([sys.executable, "-m", "distft", *cli], capture_output=True, text=True,
                                     cwd=REPO, timeout=args.timeout)
                output, failed = run.stdout + run.stderr, run.returncode != 0
            except subprocess.TimeoutExpired as expired:
                output, failed = f"{expired.stdout or ''}{expired.stderr or ''}\ntimed out after {args.timeout} s", True
                output = output if isinstance(output, str) else output.decode(errors="replace")
            if args.logs:
                with open(os.path.join(args.logs, name.replace(" ", "_") + ".log"), "w") as f:
                    f.write(output)
            if failed:
                last = (output.strip().splitlines() or ["?"])[-1][:120].replace("|", "/")
                rows.append(f"| {name} | failed: {last} | | | | | | |")
            else:
                run_dir = next(line[9:] for line in run.stdout.splitlines() if line.startswith("run_dir: "))
                with open(os.path.join(run_dir, "summary.json")) as f:
                    summary = json.load(f)
                peak = max(summary["memory"]["training_gb_per_rank"])
                steady = steady_tokens_per_s(run_dir, args.micro * args.seq) or summary["tokens_per_s"]
                steady_mfu = (summary["mfu"] or 0) * steady / summary["tokens_per_s"]
                rows.append(f"| {name} | {summary['tokens_per_s']:,.0f} | {steady:,.0f} | {steady_mfu:.1%} | "
                            f"{plan['throughput']['tokens_per_s'] or 0:,.0f} | {peak:.2f} | {planned:.2f} | "
                            f"{peak / planned:.2f} |")
                lines.append(f"{name}: peak / planned = {peak / planned:.2f}, steady MFU {steady_mfu:.1%}, "
                             f"steady tokens/s / planned = {steady / (plan['throughput']['tokens_per_s'] or 1):.2f}")
            print(rows[-1], flush=True)
            if args.logs:
                with open(os.path.join(args.logs, "table.md"), "w") as f:
                    f.write("\n".join(rows + [""] + lines) + "\n")
    table = "\n".join(rows)
    details = (f"GPU: {torch.cuda.get_device_name(0)}; random-initialised architectures, bf16, {args.micro} x "
               f"{args.seq} tokens per step, {args.steps} steps; MFU against cluster={args.cluster}")
    summary_text = "\n".join(lines)
    report("gpu_llama", command, details, table, summary_text, args.record)


if __name__ == "__main__":
    main()
