"""One real `python -m distft` with odd overrides (issue 13): exit 2, one line each, no traceback.

The in-process tests: tests/unit/test_overrides.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# --- the real command line ---------------------------------------------------------------------


def test_python_m_distft_answers_bad_overrides_with_exit_2_and_one_line_each(tmp_path):
    cases = {
        "train.lr": "train.lr=" + "9" * 400,
        "train.grad_clip": "train.grad_clip=nan",
        "data.path": "data.path=my.jsonl",
        "run.experiment": "run.experiment=" + "e" * 300,
        "train.device": "train.device=cuda",
        "launcher.signal": "launcher.signal=KILL",
        "train.seed": "train.seed=-1",
        "data.eval_size": "data.eval_size=0",
        "data.augment.functions": "data.augment.functions=[{_target_: os.system}]",
    }
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}  # no GPU, on any machine
    out = subprocess.run([sys.executable, "-m", "distft", *cases.values(), "train.max_steps=1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert lines[0] == f"distft: {len(cases)} problem(s) in the configuration:", out.stderr
    for key in cases:  # each case its own line, in the order the checks run
        assert sum(line.startswith(f"  - {key}") for line in lines[1:-1]) == 1, (key, out.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing was started, nothing written

