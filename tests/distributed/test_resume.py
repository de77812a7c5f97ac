"""Exact resume, kills during a save, resharding and non-finite steps, on 2 real gloo ranks.

Exact resume: run A trains 12 steps, saving every 6; run B is run A stopped right after its step-6
checkpoint and started again. Steps 7-12 must give A's losses exactly (==) and the final weights
must be equal bit for bit: the checkpoint holds the weights, the optimizer state, the schedule,
the data position and every rank's RNG, and the same collectives run in the same order. Adapters
train with dropout 0.1 here, so the RNG streams matter too.

Most runs are whole trainings (`distft.train.train`, as the command line's rank processes run it)
declared with helpers.declare_run and run one after the other in the session's shared launches
of runs_worker.py (1, 2, then 1 rank), B's run directory made as a killed run leaves it (or as an
attacker who poisoned its checkpoint leaves it). What a process boundary adds is checked by real
drills on the command line: SIGKILL (`DISTFT_FAULTS`, distft/faults.py) right after a ZeRO-3
checkpoint, and of one rank in the middle of an FSDP (DCP) save, each followed by the same command
again; a non-finite halt. Their reference is the in-process run A, so they also show that a run
in the worker's process is the run the command line makes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.helpers import (
    REPO,
    declare_run,
    declare_state,
    final_weights,
    run_dir_of,
    step_metrics,
    summary_of,
)

PARTITION_ALL = "+parallel.deepspeed.overrides.zero_optimization={stage3_param_persistence_threshold:0}"
# Short sequences and small steps: what is checked (exact equality, where a run resumes) does not
# depend on the step's size or count, and 12 steps of 8 x 128 tokens take a fifth of the time of
# 20 of 16 x 256. Resumed half-way: after the warm-up, mid-schedule, with Adam moments of 6 steps.
STEPS, SAVE = 12, 6
SHARED_RUNS = "resume"  # this module's set of the session's shared runs (helpers.declare_run)
FAST = ["train.log_every=1", "eval.num_samples=2", "eval.max_new_tokens=2", "eval.compare_base=false",
        "train.eval_max_batches=1", "train.warmup_steps=4", "data.max_seq_len=128", "train.global_batch_size=8",
        "train.micro_batch_size=2"]

EXACT = [(parallel, technique) for parallel in ("ddp", "zero2", "zero3", "fsdp") for technique in ("full", "lora")]
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_32bit")
ASYNC = [("ddp", "lora"), ("fsdp", "full")]
NONFINITE = ("ddp", "fsdp", "zero2")
RANK_CHANGES = [("fsdp", 2, 1), ("fsdp", 1, 2), ("zero2", 2, 1), ("zero3", 1, 2)]
POISONS = [("fsdp", "dcp-bytes-item"), ("zero2", "polyglot-pt")]
# (name, parallel saved, parallel loaded, technique, ranks saving, ranks loading, overrides)
STATE_CELLS = [
    ("fsdp-full", "fsdp", "fsdp", "full", 2, 1, ()), ("fsdp-lora", "fsdp", "fsdp", "lora", 1, 2, ()),
    ("zero2-full", "zero2", "zero2", "full", 2, 1, ()), ("zero2-lora", "zero2", "zero2", "lora", 1, 2, ()),
    ("zero3-full", "zero3", "zero3", "full", 1, 2, ()), ("zero3-lora", "zero3", "zero3", "lora", 2, 1, ()),
    ("fsdp>ddp-full", "fsdp", "ddp", "full", 2, 1, ()),  # DCP state: another layout as well as another rank count
    ("adamw_8bit", "ddp", "single", "full", 2, 1, ("train.optimizer=adamw_8bit",)),
    ("paged_adamw_32bit", "single", "ddp", "full", 1, 2, ("train.optimizer=paged_adamw_32bit",)),
]


def launch(*args: str, faults: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("DISTFT_FAULTS", None)
    if faults:
        env["DISTFT_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", "distft", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def bit_equal(a: dict, b: dict) -> bool:
    return bool(a) and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def cli_args(technique: str, parallel: str, ranks: int = 2, steps: int = STEPS) -> list[str]:
    args = [f"+experiment=tiny_{technique}", f"train.max_steps={steps}", *FAST]
    if parallel != "single":
        args += [f"parallel={parallel}", f"launcher.nproc_per_node={ranks}"]
    if parallel == "zero3":
        args.append(PARTITION_ALL)
    return args


def saving(every: int) -> list[str]:
    return [f"checkpoint.save_every={every}", "checkpoint.keep_last=0"]


def _declare_runs() -> None:
    """This module's whole runs (helpers.declare_run): run A of each cell, its resumed run B, and
    the states that reshard, in the session's shared launches (1 rank, 2 ranks, 1 rank)."""
    share = {"share": SHARED_RUNS}
    for parallel, technique in EXACT:
        args = [*cli_args(technique, parallel), *saving(SAVE)]
        a = declare_run(f"a-{parallel}-{technique}", args, **share)
        declare_run(f"b-{parallel}-{technique}", args, resume_from=(a, SAVE), **share)
    for optimizer in BNB_OPTIMIZERS:
        args = [*cli_args("full", "ddp"), f"train.optimizer={optimizer}", *saving(SAVE)]
        a = declare_run(f"a-{optimizer}", args, **share)
        declare_run(f"b-{optimizer}", args, resume_from=(a, SAVE), **share)
    for parallel, technique in ASYNC:
        args = [*cli_args(technique, parallel), *saving(SAVE), "checkpoint.async_save=true"]
        a = declare_run(f"a-async-{parallel}-{technique}", args, **share)
        declare_run(f"b-async-{parallel}-{technique}", args, resume_from=(a, SAVE), **share)
    for parallel in NONFINITE:
        declare_run(f"nan-{parallel}", [*cli_args("full", parallel, steps=6), *saving(1)], faults="nan_loss:3:1",
                    **share)
    for parallel, before, after in RANK_CHANGES:
        source = f"a-{parallel}-full" if before == 2 else declare_run(
            f"before-{parallel}-{before}", [*cli_args("full", parallel, ranks=1), *saving(SAVE)], ranks=1, **share)
        declare_run(f"resharded-{parallel}-{before}-{after}", [*cli_args("full", parallel, ranks=after),
                    *saving(SAVE)], ranks=after, resume_from=(source, SAVE), **share)
    for parallel, poison in POISONS:
        declare_run(f"poisoned-{parallel}", [*cli_args("full", parallel), *saving(SAVE)],
                    poisoned=(f"a-{parallel}-full", STEPS, poison), **share)
    for cell, parallel_before, parallel_after, technique, before, after, overrides in STATE_CELLS:
        saved = declare_state(f"save-{cell}", "save", cell, parallel_before, technique, before, overrides, **share)
        declare_state(f"load-{cell}", "load", cell, parallel_after, technique, after, overrides, after=saved, **share)


