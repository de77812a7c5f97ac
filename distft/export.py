"""`python -m distft.export CHECKPOINT --out DIR`: a standalone Hugging Face model from a run.

CHECKPOINT is a checkpoint directory or a run directory (its latest checkpoint). The result
loads with `AutoModelForCausalLM.from_pretrained(DIR)` (merged weights and the tokenizer); for
prefix/prompt tuning, which have no merged form, DIR holds `base/` and `adapter/` instead.
"""

from __future__ import annotations

import argparse
import sys

import torch

from distft.checkpoint import CheckpointError, export

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distft.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (uses its latest checkpoint)")
    parser.add_argument("--out", required=True, help="new or empty directory for the exported model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the exported weights")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, dtype=DTYPES[args.dtype])
    except CheckpointError as err:
        print(f"distft: {err}", file=sys.stderr)
        return 2
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
