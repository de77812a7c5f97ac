"""`distft export` / `python -m distft.export CHECKPOINT --out DIR`: write a checkpoint as a
standalone Hugging Face model, adapter or merged (the library: distft/checkpoint/export.py, which
imports torch, so it is imported after the arguments are parsed; `DTYPE_CHOICES` are the names of
its `DTYPES`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from distft.commands import run_command

DESCRIPTION = ("`python -m distft.export CHECKPOINT --out DIR`: a standalone Hugging Face model from a run, or with "
               "--format gguf one GGUF file for llama.cpp and an Ollama Modelfile.")
GGUF_TYPES = ("f16", "bf16", "q8_0")  # distft.checkpoint.gguf.GGUF_TYPES
DTYPE_CHOICES = ("bfloat16", "float16", "float32")  # sorted(distft.checkpoint.export.DTYPES)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.export", description=DESCRIPTION)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (uses its latest checkpoint)")
    parser.add_argument("--out", required=True, help="new or empty directory for the exported model")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="dtype of the exported weights (default: the base model's, as it was distributed; "
                             "float32 for a from-scratch model)")
    parser.add_argument("--format", choices=("hf", "gguf"), default="hf",
                        help="hf: safetensors for transformers (default); gguf: one .gguf file for llama.cpp and "
                             "Ollama, with a Modelfile (`ollama create NAME -f DIR/Modelfile`)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=None,
                        help="with --format gguf: f16 (default), bf16, or q8_0 (8-bit blocks, about half f16's size)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the base model run its own Python code (never taken from the checkpoint)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_export, argv)


def _export(argv: list[str]) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.format == "gguf" and args.dtype:
        cli.error("--dtype is for --format hf; a GGUF's type is --gguf-type (f16, bf16, q8_0)")
    if args.format != "gguf" and args.gguf_type:
        cli.error("--gguf-type needs --format gguf")
    from distft.checkpoint.export import DTYPES, export  # lazy: torch (--help stays instant)

    out = export(args.checkpoint, args.out, dtype=DTYPES.get(args.dtype), trust_remote_code=args.trust_remote_code,
                 fmt=args.format, gguf_type=args.gguf_type or "f16")
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