_declare_runs()


def check_resumed_exactly(a: str, b: str, log: str, step: int, steps: int) -> None:
    assert summary_of(b)["resumed_from"].endswith(f"step_{step:06d}")
    assert f"resuming from {b}" in log
    assert f"step {step + 1}/{steps} " in log and f"step {step}/{steps} " not in log  # B trained from step+1 only
    # Steps up to `step` come from before the stop, the rest from the resumed run: each logged once, all equal to A's.
    losses_a, losses_b = step_metrics(a), step_metrics(b)
    assert len(losses_b) == steps
    assert losses_b == losses_a
    assert step_metrics(b, "grad_norm") == step_metrics(a, "grad_norm")
    assert bit_equal(final_weights(a), final_weights(b))


@pytest.mark.parametrize("technique", ["full", "lora"])
@pytest.mark.parametrize("parallel", ["ddp", "zero2", "zero3", "fsdp"])
def test_a_stopped_run_resumes_exactly(trainings, parallel, technique):
    a, _ = trainings.finished(f"a-{parallel}-{technique}")
    b, log = trainings.finished(f"b-{parallel}-{technique}")
    check_resumed_exactly(a, b, log, SAVE, STEPS)


def test_a_killed_run_resumes_exactly_from_the_command_line(trainings, tmp_path):
    """The real drill on ZeRO-3 (partitioned parameters, adapters with dropout): SIGKILL right after
    the step-6 checkpoint is committed, then the same command again, in new processes. It ends
    bit for bit where the in-process run A ends."""
    a, _ = trainings.finished("a-zero3-lora")
    args = [*cli_args("lora", "zero3"), *saving(SAVE), f"run.dir={tmp_path / 'b'}"]
    killed = launch(*args, faults=f"kill_after_save:{SAVE}")
    assert killed.returncode != 0, "the fault did not fire"
    b = run_dir_of(killed)
    assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == ["latest", f"step_{SAVE:06d}"]
    assert os.path.exists(os.path.join(b, "checkpoints", f"step_{SAVE:06d}", "COMMITTED"))
    assert not os.path.exists(os.path.join(b, "summary.json"))
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dir_of(resumed) == b
    check_resumed_exactly(a, b, resumed.stdout + resumed.stderr, SAVE, STEPS)


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(trainings, tmp_path):
    """The real drill on FSDP (DCP shards written by every rank): rank 1 dies after writing its
    shards of step 6, before the manifest and the commit. The step-6 directory stays a `.tmp`,
    never committed; the same command again resumes from step 3 and ends bit for bit where the
    in-process run A ends."""
    a, _ = trainings.finished("a-fsdp-full")
    args = [*cli_args("full", "fsdp"), *saving(3), f"run.dir={tmp_path / 'b'}"]
    killed = launch(*args, faults="kill_after_shards:6:1")
    assert killed.returncode != 0
    b = run_dir_of(killed)
    checkpoints = sorted(os.listdir(os.path.join(b, "checkpoints")))
    assert checkpoints == ["latest", "step_000003", "step_000006.tmp"], checkpoints
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_resumed_exactly(a, b, resumed.stdout + resumed.stderr, 3, STEPS)
    assert not os.path.exists(os.path.join(b, "checkpoints", "step_000006.tmp"))  # replaced by the real one


