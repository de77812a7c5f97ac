"""A tokenizer longer than the model's embedding: the command line refuses in one line, without a
traceback.

The in-process tests: tests/unit/test_vocab.py."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.unit import test_vocab as unit
from tests.unit.test_vocab import ROWS, TOKENS

path_model = unit.path_model  # tests/unit/test_vocab.py's module-scoped fixture, set up again for this module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_command_line_refuses_in_one_line_without_a_traceback(path_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distft", "+experiment=tiny_lora", f"model.name_or_path={path_model}",
                           f"run.root={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "run_dir:" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "distft: 1 problem(s) in the configuration:"
    assert lines[1].startswith(f"  - the tokenizer of model.name_or_path={path_model!r} has {TOKENS} tokens, more "
                               f"than the {ROWS} embedding rows") and "use technique=full" in lines[1]
    assert not os.listdir(tmp_path)  # nothing started

