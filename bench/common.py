"""What the bench/ scripts share: where results go and how a run is recorded."""

from __future__ import annotations

import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "RESULTS.md")
RESULTS_HEADER = """# Benchmark results

Sections appended by `python bench/<benchmark>.py --record`, newest last. Ratios against baselines
measured in the same run are the figures to compare across machines; absolute timings are not.
"""


def cpu_info() -> str:
    model, cores = "unknown CPU", os.cpu_count()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {cores} cores"


def record(name: str, command: str, details: str, table_md: str, summary: str) -> None:
    """Append a dated section to bench/RESULTS.md (every bench script's --record)."""
    new = not os.path.exists(RESULTS)
    with open(RESULTS, "a") as f:
        if new:
            f.write(RESULTS_HEADER)
        f.write(
            f"\n## {name} — {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n"
            f"- hardware: {cpu_info()}\n- command: `{command}`\n- {details}\n\n"
            f"{table_md}\n\n```\n{summary}\n```\n"
        )


def command_line() -> str:
    """How this benchmark was started, relative to the repository (for the record)."""
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def report(name: str, command: str, details: str, table_md: str, summary: str, keep: bool) -> None:
    """Print a benchmark's results; with `keep` (its --record) also append them to RESULTS.md."""
    print(f"command: {command}\n{details}\n\n{table_md}\n\n{summary}")
    if keep:
        record(name, command, details, table_md, summary)
        print(f"\nappended to {os.path.relpath(RESULTS, REPO)}")
