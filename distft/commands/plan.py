"""`distft plan` / `python -m distft.plan [OVERRIDE ...]`: per-GPU memory, time and advice for a
config, nothing started (the planner: distft/plan/). Its help lists each config group's choices
as conf/ has them; the planner (which imports torch for its meta build) is imported after that."""

from __future__ import annotations

import sys
from typing import Optional

from distft.commands import run_command
from distft.config import conf_dir
from distft.preflight import format_errors, preflight

HELP = """usage: python -m distft.plan [OVERRIDE ...]

Plan a run without starting it: exact parameter counts, per-GPU (and per-node) memory term by term
(weights, gradients, optimizer state, activations, overhead), whether it fits the cluster's GPUs
with plan.margin headroom and, when it does not, the single changes that make it fit; tokens/s and
time per epoch at an assumed plan.mfu. Nothing is allocated, downloaded or submitted.

It takes the overrides of a run (`python -m distft OVERRIDE ...`), the same Hydra syntax:
{groups}
  key=value             any setting, e.g. launcher.nnodes=2 launcher.nproc_per_node=8
                        train.micro_batch_size=4 data.max_seq_len=2048 train.gradient_checkpointing=true
  plan.format=json      the plan as JSON, for scripts (default: text)
  plan.margin=0.10      the share of a GPU's memory kept free (plan.mfu, plan.overhead_gb: the assumptions)

examples:
  python -m distft.plan +experiment=qlora_13b cluster=a100_40g_8x launcher.nproc_per_node=4 parallel=ddp
  python -m distft.plan model=llama_65b parallel=zero3 launcher.nnodes=2 launcher.nproc_per_node=8 \\
      train.micro_batch_size=1 cluster=a100_80g_8x plan.format=json

Exit status: 0 with the plan (fitting or not), 2 for a config error.
"""


def usage() -> str:
    """The help text, with each config group's choices read from conf/ (what the overrides may name)."""
    root = conf_dir()
    rows = []
    for group in ("experiment", "model", "technique", "parallel", "cluster", "data", "launcher"):
        names = sorted(p.stem for p in (root / group).glob("*.yaml"))
        key = f"+{group}=NAME" if group == "experiment" else f"{group}=NAME"
        rows.append(f"  {key:<21} {', '.join(names)}")
    return HELP.format(groups="\n".join(rows))


def main(argv: Optional[list[str]] = None) -> int:
    """The same command line as a run, nothing started; `-h`/`--help`: what it takes (`usage`)."""
    return run_command(_plan, argv, prefix="distft.plan")


def _plan(argv: list[str]) -> int:
    import json

    if "-h" in argv or "--help" in argv:
        print(usage(), end="")
        return 0
    # run_here=False: a plan is for the machines the config names, not for this one (a login node).
    cfg, errors = preflight(argv, run_here=False, command_line=True)
    if errors:
        print(format_errors(errors), file=sys.stderr)
        return 2
    from distft.plan.report import format_text, plan, quiet_meta_build  # lazy: torch (its meta build)

    quiet_meta_build()
    result = plan(cfg, argv=argv)
    print(json.dumps(result, indent=2) if cfg.plan.format == "json" else format_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
