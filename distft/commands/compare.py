"""`distft compare` / `python -m distft.compare RUN_OR_CHECKPOINT ...`: score several checkpoints or
runs on the same prompts, one report (the library: distft/evaluation/compare.py `compare`,
imported after the arguments are parsed: it imports torch)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from distft.commands import run_command


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.compare",
                                     description="Score several models on the same prompts and write one report")
    parser.add_argument("models", nargs="+", metavar="RUN_OR_CHECKPOINT",
                        help="run directories (their best or newest checkpoint) or checkpoint directories")
    parser.add_argument("--prompts", help="a file of held-out rows (alpaca/chat/ShareGPT, or {prompt, reference}); "
                                          "default: the first model's held-out split")
    parser.add_argument("--out", help="output directory (default: ./compare-<time>)")
    parser.add_argument("--no-base", action="store_true", help="leave out the first model's untuned base")
    parser.add_argument("--num-samples", type=int, help="prompts to score (default: the first run's eval.num_samples; "
                                                        "with --prompts, all)")
    parser.add_argument("--max-new-tokens", type=int, help="answer length (default: the first run's)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let base models run their own Python code (never taken from a checkpoint)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_compare, argv)


def _compare(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from distft.evaluation.compare import compare  # lazy: torch (--help stays instant)

    out = args.out or os.path.join(os.getcwd(), time.strftime("compare-%Y%m%d-%H%M%S"))
    summary = compare(args.models, out, args.prompts, not args.no_base, args.num_samples, args.max_new_tokens,
                      args.trust_remote_code)
    print(f"report: {summary['report']}")
    print(f"predictions: {summary['predictions']}")
    for model in summary["models"]:
        metrics = model["metrics"]
        shown = " ".join(f"{k}={metrics[k]:.4f}" for k in ("loss", "exact_match", "f1", "rouge_l")
                         if metrics.get(k) is not None)
        print(f"{model['label']}: {shown or 'answers only'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
