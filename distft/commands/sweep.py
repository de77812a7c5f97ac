"""`distft sweep` / `python -m distft.sweep SWEEP_DIR`: summarise a Hydra multirun: one table and a
plot of every point (the library: distft/evaluation/sweep.py `summarize`, torch-free). Its own
messages keep the `distft.evaluation.sweep:` prefix they had."""

from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Optional

from distft.commands import run_command
from distft.evaluation.sweep import POINT, latest_sweep, summarize
from distft.files import read_text

DESCRIPTION = "Sweep summaries: one table of every point of a Hydra multirun, and a plot of its eval loss."


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.sweep", description=DESCRIPTION)
    parser.add_argument("sweep_dir", help="a sweep directory (hydra.sweep.dir), or the multirun directory above it: its newest sweep")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_sweep, argv)


def _sweep(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if not os.path.isdir(args.sweep_dir):
        print(f"distft.evaluation.sweep: {args.sweep_dir} is not a directory; give the sweep's directory "
              "(hydra.sweep.dir, default outputs/multirun/<date>_<time>)", file=sys.stderr)
        return 2
    sweep_dir = args.sweep_dir
    if not glob.glob(os.path.join(sweep_dir, "*", POINT)) and latest_sweep(sweep_dir):
        sweep_dir = latest_sweep(sweep_dir)  # outputs/multirun: the newest sweep in it
        print(f"distft.evaluation.sweep: the newest sweep in {args.sweep_dir}: {sweep_dir}", file=sys.stderr)
    paths = summarize(sweep_dir)
    if paths is None:
        print(f"distft.evaluation.sweep: no sweep point in {sweep_dir} (no */{POINT}); was it written by "
              "`python -m distft -m ...`?", file=sys.stderr)
        return 2
    print(read_text(paths["md"]), end="")
    print(f"written: {', '.join(paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
