"""`python -m distft.plan --help`: help, not a plan (issue 17, item 11)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_plan_help_prints_usage_and_exits_0_without_planning(capsys):
    """`--help` (a real `python -m distft.plan` process) and `-h` print what the planner takes
    (the groups' choices as conf/ has them, key=value settings, plan.format) and an example, and
    exit 0; no plan is computed. Before, `--help` went to Hydra as an override and a plan of the
    default config came out instead."""
    proc = subprocess.run([sys.executable, "-m", "distft.plan", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: python -m distft.plan [OVERRIDE ...]\n"), out
    assert "python -m distft.plan +experiment=qlora_13b cluster=a100_40g_8x launcher.nproc_per_node=4" in out
    model_row = next(line for line in out.splitlines() if line.lstrip().startswith("model=NAME"))
    models = sorted(name[:-5] for name in os.listdir(os.path.join(REPO, "conf", "model")) if name.endswith(".yaml"))
    assert model_row.split(None, 1)[1] == ", ".join(models)
    assert "plan.format=json" in out and "parameters:" not in out and "per GPU" not in out
    from distft.commands.plan import main, usage

    assert main(["-h"]) == 0
    assert capsys.readouterr().out == out == usage()
