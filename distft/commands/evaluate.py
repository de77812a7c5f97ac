"""`distft evaluate` / `python -m distft.evaluate CHECKPOINT`: score a checkpoint against its base:
loss, perplexity, ROUGE/F1/EM, samples (the library: distft/evaluation/evaluate.py
`evaluate_checkpoint`, imported after the arguments are parsed: it imports torch)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from distft.commands import run_command
from distft.tracking import quiet_libraries, setup_logging


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.evaluate",
                                     description="Score a checkpoint against its base and write eval_report.md")
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (uses its latest checkpoint)")
    parser.add_argument("--out", help="report path, outside the checkpoint (default: <run_dir>/evals/<checkpoint>/"
                                      "eval_report.md; for a checkpoint outside a run: ./evals/<checkpoint>/...)")
    parser.add_argument("--num-samples", type=int, help="held-out prompts to generate for (default: the run's)")
    parser.add_argument("--no-base", action="store_true", help="score the tuned model only")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the base model run its own Python code (never taken from the checkpoint)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_evaluate, argv)


def _evaluate(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    # The progress of a slow generation (tracking.GenerationProgress) and the threads line, on
    # stderr: stdout is the command's result (report:, predictions:, then the metrics).
    setup_logging(stream=sys.stderr)
    quiet_libraries()
    # lazy: torch (--help stays instant)
    from distft.evaluation.evaluate import evaluate_checkpoint
    from distft.evaluation.report import predictions_path

    out, after, _ = evaluate_checkpoint(args.checkpoint, args.out, args.num_samples, not args.no_base,
                                        trust_remote_code=args.trust_remote_code)
    print(f"report: {out}")
    print(f"predictions: {predictions_path(out)}")
    print(" ".join(f"{k}={after[k]:.4f}" for k in ("loss", "perplexity", "exact_match", "f1", "rouge_l")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
