"""Exact resume, kills during a save, resharding and non-finite steps, on 2 real gloo ranks.

Every run is the CLI as a user starts it; failures are real: `DISTFT_FAULTS` (distft/faults.py)
SIGKILLs a rank at a chosen instant, or turns one rank's loss NaN at one step.

Exact resume: run A trains 20 steps; run B is killed right after its step-8 checkpoint is
committed, then the same command is run again. Steps 9-20 must give A's losses exactly (==) and
the final weights must be equal bit for bit: the checkpoint holds the weights, the optimizer
state, the schedule, the data position and every rank's RNG, and the same collectives run in
the same order. Adapters train with dropout 0.1 here, so the RNG streams matter too.
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

from tests.distributed.helpers import REPO, run_dir_of, step_metrics, summary_of

PARTITION_ALL = "+parallel.deepspeed.overrides.zero_optimization={stage3_param_persistence_threshold:0}"
# Short sequences and small steps: what is checked (exact equality, where a run resumes) does not
# depend on the step's size, and 20 steps of 8 x 128 tokens take a third of the time of 16 x 256.
FAST = ["train.log_every=1", "eval.num_samples=2", "eval.max_new_tokens=2", "eval.compare_base=false",
        "train.eval_max_batches=1", "train.warmup_steps=4", "data.max_seq_len=128", "train.global_batch_size=8",
        "train.micro_batch_size=2"]


def launch(*args: str, faults: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("DISTFT_FAULTS", None)
    if faults:
        env["DISTFT_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", "distft", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def final_weights(run_dir: str) -> dict:
    model = os.path.join(summary_of(run_dir)["final_checkpoint"], "model")
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(model, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(model, name))


def cli_args(technique: str, parallel: str, root, ranks: int = 2, steps: int = 20) -> list[str]:
    args = [f"+experiment=tiny_{technique}", f"run.root={root}", f"train.max_steps={steps}", *FAST]
    if parallel != "single":
        args += [f"parallel={parallel}", f"launcher.nproc_per_node={ranks}"]
    if parallel == "zero3":
        args.append(PARTITION_ALL)
    return args


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A of each (parallel, technique): 20 steps, never stopped, checkpoints every 8."""
    done: dict = {}

    def run(parallel: str, technique: str) -> str:
        if (parallel, technique) not in done:
            root = tmp_path_factory.mktemp(f"a-{parallel}-{technique}")
            proc = launch(*cli_args(technique, parallel, root), "checkpoint.save_every=8")
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[parallel, technique] = run_dir_of(proc)
        return done[parallel, technique]

    return run


@pytest.mark.parametrize("technique", ["full", "lora"])
@pytest.mark.parametrize("parallel", ["ddp", "zero2", "zero3", "fsdp"])
def test_a_killed_run_resumes_exactly(uninterrupted, tmp_path, parallel, technique):
    a = uninterrupted(parallel, technique)
    args = [*cli_args(technique, parallel, tmp_path), "checkpoint.save_every=8"]
    killed = launch(*args, faults="kill_after_save:8")
    assert killed.returncode != 0, "the fault did not fire"
    b = run_dir_of(killed)
    assert os.path.exists(os.path.join(b, "checkpoints", "step_000008", "COMMITTED"))
    assert not os.path.exists(os.path.join(b, "summary.json"))
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_dir_of(resumed) == b
    assert summary_of(b)["resumed_from"].endswith("step_000008")
    assert "resuming from" in resumed.stdout + resumed.stderr
    # Steps 1-8 come from the killed run, 9-20 from the resumed one: each logged once, all equal to A's.
    losses_a, losses_b = step_metrics(a), step_metrics(b)
    assert len(losses_b) == 20
    assert losses_b == losses_a
    assert step_metrics(b, "grad_norm") == step_metrics(a, "grad_norm")
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert set(weights_a) == set(weights_b) and weights_a
    diff = max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a)
    assert diff == 0.0


