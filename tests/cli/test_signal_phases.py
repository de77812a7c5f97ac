"""A stop signal during start-up, in a fresh `python -m distft` (before Hydra composes anything),
is not fatal (distft/preemption.py).

The in-process tests: tests/unit/test_signal_phases.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.distributed.helpers import REPO
from tests.unit.test_signal_phases import FAST


def test_a_stop_signal_during_start_up_is_not_fatal(tmp_path):
    """Sent before Hydra composes the config (the process's first instant with our handler):
    the run stops before its first step with exit 4, one line, no traceback; SIGTERM instead is
    the default action (the process ends at once, killed by it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    args = [sys.executable, "-m", "distft", *FAST, f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**env, "DISTFT_FAULTS":
                          "signal_at:start-up:USR2"}, timeout=300)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "received SIGUSR2 during start-up: stopping before the first step" in proc.stderr
    assert "stopped before its first step by SIGUSR2" in proc.stderr and "Traceback" not in proc.stderr
    term = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env={**env, "DISTFT_FAULTS":
                          "signal_at:loading:TERM"}, timeout=300)
    assert term.returncode == -signal.SIGTERM, term.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.lock").read_text())["pid"] > 0  # left by a killed run: stale