@pytest.mark.parametrize("parallel, technique", ASYNC)
def test_a_background_save_overlaps_training_and_resumes_exactly(trainings, parallel, technique):
    """checkpoint.async_save: the step-6 state is staged and written by a background thread while
    step 7 trains, and committed afterwards. Resumed from that checkpoint, the run still ends bit
    for bit where the synchronous run A ends: what was written is the state of step 6, not a later
    one the training thread had moved on to."""
    a, _ = trainings.finished(f"a-{parallel}-{technique}")
    source, log = trainings.finished(f"a-async-{parallel}-{technique}")
    started = log.index(f"checkpoint of step {SAVE}: writing in the background")
    committed = log.index(os.path.join(source, "checkpoints", f"step_{SAVE:06d}") + "\n")
    assert started < log.index(f"step {SAVE + 1}/{STEPS}") < committed  # training went on while the state was written
    assert step_metrics(source) == step_metrics(a)  # writing in the background changes nothing trained
    b, log = trainings.finished(f"b-async-{parallel}-{technique}")
    check_resumed_exactly(a, b, log, SAVE, STEPS)


@pytest.mark.parametrize("optimizer", BNB_OPTIMIZERS)
def test_a_run_with_a_bitsandbytes_optimizer_resumes_exactly(trainings, optimizer):
    """As test_a_stopped_run_resumes_exactly, with bitsandbytes' optimizer state in the checkpoint:
    12 steps, stopped after the step-6 checkpoint and resumed, equal (==) to the run never stopped."""
    a, _ = trainings.finished(f"a-{optimizer}")
    b, log = trainings.finished(f"b-{optimizer}")
    check_resumed_exactly(a, b, log, SAVE, STEPS)


