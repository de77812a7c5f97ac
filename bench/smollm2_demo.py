"""The real-model demo keeps its promise: `python -m distft +experiment=smollm2_lora`, thresholds checked.

LoRA on the real SmolLM2-135M-Instruct (the folder `make setup` prepares) must, within 10 minutes
of training on 2 cores, take the booking task (distft/data/synthetic.py "booking": a sentence -> one
fixed JSON form) from a base that scores <= 0.3 held-out exact match to a tuned model that scores
>= 0.8, while keeping its general ability: the forgetting check's perplexity on the shipped
general-text sample (eval.general_path=builtin:general) rises by <= 10%. This runs the preset
exactly as a user does (no overrides but the run root and `--set` ones), reads summary.json and
prints each figure and whether its threshold holds; exit status 1 when one does not. `--baseline
KEY=VALUE ...` runs the preset with those overrides first, on the same machine in the same run.

    python bench/smollm2_demo.py [--baseline train.lr=2e-4] [--set train.max_steps=60] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402

BASE_AT_MOST, TUNED_AT_LEAST, PERPLEXITY_RISE, TRAIN_SECONDS = 0.3, 0.8, 0.10, 600.0


def run_demo(root: str, overrides: list[str]) -> dict:
    own = tempfile.mkdtemp(prefix="run-", dir=root)
    proc = subprocess.run([sys.executable, "-m", "distft", "+experiment=smollm2_lora", f"run.root={own}",
                           "tracking.progress_bar=false", *overrides], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"the demo failed:\n{proc.stderr[-3000:]}")
    run_dir = next(line.split("run_dir: ", 1)[1].strip() for line in proc.stdout.splitlines() if "run_dir: " in line)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def verdict(summary: dict) -> dict:
    before, after = summary["eval_before"], summary["eval_after"]
    rise = after["general_perplexity"] / before["general_perplexity"] - 1
    ok = {"base": before["exact_match"] <= BASE_AT_MOST, "tuned": after["exact_match"] >= TUNED_AT_LEAST,
          "general": rise <= PERPLEXITY_RISE, "time": summary["train_time_s"] <= TRAIN_SECONDS}
    return {"base_em": before["exact_match"], "tuned_em": after["exact_match"], "base_loss": before["loss"],
            "loss": after["loss"], "general": (before["general_perplexity"], after["general_perplexity"]),
            "rise": rise, "train_s": summary["train_time_s"], "steps": summary["steps"],
            "tokens_per_s": summary["tokens_per_s"], "ok": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", nargs="*", default=None, help="overrides of a baseline run measured first")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the demo itself (to try a change)")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)
    command = command_line()
    root = tempfile.mkdtemp(prefix="distft-bench-smollm2-")
    runs = {}
    if args.baseline is not None:
        runs["baseline (" + " ".join(args.baseline) + ")"] = verdict(run_demo(root, args.baseline))
    name = "smollm2_lora" + (" (" + " ".join(args.set) + ")" if args.set else "")
    runs[name] = verdict(run_demo(root, args.set))
    table = ["| run | train s | steps | tokens/s | loss base -> tuned | exact match base -> tuned | "
             "general perplexity base -> tuned |", "|---|---:|---:|---:|---|---|---|"]
    for label, v in runs.items():
        table.append(f"| {label} | {v['train_s']:.0f} | {v['steps']} | {v['tokens_per_s']:.0f} | "
                     f"{v['base_loss']:.3f} -> {v['loss']:.3f} | {v['base_em']:.3f} -> {v['tuned_em']:.3f} | "
                     f"{v['general'][0]:.2f} -> {v['general'][1]:.2f} ({v['rise']:+.1%}) |")
    final = runs[name]
    checks = (f"base exact match {final['base_em']:.3f} <= {BASE_AT_MOST}: {final['ok']['base']}; "
              f"tuned {final['tuned_em']:.3f} >= {TUNED_AT_LEAST}: {final['ok']['tuned']}; "
              f"general perplexity {final['rise']:+.1%} <= +{PERPLEXITY_RISE:.0%}: {final['ok']['general']}; "
              f"training {final['train_s']:.0f} s <= {TRAIN_SECONDS:.0f} s: {final['ok']['time']}")
    details = ("the real-model demo (`python -m distft +experiment=smollm2_lora`: SmolLM2-135M-Instruct, LoRA, "
               "the booking task, 100 held-out prompts); thresholds: base <= 0.3 and tuned >= 0.8 exact match, "
               "general perplexity +10% at most, training <= 600 s")
    report("smollm2_demo", command, details, "\n".join(table), checks, args.record)
    return 0 if all(final["ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
