"""`distft data` / `python -m distft.data [OVERRIDE ...]`: prepare a run's data ahead of a job:
clean, template, tokenize, cache, report (the library: distft/data/pipeline.py, cache.py). The
tokenizer and the pipeline (torch) are imported after `--help` and the config check."""

from __future__ import annotations

import sys
from typing import Optional

from distft.commands import run_command
from distft.data.sources import data_fingerprint
from distft.preflight import format_errors, preflight

USAGE = """usage: python -m distft.data [OVERRIDE ...]

Prepare a run's data without training, with the same overrides as the run (`python -m distft
OVERRIDE ...`): load, clean, template, tokenize and pack it exactly as every rank will, write it to
the tokenized-data cache (data.cache_dir, by default <run.root>/data-cache) or find it there, and
print the data report (rows loaded, dropped by kind with the first of each, kept, sequences,
tokens, packing), where the cache is, and the data files' fingerprint that checkpoints record.
What to run on a login node before submitting: a data problem ends here, in one message, not in
a queued job, and the job's ranks start from the cache instead of tokenizing.

Exit status: 0 with the report, 2 for a config, tokenizer or data error.
"""


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m distft.data [overrides]` (USAGE)."""
    return run_command(_data, argv)


def _data(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(USAGE, end="")
        return 0
    cfg, errors = preflight(argv, run_here=False, command_line=True)
    if errors:
        print(format_errors(errors), file=sys.stderr)
        return 2
    # lazy: numpy and torch, after --help and the config check
    from distft.data.cache import prepared_for_run
    from distft.model.build import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    fingerprint = data_fingerprint(cfg.data)
    _report_cached(cfg, prepared_for_run(cfg, tokenizer))
    for key, found in fingerprint.items():
        print(f"{key}: {found['path']} ({found['bytes']} bytes, sha256 {found['sha256']})")
    if not fingerprint:
        print("data files: none (data.source=synthetic: the config defines the rows)")
    return 0


def _report_cached(cfg, cached) -> None:
    data = cached.data
    print(data.report.summary())
    if cached.path:
        print(f"cache: {'built' if cached.built else 'found'} {cached.path} ({cached.seconds:.1f} s)")
    else:
        print("cache: none (data.cache=false: every rank prepares the data itself)")
    for level, line in data.report.notes(cfg.data):
        print(f"{'warning: ' if level == 'warning' else ''}{line}")


if __name__ == "__main__":
    sys.exit(main())
