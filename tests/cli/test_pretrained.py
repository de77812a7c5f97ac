"""`python -m distft.pretrained convert` refuses an existing folder (issue 35).

The in-process tests: tests/unit/test_pretrained.py."""

from __future__ import annotations

import os
import subprocess
import sys

from distft.model.pretrained import smollm2_gguf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_converting_into_an_existing_folder_is_refused(smollm2, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distft.pretrained", "convert", smollm2_gguf(), str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"distft: {tmp_path} exists already; choose a new folder for the converted model"

