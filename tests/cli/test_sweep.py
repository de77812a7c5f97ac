"""The sweep summary through `python -m distft.sweep` and a real multirun: a reused sweep directory
summarized for its latest sweep alone, and a point whose run directory is in use failing alone.

The in-process tests: tests/unit/test_sweep.py."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from distft.evaluation.sweep import (
    collect,
    first_failure,
    latest_sweep,
    start_sweep,
    summarize,
    sweep_id,
)
from distft.preflight import preflight
from tests.distributed.helpers import REPO
from tests.unit.test_sweep import _point


def test_a_reused_sweep_directory_summarizes_only_its_latest_sweep(tmp_path):
    sweep = str(tmp_path / "multirun" / "mine")
    first = start_sweep(sweep)
    for job, lr in enumerate(["0.001", "0.002", "0.003"]):
        _point(tmp_path, sweep, job, lr, loss=1.0 + job)
    second = start_sweep(sweep)
    assert second != first and sweep_id(sweep) == second
    _point(tmp_path, sweep, 0, "0.01", loss=5.0)  # the second sweep: one point, worse than all of the first's
    _point(tmp_path, sweep, 1, "0.02", loss=6.0)
    _, rows = collect(sweep)
    assert [(r["job"], r["train.lr"]) for r in rows] == [(0, "0.01"), (1, "0.02")]
    markdown = open(summarize(sweep)["md"]).read()
    assert "2 points, 2 complete" in markdown and "0.003" not in markdown
    # `python -m distft.sweep <multirun>`: the newest sweep directory in it.
    older = str(tmp_path / "multirun" / "older")
    start_sweep(older)
    os.utime(os.path.join(older, "sweep.json"), (1, 1))
    assert latest_sweep(str(tmp_path / "multirun")) == sweep
    again = subprocess.run([sys.executable, "-m", "distft.sweep", str(tmp_path / "multirun")], capture_output=True,
                           text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert f"the newest sweep in {tmp_path / 'multirun'}: {sweep}" in again.stderr and "| 0 | 0.01 | complete" in \
        again.stdout


def test_a_point_whose_run_directory_is_in_use_fails_alone_and_the_others_run(tmp_path):
    """Issue 34: with Hydra's basic launcher (the default for -m) every point runs in the sweep's
    process, and a point that met another run holding its run directory exited, which ended the
    whole sweep: the points after it never ran, no summary. Now that point is recorded failed,
    naming the holder, the other points run to completion, the summary says which failed and
    why, and the sweep exits 1 at the end, its last line naming the failed point."""
    import socket

    from distft.config import run_dir
    from distft.runlock import acquire

    shared = [f"run.root={tmp_path / 'runs'}", "tracking.wandb.mode=disabled", "tracking.progress_bar=false",
              "train.max_steps=2", "eval.num_samples=2", "eval.max_new_tokens=2", "train.eval_max_batches=1",
              "data.synthetic.num_examples=300"]
    busy, free = (run_dir(preflight([*shared, f"train.lr={lr}"])[0]) for lr in ("0.001", "0.002"))
    sweep = tmp_path / "sweep"
    with acquire(busy):  # this process is the other run
        proc = subprocess.run([sys.executable, "-m", "distft", "-m", *shared, "train.lr=0.001,0.002",
                               f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(free, "summary.json")) and not os.path.exists(os.path.join(busy, "summary.json"))
    in_use = f"RunInUse: run directory {busy} is in use by another run of this config: pid {os.getpid()} on " \
             f"{socket.gethostname()}, since "
    assert first_failure(str(sweep / "0"))["error"].startswith(in_use)
    _, rows = collect(str(sweep))
    assert [row["status"][: len("failed: ") + len(in_use)] for row in rows] == ["failed: " + in_use, "complete"]
    markdown = (sweep / "summary.md").read_text()
    assert "2 points, 1 complete, 1 failed; best eval loss first." in markdown and f"failed: {in_use}" in markdown
    with open(sweep / "summary.csv") as f:
        assert [r["status"].startswith("failed: " + in_use) for r in csv.DictReader(f)] == [True, False]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("distft: sweep point")]
    assert len(said) == 1 and said[0].startswith(f"distft: sweep point 0 (train.lr=0.001) failed: {in_use}"), said
    assert said[0].endswith(f"; 1 of 2 points failed: see {sweep / 'summary.md'}")

