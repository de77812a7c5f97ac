"""`python -m distft.data OVERRIDE ...`: a run's data prepared on a login node, without training
(issue 18, scope 5): the report a run logs, the first dropped row of each kind, the files'
fingerprint; bad data ends in one message and exit 2."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = ["data.source=jsonl", "data.template=alpaca_short", "data.max_seq_len=128"]


def _data(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.data", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_prepares_and_reports_the_data_as_a_run_would(tmp_path):
    from distft.data.pipeline import prepare_data
    from distft.model.build import load_tokenizer
    from distft.preflight import preflight

    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(300)]
    lines = [json.dumps(r) for r in rows] + [json.dumps(rows[5]), '{"instruction": "", "input": "", "output": ""}']
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = _data(*DATA, f"data.path={path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    cfg, errors = preflight([*DATA, f"data.path={path}"], run_here=False)
    assert not errors
    expected = prepare_data(cfg.data, load_tokenizer(cfg.model), seed=cfg.data.seed).report
    assert out[0] == expected.summary() and "loaded 302 rows, dropped 2 (malformed 0, empty 1, duplicate 1" in out[0]
    assert any(line.startswith("data: first duplicate row dropped: row 300 (line 301) of ") for line in out), out
    assert any(line.startswith("data: first empty row dropped: row 301 (line 302) of ") for line in out), out
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert out[-1] == f"data.path: {path} ({path.stat().st_size} bytes, sha256 {digest})"


def test_bad_data_is_one_message_and_exit_2_and_help_is_help(tmp_path):
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text("{\n[1, 2]\n")
    proc = _data(*DATA, f"data.path={only_bad}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distft: ")]
    assert len(errors) == 1 and "no training rows left after cleaning data.path=" in errors[0], proc.stderr
    shown = _data("--help", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: python -m distft.data [OVERRIDE ...]")
