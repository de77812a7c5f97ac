"""A full disk while a run writes its report, loss plot or summary: one clear message (an
OutputError, which the command line prints in one line, exit 2), and no partial file left."""

from __future__ import annotations

import json
import os

from distft.errors import CheckpointError, OutputError
from tests.full_disk import in_child_with_file_limit


def test_a_full_disk_while_writing_the_report_the_plot_or_the_summary_is_one_message(tmp_path):
    """Files limited to 2 kB: the report (~3 kB), the loss plot (a PNG of tens of kB) and the
    summary each fail with an OutputError (a CheckpointError: exit 2 on the command line) naming
    the file, the full disk and what to do; none leaves a file or a temporary one behind."""
    from distft.evaluation.report import write_report
    from distft.files import write_json
    from distft.tracking import plot_losses

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 30)))
    after = {"loss": 1.2, "perplexity": 3.3, "exact_match": 0.5, "tokens": 100, "num_generated": 2,
             "samples": [{"prompt": "p" * 300, "reference": "r" * 300, "prediction": "x" * 300}]}

    def write_all() -> dict:
        outcomes = {}
        for name, write in [
            ("eval_report.md", lambda p: write_report(p, None, after, {"experiment": "t"})),
            ("loss.png", lambda p: plot_losses(str(metrics), p)),
            ("summary.json", lambda p: write_json(p, {"values": list(range(2000))}, what="the run's summary")),
        ]:
            try:
                write(str(run_dir / name))
                outcomes[name] = None
            except OutputError as err:
                outcomes[name] = {"message": str(err), "checkpoint_error": isinstance(err, CheckpointError)}
        return outcomes

    outcomes = in_child_with_file_limit(2_000, write_all)
    advice = ("File too large (EFBIG); the disk (or quota) holding it is full: free space there, or point run.root at "
              "another disk, then rerun the same command: it resumes from the last checkpoint, nothing saved was lost")
    assert outcomes == {
        "eval_report.md": {"message": f"cannot write the evaluation report {run_dir}/eval_report.md: OSError: {advice}",
                           "checkpoint_error": True},
        "loss.png": {"message": f"cannot write the loss plot {run_dir}/loss.png: OSError: {advice}",
                     "checkpoint_error": True},
        "summary.json": {"message": f"cannot write the run's summary {run_dir}/summary.json: OSError: {advice}",
                         "checkpoint_error": True},
    }
    assert sorted(os.listdir(run_dir)) == ["metrics.jsonl"]


def test_a_run_on_a_full_disk_ends_in_one_line_and_the_rerun_on_free_space_completes(tmp_path):
    """The training command itself, its files limited to 1 MB (the tiny model's checkpoint is
    larger): the final save fails with one line naming the full disk and what to do, exit 2, no
    traceback, no `.tmp` directory left; the same command with the space back completes."""
    import resource
    import signal
    import subprocess
    import sys

    def full_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))

    overrides = ["train.max_steps=2", "eval.num_samples=1", "eval.max_new_tokens=1", f"run.root={tmp_path}",
                 "tracking.wandb.mode=disabled", "eval.compare_base=false"]
    args = [sys.executable, "-m", "distft", *overrides]
    # The data cache (2.5 MB, over the limit too) first, with the space the data needs: as on a login node.
    data_cmd = [sys.executable, "-m", "distft.data", *overrides]
    prepared = subprocess.run(data_cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert prepared.returncode == 0 and "cache: built " in prepared.stdout, prepared.stderr[-3000:]
    full_cache = subprocess.run(data_cmd + ["data.synthetic.num_examples=20001"], capture_output=True, text=True,
                                cwd=tmp_path, timeout=300, preexec_fn=full_disk)
    assert full_cache.returncode == 2 and "Traceback" not in full_cache.stderr, full_cache.stderr[-3000:]
    line = full_cache.stderr.strip().splitlines()[-1]
    assert line.startswith(f"distft: cannot write the data cache {tmp_path}/data-cache/") and (
        "File too large (EFBIG); the disk (or quota) holding it is full" in line), line
    assert not [n for n in os.listdir(tmp_path / "data-cache") if ".tmp-" in n or n.endswith(".lock")]
    full = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300, preexec_fn=full_disk)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.strip().splitlines()[-1] == (
        "distft: saving the checkpoint of step 2 failed (rank 0: OSError: File too large (EFBIG)): the disk (or quota) "
        "is full; nothing was committed and earlier checkpoints are untouched (newest: none). Free disk space (or "
        "point run.root at another disk), then rerun the same command to resume")
    run_dir = next(line[len("run_dir: "):] for line in full.stdout.splitlines() if line.startswith("run_dir: "))
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == [] and not os.path.exists(os.path.join(run_dir, "summary.json"))
    again = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["steps"] == 2