@pytest.mark.parametrize("parallel, poison", POISONS)
def test_a_poisoned_checkpoint_never_runs_on_two_ranks(trainings, parallel, poison):
    """Run A's final checkpoint (step 12) tampered with, its manifest rewritten to match, as an
    attacker who can write the run directory would (tests/payloads.py poison_checkpoint): under
    FSDP a DCP "bytes" item whose payload DCP would unpickle with weights_only=False; under ZeRO-2
    rank 1's optimizer file replaced by a raw pickle with a zip appended (torch.load reads the raw
    pickle; a scan that asked zipfile saw the zip). The rerun on 2 ranks (as the command line's
    rank processes run it) refuses it, sets it aside, resumes from step 6, and ends where A ended;
    the payload's marker never appears."""
    from tests.payloads import POISONED_FILES

    a, _ = trainings.finished(f"a-{parallel}-full")
    copy, log = trainings.finished(f"poisoned-{parallel}")
    result = trainings[f"poisoned-{parallel}"]
    bad_file = result["poisoned_file"]
    assert bad_file == POISONED_FILES[poison]
    newest = os.path.join(copy, "checkpoints", f"step_{STEPS:06d}")
    assert f"checkpoint {newest} is damaged: {bad_file}: " in log
    assert summary_of(copy)["resumed_from"].endswith(f"step_{SAVE:06d}")
    assert os.path.isdir(newest + ".damaged")
    assert bit_equal(final_weights(a), final_weights(copy))
    assert os.path.isdir(result["markers"]) and os.listdir(result["markers"]) == []


@pytest.mark.parametrize("name, parallel_before, parallel_after, technique, ranks_before, ranks_after, overrides",
                         [c for c in STATE_CELLS if not c[0].endswith("bit")],
                         ids=[c[0] for c in STATE_CELLS if not c[0].endswith("bit")])
def test_training_state_reshards_tensor_for_tensor(trainings, name, parallel_before, parallel_after, technique,
                                                   ranks_before, ranks_after, overrides):
    """The engine's state saved on N ranks after 3 steps, loaded on M into a model initialised
    differently: every trainable weight (ZeRO: the fp32 master copy) and every Adam moment,
    gathered at full size, equals the saved one exactly (DCP reshards FSDP; ZeRO goes through
    DeepSpeed's universal checkpoint), the schedule, the param groups and Adam's step counts are
    where they were, and the next step trains and counts once."""
    saved, before, loaded, after = _state_cell(trainings, name)
    assert (before["world_size"], after["world_size"]) == (ranks_before, ranks_after)
    kinds = {key.split("/")[0] for key in saved}
    assert kinds == {"weight", "exp_avg", "exp_avg_sq"}
    assert set(loaded) == set(saved)
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert any(bool(saved[key].any()) for key in saved if key.startswith("exp_avg/"))  # 3 steps were taken
    assert after["lr"] == before["lr"]
    assert after["groups"] == before["groups"]  # ZeRO-3's universal load gave all groups the first one's
    assert set(before["adam_steps"]) == set(after["adam_steps"]) == {3.0}
    assert set(after["adam_steps_after"]) == {4.0}  # ZeRO-3's universal load shared one counter
    assert after["lr_after"] < after["lr"] and math.isfinite(after["loss"]) and math.isfinite(after["grad_norm"])
    assert not os.path.exists(trainings.state_dir(name) / "checkpoint.universal")  # the conversion is cleaned up


def _state_cell(trainings, name: str) -> tuple[dict, dict, dict, dict]:
    out_dir = trainings.state_dir(name)
    trainings[f"save-{name}"], trainings[f"load-{name}"]  # both ran
    found = []
    for mode in ("save", "load"):
        with open(out_dir / f"{mode}.json") as f:
            found += [load_file(str(out_dir / f"{mode}.safetensors")), json.load(f)]
    return tuple(found)


