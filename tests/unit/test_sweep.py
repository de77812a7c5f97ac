"""The sweep summary's bookkeeping, without a cluster: a failed point's first error (a rank's own,
not a peer's lost connection; the launcher's when no rank could write one), `incomplete` only
for a point still running, and a reused sweep directory summarized for its latest sweep alone.
Ending a sweep without sacct and recording these for real: tests/slurm (the failing sweep).

The tests that start a process: tests/cli/test_sweep.py."""

from __future__ import annotations

import csv
import json
import os
import time

from distft.evaluation.sweep import (
    collect,
    error_line,
    first_failure,
    lost_peer,
    record_failure,
    start_sweep,
    summarize,
    sweep_id,
    write_point,
)
from distft.preflight import preflight


def _point(tmp_path, sweep, job: int, lr: str, loss=None) -> str:
    run = tmp_path / f"run-{lr}"
    cfg, errors = preflight([f"run.dir={run}", f"train.lr={lr}"])
    assert errors == []
    point_dir = os.path.join(sweep, str(job))
    write_point(point_dir, cfg, [f"train.lr={lr}"], job, sweep_id(sweep))
    if loss is not None:
        os.makedirs(run, exist_ok=True)
        (run / "summary.json").write_text(json.dumps({"eval_after": {"loss": loss}, "steps": 2}))
    return point_dir


def test_a_failed_point_shows_its_first_error_and_incomplete_means_still_running(tmp_path):
    sweep = str(tmp_path / "sweep")
    start_sweep(sweep)
    _point(tmp_path, sweep, 0, "0.001", loss=2.5)
    ranks = _point(tmp_path, sweep, 1, "0.002")
    # Rank 0 noticed first that rank 1 went away; rank 1's own error is the cause.
    record_failure(ranks, "rank0", "DistBackendError: Connection closed by peer", rank=0, host="n1", lost=True)
    time.sleep(0.01)
    record_failure(ranks, "rank1", "RuntimeError: bad | batch", rank=1, host="n2")
    killed = _point(tmp_path, sweep, 2, "0.003")
    record_failure(killed, "job", "job 7_2 FAILED (exit code 137:0): rank 0 on n1 failed first (Killed)")
    _point(tmp_path, sweep, 3, "0.004")  # running: nothing recorded yet
    assert first_failure(ranks)["rank"] == 1
    _, rows = collect(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [
        (0, "complete"), (1, "failed: RuntimeError: bad | batch"),
        (2, "failed: job 7_2 FAILED (exit code 137:0): rank 0 on n1 failed first (Killed)"), (3, "incomplete")]
    paths = summarize(sweep)
    markdown = open(paths["md"]).read()
    assert "4 points, 1 complete, 2 failed; best eval loss first." in markdown
    assert "| 1 | 0.002 | failed: RuntimeError: bad \\| batch | - |" in markdown  # the table keeps its columns
    with open(paths["csv"]) as f:
        assert [r["status"] for r in csv.DictReader(f)][1] == "failed: RuntimeError: bad | batch"
    # A point started again (a reused directory) starts with no failure of its predecessor's.
    _point(tmp_path, sweep, 1, "0.002")
    assert first_failure(ranks) is None


def test_errors_read_as_one_line_and_lost_peers_are_told_apart():
    assert error_line(ValueError("bad batch\nsecond line")) == "ValueError: bad batch"
    assert error_line(KeyError()) == "KeyError"
    assert lost_peer(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:123"))
    assert not lost_peer(RuntimeError("injected fault (DISTFT_FAULTS): rank 1 fails at step 1"))
    import torch.distributed

    assert lost_peer(torch.distributed.DistBackendError("NCCL error: remote process exited"))
