"""A start that says what the user can act on and nothing else (issue 35, item 6), as the user
sees it: a real run on the real model with no library noise, and two ranks saying the report
and the result once.

The in-process tests: tests/unit/test_quiet_start.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What the libraries printed on every start before (bitsandbytes' kernel fetch on AVX512-BF16
# CPUs, transformers' deprecation inside peft, DeepSpeed's accelerator guess, the loading bars).
NOISE = ("gemm_4bit_forward", "trust_remote_code=True", "FutureWarning", "Setting accelerator",
         "Loading checkpoint shards", "Loading weights", "Writing model shards")


def _distft(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smollm2_run(smollm2, tmp_path_factory):
    """One LoRA step on the real SmolLM2-135M-Instruct, then `distft.evaluation.evaluate` of its checkpoint:
    (the run's process, the evaluation's process, the checkpoint)."""
    root = tmp_path_factory.mktemp("quiet")
    run = _distft("distft", f"model.name_or_path={smollm2}", "technique=lora", "train.max_steps=1",
                  "data.synthetic.num_examples=200", "data.max_seq_len=64", "train.global_batch_size=2",
                  "train.micro_batch_size=2", "eval.num_samples=2", "eval.max_new_tokens=4", "tracking.plot=false",
                  f"run.root={root}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    checkpoint = re.search(r"python -m distft\.evaluate (\S+)", run.stdout).group(1)
    evaluated = _distft("distft.evaluate", checkpoint, "--num-samples", "1", "--out", str(root / "eval" / "report.md"))
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    return run, evaluated, checkpoint


def test_a_run_on_a_real_model_prints_no_library_noise(smollm2_run):
    """Before: every start printed transformers' `is_gradient_checkpointing` FutureWarning (with
    its source line) on stderr, the evaluate/export commands transformers' weight-loading bars.
    Now neither the run nor `distft.evaluation.evaluate` prints any of NOISE, on either stream; what distft
    says stays (its result lines), and the thread choice is said once, with its reason."""
    run, evaluated, _ = smollm2_run
    for name, proc in (("run", run), ("evaluate", evaluated)):
        for phrase in NOISE:
            assert phrase not in proc.stderr and phrase not in proc.stdout, (name, phrase, proc.stderr[-2000:])
    assert run.stderr.strip() == "", run.stderr[-2000:]
    assert "INFO tuned model: loss" in run.stdout and "report: " in evaluated.stdout
    threads = [line for line in run.stdout.splitlines() if "torch threads:" in line]
    assert len(threads) == 1 and threads[0].startswith("[rank0]"), threads
    assert threads[0].endswith("INFO torch threads: 1 (OMP_NUM_THREADS=1 from the environment)"), threads
    # distft.evaluation.evaluate's stdout is its result (report:, then the metrics): its log goes to stderr
    assert evaluated.stdout.startswith("report: ")
    assert "INFO torch threads: 1 (OMP_NUM_THREADS=1 from the environment)" in evaluated.stderr


def test_two_ranks_say_the_report_and_the_result_once(tmp_path):
    """Before, on 2 ranks every rank printed the whole data report, the model line and both
    evaluations. Now rank 0 says them; each rank still says what is its own (its threads)."""
    proc = _distft("distft", "+experiment=tiny_lora", "parallel=ddp", "launcher.nproc_per_node=2",
                   "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
                   "data.synthetic.num_examples=200", "eval.num_samples=2", "tracking.plot=false",
                   f"run.root={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for said_once in ("INFO data: loaded ", "INFO model ", "INFO base model: loss", "INFO tuned model: loss"):
        found = [line for line in lines if said_once in line]
        assert len(found) == 1 and found[0].startswith("[rank0]"), (said_once, found)
    threads = sorted(line.split()[0] for line in lines if "INFO torch threads:" in line)
    assert threads == ["[rank0]", "[rank1]"], lines