@pytest.mark.parametrize("optimizer", BNB_OPTIMIZERS)
def test_bitsandbytes_optimizer_state_reshards_exactly(trainings, optimizer):
    """bitsandbytes' state (8-bit: uint8 moments, their block scales and quantisation maps; 32-bit:
    fp32 moments; `step` a Python int, kept in the JSON beside DCP's tensors) saved on N ranks and
    loaded on M (adamw_8bit: DDP on 2 -> one process; paged_adamw_32bit: one process -> DDP on 2)
    equals the saved state tensor for tensor, and training goes on from it. (Paged optimizers run
    unpaged on the CPU; what paging changes is where CUDA keeps the pages.)"""
    saved, before, loaded, after = _state_cell(trainings, optimizer)
    assert (before["world_size"], after["world_size"]) == ((2, 1) if optimizer == "adamw_8bit" else (1, 2))
    kinds = {key.split("/")[0] for key in saved}
    assert kinds == ({"weight", "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"} if "8bit" in optimizer
                     else {"weight", "state1", "state2"})
    assert set(loaded) == set(saved)
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key], loaded[key]), key
    if "8bit" in optimizer:
        assert any(v.dtype == torch.uint8 for v in saved.values())  # the moments really are 8-bit
    assert any(bool(saved[key].any()) for key in saved if key.startswith("state2/"))
    assert after["lr"] == before["lr"] and after["groups"] == before["groups"]
    assert set(before["adam_steps"]) == set(after["adam_steps"]) == {3.0}
    assert set(after["adam_steps_after"]) == {4.0}
    assert math.isfinite(after["loss"]) and math.isfinite(after["grad_norm"])


@pytest.mark.parametrize("parallel, ranks_before, ranks_after", RANK_CHANGES)
def test_a_run_resumes_on_another_number_of_ranks(trainings, parallel, ranks_before, ranks_after):
    """Stopped after its step-6 checkpoint on N ranks, the run is resumed with the same config on M
    (same run.dir, same global batch: the data position is kept in rows). Steps 7-12 must match
    run A, which never changed its rank count (2 ranks): the weights, Adam moments and schedule
    arrived (a missing moment or a shifted data position moves the loss by >1e-3). Tolerance 1e-5
    relative: sums run in another order on another rank count (measured drift for 2 vs 1 rank
    <= 2e-7 per step, see test_fsdp.py)."""
    run_dir, log = trainings.finished(f"resharded-{parallel}-{ranks_before}-{ranks_after}")
    summary = summary_of(run_dir)
    assert summary["world_size"] == ranks_after and summary["resumed_from"].endswith(f"step_{SAVE:06d}")
    assert f"resharded from {ranks_before} to {ranks_after} ranks" in log
    expected, got = step_metrics(trainings.finished(f"a-{parallel}-full")[0]), step_metrics(run_dir)
    assert len(got) == STEPS
    assert got[:SAVE] == pytest.approx(expected[:SAVE], rel=1e-5)
    assert got[SAVE:] == pytest.approx(expected[SAVE:], rel=1e-5)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", f"step_{SAVE:06d}.universal"))


def _checkpoint_weights(run_dir: str, step: int) -> dict:
    return load_file(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "model", "model.safetensors"))


@pytest.mark.parametrize("parallel", NONFINITE)
def test_a_nonfinite_step_on_one_rank_is_skipped_on_all(trainings, parallel):
    """Rank 1's loss turns NaN at step 3 (its gradients with it). Every rank sees it (the loss and
    the grad norm are global), nobody applies the update: the weights after step 3 are those after
    step 2, bit for bit; the step is counted and the run goes on and finishes."""
    run_dir, log = trainings.finished(f"nan-{parallel}")
    assert summary_of(run_dir)["nonfinite_steps"] == 1
    before, skipped, after = (_checkpoint_weights(run_dir, s) for s in (2, 3, 4))
    assert all((before[k] == skipped[k]).all() for k in before)
    assert any(not (skipped[k] == after[k]).all() for k in before)  # step 4 trained again
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r.get("nonfinite")] == [3]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 5, 6]
    assert "step 3 skipped" in log and "rank 1" in log


def test_a_nonfinite_step_halts_with_a_checkpoint_when_asked(tmp_path):
    args = [*cli_args("full", "ddp", steps=6), *saving(1), "train.nonfinite=halt", f"run.dir={tmp_path / 'run'}"]
    proc = launch(*args, faults="nan_loss:3:1", timeout=300)
    assert proc.returncode != 0
    assert "non-finite step 3" in proc.stderr and "non-finite on rank 1" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    run_dir = run_dir_of(proc)
    # The halt checkpoint holds the model before the bad update: the step-2 weights.
    before, halted = _checkpoint_weights(run_dir, 2), _checkpoint_weights(run_dir, 3)
    assert all((before[k] == halted[k]).all() for k in before)
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
