"""`distft chat` / `python -m distft.chat RUN_CHECKPOINT_OR_EXPORT`: talk to a checkpoint in the
terminal, rendered as training rendered. The terminal is here (prompts, messages read from stdin,
answers, streamed as they are decoded); loading the model and answering is
distft/evaluation/chat.py's, imported after the arguments are parsed (it imports torch), so a bad
flag value is one line and exit 2 at once. A message the template refuses, or one too long for the
model's context, is said and the conversation goes on; the first time a conversation loses its
oldest turns to the context, that is said once. Sampling without --seed picks a seed and names
it, so an answer worth keeping can be had again."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Optional

from distft.commands import run_command
from distft.errors import DataError


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.chat", description="Talk to a tuned model (or its base)")
    parser.add_argument("model", metavar="RUN_CHECKPOINT_OR_EXPORT")
    parser.add_argument("--base", action="store_true", help="talk to the untuned base instead")
    parser.add_argument("--max-new-tokens", type=_positive_int,
                        help="answer length in tokens (default: the run's eval.max_new_tokens; 256 for an export)")
    parser.add_argument("--temperature", type=_temperature, default=0.0,
                        help="0 (default): greedy, the evaluation's answers; above 0: sampled, more varied as it grows")
    parser.add_argument("--top-p", type=_top_p, default=1.0,
                        help="sampling draws from the likeliest tokens whose probabilities reach this (0 < p <= 1; "
                             "default 1: all)")
    parser.add_argument("--seed", type=_seed, help="sampling seed: the same seed and messages give the same answers "
                                                  "(default: a fresh one, named at the start)")
    parser.add_argument("--system", help="a system turn (chat models)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the model run its own Python code (never taken from a checkpoint)")
    return parser


def _number(text: str, kind, ok, wanted: str):
    """`text` as `kind` when `ok` of it, else argparse's usage error (one line, exit 2) saying what is wanted."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"{wanted}, not {text!r}")
    return value


def _temperature(text: str) -> float:
    return _number(text, float, lambda t: 0 <= t < float("inf"), "must be a number >= 0 (0: greedy)")


def _top_p(text: str) -> float:
    return _number(text, float, lambda p: 0 < p <= 1, "must be a number above 0 and at most 1 (1: every token)")


def _positive_int(text: str) -> int:
    return _number(text, int, lambda n: n > 0, "must be a whole number above 0")


def _seed(text: str) -> int:
    return _number(text, int, lambda n: 0 <= n < 2**63, "must be a whole number from 0 to 2**63 - 1")


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_chat, argv)


def _chat(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from distft.evaluation.chat import load  # lazy: torch (--help stays instant)

    seed = args.seed if args.seed is not None or not args.temperature else secrets.randbelow(2**31)
    chat = load(args.model, args.base, args.max_new_tokens, args.system, args.trust_remote_code, args.temperature,
                args.top_p, seed)
    tty = sys.stdin.isatty()
    how = ("a conversation: every turn is kept while it fits the model's context (/reset starts over)"
           if chat.template == "chat" else
           f"single instructions (template {chat.template}): each message is answered on its own; its first line "
           "is the instruction, the rest its input (end a line with \\ to go on)")
    answers = (f"answers sampled at temperature {args.temperature:g}, top-p {args.top_p:g}, seed {seed} (--seed {seed}"
               " gives them again)" if chat.sampling else "greedy answers, as the evaluation gives them")
    print(f"distft chat with {'the base of ' if args.base else ''}{args.model}: {how}; {answers}; /exit to leave",
          file=sys.stderr)
    while True:
        if tty:
            print("you> ", end="", flush=True, file=sys.stderr)
        message = next(_messages(_lines(sys.stdin, tty)), None)
        if message is None or message.strip() in ("/exit", "/quit"):
            return 0
        if message.strip() == "/reset":
            chat.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        try:
            turn = chat.fit(message)
        except DataError as err:
            print(f"distft: {err}", file=sys.stderr)
            continue
        if turn.dropped and not chat.trimmed:
            print(f"(earlier turns dropped: the conversation outgrew the model's context of {chat.context} tokens, "
                  f"{chat.max_new_tokens} of them kept for the answer; from here on the oldest turns go as new ones "
                  "come, without another note)", file=sys.stderr)
        print("model> ", end="", flush=True)
        _, cut = chat.answer(turn, stream=sys.stdout)
        print(f"  [cut at {chat.max_new_tokens} tokens: --max-new-tokens]" if cut else "", flush=True)


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
