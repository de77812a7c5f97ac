"""`distft review` / `python -m distft.review RUN_OR_COMPARE_DIR`: read predictions side by side on a
local page and rate them blind (the library: distft/evaluation/review.py, torch-free). Besides the
user errors every command reports, a port that cannot be served on is one line and exit 2; Ctrl-C
stops the server (exit 0)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from distft.commands import run_command
from distft.evaluation.review import (
    RATINGS,
    Review,
    exposure_warning,
    make_server,
    read_ratings,
    review_url,
    summary_text,
)
from distft.files import describe


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distft.review",
                                     description="Read predictions side by side and rate them blind, in a local page "
                                                 "for you only: its printed URL carries a token every request needs")
    parser.add_argument("directory", metavar="RUN_OR_COMPARE_DIR")
    parser.add_argument("--predictions", help="a predictions file (default: the directory's)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a random free one)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only); another one serves the page to "
                             "whoever can reach it and has the printed URL (the token is always required)")
    parser.add_argument("--summary", action="store_true", help="print the ratings' summary and exit")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(_review, argv)


def _review(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    directory = os.path.abspath(os.path.expanduser(args.directory))
    predictions = os.path.abspath(os.path.expanduser(args.predictions)) if args.predictions else None
    try:
        if args.summary:
            print(summary_text(read_ratings(os.path.join(directory, RATINGS))))
            return 0
        review = Review(directory, predictions)
        server = make_server(review, args.host, args.port)
    except OSError as err:  # the port is taken, the address is not this machine's
        print(f"distft: cannot serve on {args.host}:{args.port}: {describe(err)}", file=sys.stderr)
        return 2
    warning = exposure_warning(args.host)
    if warning:
        print(f"distft: warning: {warning}", file=sys.stderr)
    print(f"review: {review_url(server, args.host)} ({len(review.records)} prompts, models "
          f"{', '.join(review.labels)}; ratings go to {review.ratings_path}); Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