@pytest.mark.parametrize("parallel, technique", [("ddp", "lora"), ("fsdp", "full")])
def test_a_background_save_overlaps_training_and_resumes_exactly(uninterrupted, tmp_path, parallel, technique):
    """checkpoint.async_save: the step-8 state is staged and written by a background thread while
    step 9 trains, and committed afterwards; the run is killed right after that commit. The
    resumed run still ends bit for bit where the synchronous, uninterrupted run A ends: what was
    written is the state of step 8, not a later one the training thread had moved on to."""
    a = uninterrupted(parallel, technique)
    args = [*cli_args(technique, parallel, tmp_path), "checkpoint.save_every=8", "checkpoint.async_save=true"]
    killed = launch(*args, faults="kill_after_save:8")
    assert killed.returncode != 0, "the fault did not fire"
    log = killed.stdout + killed.stderr
    started, committed = log.index("checkpoint of step 8: writing in the background"), log.index("step_000008\n")
    assert started < log.index("step 9/20") < committed  # training went on while the state was written
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = run_dir_of(resumed)
    assert summary_of(b)["resumed_from"].endswith("step_000008")
    assert step_metrics(b) == step_metrics(a)
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a) == 0.0


@pytest.mark.parametrize("parallel, poison", [("fsdp", "dcp-bytes-item"), ("zero2", "polyglot-pt")])
def test_a_poisoned_checkpoint_never_runs_on_two_ranks(uninterrupted, tmp_path, parallel, poison):
    """Run A's final checkpoint (step 20) tampered with, its manifest rewritten to match, as an
    attacker who can write the run directory would: under FSDP a DCP "bytes" item whose payload
    DCP would unpickle with weights_only=False; under ZeRO-2 rank 1's optimizer file replaced by a
    raw pickle with a zip appended (torch.load reads the raw pickle; a scan that asked zipfile saw
    the zip). The rerun refuses it on both ranks, sets it aside, resumes from step 16, and ends
    where A ended; the payload's marker never appears."""
    import shutil

    from tests.payloads import plant_dcp_bytes_item, rewrite_in_checkpoint, torch_variants

    a = uninterrupted(parallel, "full")
    copy = str(tmp_path / "run")
    shutil.copytree(a, copy)
    os.remove(os.path.join(copy, "summary.json"))
    newest = os.path.join(copy, "checkpoints", "step_000020")
    markers = tmp_path / "markers"
    markers.mkdir()
    if poison == "dcp-bytes-item":
        plant_dcp_bytes_item(newest, str(markers / poison))
        bad_file = "state/.metadata"
    else:
        bad_file = "state/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"
        rewrite_in_checkpoint(newest, bad_file, torch_variants(str(markers))["polyglot-raw-then-zip"])
    resumed = launch(*cli_args("full", parallel, tmp_path), "checkpoint.save_every=8", f"run.dir={copy}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"checkpoint {newest} is damaged: {bad_file}: " in log
    assert summary_of(copy)["resumed_from"].endswith("step_000016")
    assert os.path.isdir(newest + ".damaged")
    weights_a, weights_b = final_weights(a), final_weights(copy)
    assert max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a) == 0.0
    assert os.listdir(markers) == []


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(uninterrupted, tmp_path):
    """Rank 1 dies after writing its shards of step 8, before the manifest and the commit: the
    step-8 directory stays a `.tmp`, never committed; the rerun resumes from step 4 and ends
    where the uninterrupted run ends."""
    a = uninterrupted("ddp", "lora")
    args = [*cli_args("lora", "ddp", tmp_path), "checkpoint.save_every=4", "checkpoint.keep_last=0"]
    killed = launch(*args, faults="kill_after_shards:8:1")
    assert killed.returncode != 0
    b = run_dir_of(killed)
    checkpoints = sorted(os.listdir(os.path.join(b, "checkpoints")))
    assert "step_000008.tmp" in checkpoints and "step_000008" not in checkpoints, checkpoints
    resumed = launch(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary_of(b)["resumed_from"].endswith("step_000004")
    assert step_metrics(b) == step_metrics(a)
    assert not os.path.exists(os.path.join(b, "checkpoints", "step_000008.tmp"))  # replaced by the real one


RESHARD_WORKER = os.path.join(REPO, "tests", "distributed", "reshard_worker.py")


def reshard_worker(out_dir, ranks: int, parallel: str, technique: str, mode: str, *overrides: str) -> tuple[dict, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", RESHARD_WORKER,
         str(out_dir), parallel, technique, mode, str(out_dir / "checkpoint" / "state"), *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(out_dir / f"{mode}.json") as f:
        return load_file(str(out_dir / f"{mode}.safetensors")), json.load(f)


@pytest.mark.parametrize("parallel, technique, ranks_before, ranks_after", [
    ("fsdp", "full", 2, 1), ("fsdp", "lora", 1, 2),
    ("zero2", "full", 2, 1), ("zero2", "lora", 1, 2),
    ("zero3", "full", 1, 2), ("zero3", "lora", 2, 1),
    ("fsdp>ddp", "full", 2, 1),  # DCP state: another layout as well as another rank count
])
def test_training_state_reshards_tensor_for_tensor(tmp_path, parallel, technique, ranks_before, ranks_after):
    """The engine's state saved on N ranks after 3 steps, loaded on M into a model initialised
    differently: every trainable weight (ZeRO: the fp32 master copy) and every Adam moment,
    gathered at full size, equals the saved one exactly (DCP reshards FSDP; ZeRO goes through
    DeepSpeed's universal checkpoint), the schedule, the param groups and Adam's step counts are
    where they were, and the next step trains and counts once."""
    parallel_before, _, parallel_after = parallel.partition(">")
    saved, before = reshard_worker(tmp_path, ranks_before, parallel_before, technique, "save")
    loaded, after = reshard_worker(tmp_path, ranks_after, parallel_after or parallel_before, technique, "load")
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
    assert not os.path.exists(tmp_path / "checkpoint.universal")  # the conversion is cleaned up


@pytest.mark.parametrize("optimizer, parallel, ranks_before, ranks_after", [
    ("adamw_8bit", "ddp>single", 2, 1), ("paged_adamw_32bit", "single>ddp", 1, 2),
])
def test_bitsandbytes_optimizer_state_reshards_exactly(tmp_path, optimizer, parallel, ranks_before, ranks_after):
    """bitsandbytes' state (8-bit: uint8 moments, their block scales and quantisation maps; 32-bit:
    fp32 moments; `step` a Python int, kept in the JSON beside DCP's tensors) saved on N ranks and
    loaded on M equals the saved state tensor for tensor, and training goes on from it. (Paged
    optimizers run unpaged on the CPU; what paging changes is where CUDA keeps the pages.)"""
    parallel_before, _, parallel_after = parallel.partition(">")
    chosen = f"train.optimizer={optimizer}"
    saved, before = reshard_worker(tmp_path, ranks_before, parallel_before, "full", "save", chosen)
    loaded, after = reshard_worker(tmp_path, ranks_after, parallel_after, "full", "load", chosen)
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


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_32bit"])
def test_a_killed_run_with_a_bitsandbytes_optimizer_resumes_exactly(tmp_path, optimizer):
    """As test_a_killed_run_resumes_exactly, with bitsandbytes' optimizer state in the checkpoint:
    12 steps, killed after the step-6 checkpoint and rerun, equal (==) to the run never stopped."""
    base = [*cli_args("full", "ddp", tmp_path, steps=12), f"train.optimizer={optimizer}", "checkpoint.save_every=6"]
    a = launch(*base, f"run.dir={tmp_path / 'a'}")
    assert a.returncode == 0, a.stderr[-3000:]
    b_args = [*base, f"run.dir={tmp_path / 'b'}"]
    killed = launch(*b_args, faults="kill_after_save:6")
    assert killed.returncode != 0, "the fault did not fire"
    resumed = launch(*b_args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert summary_of(str(tmp_path / "b"))["resumed_from"].endswith("step_000006")
    losses_a, losses_b = step_metrics(str(tmp_path / "a")), step_metrics(str(tmp_path / "b"))
    assert len(losses_b) == 12 and losses_b == losses_a
    weights_a, weights_b = final_weights(str(tmp_path / "a")), final_weights(str(tmp_path / "b"))
    assert weights_a and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.mark.parametrize("parallel, ranks_before, ranks_after", [
    ("fsdp", 2, 1), ("fsdp", 1, 2), ("zero2", 2, 1), ("zero3", 1, 2),
])
def test_a_run_resumes_on_another_number_of_ranks(uninterrupted, tmp_path, parallel, ranks_before, ranks_after):
    """Killed after its step-8 checkpoint on N ranks, the run is resumed with the same command on M
    (same run.dir, same global batch: the data position is kept in rows). Steps 9-20 must match
    run A, which never changed its rank count (2 ranks): the weights, Adam moments and schedule
    arrived (a missing moment or a shifted data position moves the loss by >1e-3). Tolerance 1e-5
    relative: sums run in another order on another rank count (measured drift for 2 vs 1 rank
    <= 2e-7 per step, see test_fsdp.py)."""
    run_dir = str(tmp_path / "resharded")
    before = [*cli_args("full", parallel, tmp_path, ranks=ranks_before), "checkpoint.save_every=8",
              f"run.dir={run_dir}"]
    killed = launch(*before, faults="kill_after_save:8")
    assert killed.returncode != 0
    after = [*cli_args("full", parallel, tmp_path, ranks=ranks_after), "checkpoint.save_every=8",
             f"run.dir={run_dir}"]
    resumed = launch(*after)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = summary_of(run_dir)
    assert summary["world_size"] == ranks_after and summary["resumed_from"].endswith("step_000008")
    assert f"resharded from {ranks_before} to {ranks_after} ranks" in resumed.stdout + resumed.stderr
    expected, got = step_metrics(uninterrupted(parallel, "full")), step_metrics(run_dir)
    assert len(got) == 20
    assert got[:8] == pytest.approx(expected[:8], rel=1e-5)
    assert got[8:] == pytest.approx(expected[8:], rel=1e-5)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_000008.universal"))


def _checkpoint_weights(run_dir: str, step: int) -> dict:
    return load_file(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "model", "model.safetensors"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "zero2"])
def test_a_nonfinite_step_on_one_rank_is_skipped_on_all(tmp_path, parallel):
    """Rank 1's loss turns NaN at step 3 (its gradients with it). Every rank sees it (the loss and
    the grad norm are global), nobody applies the update: the weights after step 3 are those after
    step 2, bit for bit; the step is counted and the run goes on and finishes."""
    args = [*cli_args("full", parallel, tmp_path, steps=6), "checkpoint.save_every=1", "checkpoint.keep_last=0"]
    proc = launch(*args, faults="nan_loss:3:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = run_dir_of(proc)
    assert summary_of(run_dir)["nonfinite_steps"] == 1
    before, skipped, after = (_checkpoint_weights(run_dir, s) for s in (2, 3, 4))
    assert all((before[k] == skipped[k]).all() for k in before)
    assert any(not (skipped[k] == after[k]).all() for k in before)  # step 4 trained again
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r.get("nonfinite")] == [3]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 4, 5, 6]
    assert "step 3 skipped" in proc.stdout + proc.stderr and "rank 1" in proc.stdout + proc.stderr


def test_a_nonfinite_step_halts_with_a_checkpoint_when_asked(tmp_path):
    args = [*cli_args("full", "ddp", tmp_path, steps=6), "checkpoint.save_every=1", "checkpoint.keep_last=0",
            "train.nonfinite=halt"]
    proc = launch(*args, faults="nan_loss:3:1", timeout=300)
    assert proc.returncode != 0
    assert "non-finite step 3" in proc.stderr and "non-finite on rank 1" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    run_dir = run_dir_of(proc)
    # The halt checkpoint holds the model before the bad update: the step-2 weights.
    before, halted = _checkpoint_weights(run_dir, 2), _checkpoint_weights(run_dir, 3)
    assert all((before[k] == halted[k]).all() for k in before)
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
