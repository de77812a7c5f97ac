"""`distft chat` / `python -m distft.chat RUN_CHECKPOINT_OR_EXPORT`: talk to a checkpoint in the
terminal, rendered as training rendered. The terminal is here (prompts, messages read from stdin,
answers); loading the model and answering is distft/evaluation/chat.py's, imported after the
arguments are parsed (it imports torch). A message the template refuses is said and the
conversation goes on."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from distft.commands import run_command
from distft.errors import DataError


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.chat", description="Talk to a tuned model (or its base)")
    parser.add_argument("model", metavar="RUN_CHECKPOINT_OR_EXPORT")
    parser.add_argument("--base", action="store_true", help="talk to the untuned base instead")
    parser.add_argument("--max-new-tokens", type=int, help="answer length (default: the run's eval.max_new_tokens)")
    parser.add_argument("--system", help="a system turn (chat models)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model run its own Python code (never taken from a checkpoint)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_chat, argv)


def _chat(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from distft.evaluation.chat import load  # lazy: torch (--help stays instant)

    chat = load(args.model, args.base, args.max_new_tokens, args.system, args.trust_remote_code)
    tty = sys.stdin.isatty()
    how = ("a conversation: every turn is kept (/reset starts over)" if chat.template == "chat" else
           f"single instructions (template {chat.template}): each message is answered on its own; its first line "
           "is the instruction, the rest its input (end a line with \\ to go on)")
    print(f"distft chat with {'the base of ' if args.base else ''}{args.model}: {how}; /exit to leave", file=sys.stderr)
    while True:
        if tty:
            print("you> ", end="", flush=True, file=sys.stderr)
        message = next(_messages(_lines(sys.stdin, tty)), None)
        if message is None or message.strip() in ("/exit", "/quit"):
            return 0
        if message.strip() == "/reset":
            chat.history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        try:
            answer, cut = chat.reply(message)
        except DataError as err:
            print(f"distft: {err}", file=sys.stderr)
            continue
        print(f"model> {answer}" + (f"  [cut at {chat.max_new_tokens} tokens: --max-new-tokens]" if cut else ""),
              flush=True)


def _messages(stream):
    """Messages from `stream`: one per line; a line ending in a backslash continues on the next."""
    pending: list[str] = []
    for line in stream:
        line = line.rstrip("\n")
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        yield "\n".join([*pending, line])
        pending = []
    if pending:
        yield "\n".join(pending)


def _lines(stream, tty: bool):
    """The lines of one message: up to a line that does not end in a backslash."""
    while True:
        line = stream.readline()
        if not line:
            return
        yield line
        if not line.rstrip("\n").endswith("\\"):
            return
        if tty:
            print("...> ", end="", flush=True, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
