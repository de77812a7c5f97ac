"""`distft synthetic` / `python -m distft.synthetic OUT`: write the embedded synthetic instruction
tasks as JSONL (the library: distft/data/synthetic.py `generate`, torch-free). An unknown task is
argparse's usage error (exit 2), as any other bad argument."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from distft.commands import run_command
from distft.data.synthetic import DEFAULT_TASKS, TASKS, generate


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m distft.synthetic", description="Write the embedded synthetic dataset as JSON Lines."
    )
    parser.add_argument("out", help="output .jsonl path ('-' for stdout)")
    parser.add_argument("--num", type=int, default=3000, help="number of rows (default 3000)")
    parser.add_argument("--seed", type=int, default=1234, help="generator seed (default 1234)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated subset of: {', '.join(TASKS)} (default: {', '.join(DEFAULT_TASKS)})")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_synthetic, argv)


def _synthetic(argv: list[str]) -> int:
    command = parser()
    args = command.parse_args(argv)
    try:
        rows = generate(args.num, args.seed, [t for t in args.tasks.split(",") if t])
    except ValueError as err:
        command.error(str(err))
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out == "-":
        sys.stdout.write(lines)
    else:
        with open(args.out, "w") as f:
            f.write(lines)
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
