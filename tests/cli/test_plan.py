"""`python -m distft.plan`: JSON for scripts and nothing else.

The in-process tests: tests/unit/test_plan.py."""

from __future__ import annotations

from tests.unit.test_plan import planned


def test_the_command_line_prints_json_for_scripts_and_nothing_else():
    """`python -m distft.plan ... plan.format=json | jq`: stdout is the plan alone, and the libraries'
    hints from building a 4-bit model on the meta device do not reach stderr either."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "distft.plan", "+experiment=qlora_13b", "cluster=a100_40g_8x",
                           "plan.format=json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["params_trainable"] == planned("+experiment=qlora_13b", "cluster=a100_40g_8x")["params_trainable"]
    assert result["fits"] is True
    assert done.stderr == ""
    bad = subprocess.run([sys.executable, "-m", "distft.plan", "cluster=no_such_cluster"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and "no_such_cluster" in bad.stderr

