"""FSDP2 on 2 real gloo ranks on the CPU: equivalence with one process, every technique on every
FSDP layout, adapters that reload, meta-device loading.

Equivalence (the backbone): the same seed and global batch give the same step losses *and grad
norms* on one process and on 2 FSDP ranks, each of the first 10 steps (fp32). The runs see the
same rows in the same optimizer steps and differ only in the order of float sums (reduce-scatter,
the all-reduce of the clipping norm, the token count). Measured drift after 10 Adam steps: <= 1e-7
relative on the loss, <= 2.4e-6 on the grad norm (LoRA, growing with the steps). Tolerances:
relative 1e-5 on the loss and 1e-4 on the grad norm, 40-100x the drift, while real errors move
them by far more: a rank training on the wrong rows or a wrong token weighting moves the loss by
> 1e-3, and gradients averaged instead of summed over the ranks halve the grad norm (Adam's
updates are nearly scale-free, so the loss alone shows that only once clipping at 1.0 bites).
LoRA runs with technique.dropout=0: dropout masks come from each rank's own RNG stream. The LoRA
run accumulates 2 micro-batches per rank with the reduce-scatter skipped on the first (the full
run syncs both), so both paths count; prompt tuning's encoder is replicated, not sharded, and
the engine sums its gradients itself.

The matrix runs each technique through the trainer's own pieces in one 2-rank process group for
every layout (fsdp_worker.py): full shard, CPU offload, hybrid (a (2 replicate x 1 shard) mesh, which
exercises HSDP's all-reduce across replicas; full, LoRA, QLoRA and prompt tuning only). No cell is rejected by validation: every technique
trains under FSDP2, QLoRA included (FSDP2 gathers a unit's mixed dtypes, the packed 4-bit
bfloat16 bytes next to fp32 norms, as bytes). What validation does reject for FSDP (shard groups
that do not tile the ranks) is checked without a launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distributed.helpers import REPO, TECHNIQUES, engine_run, step_metrics, summary_of

WORKER = os.path.join(REPO, "tests", "distributed", "fsdp_worker.py")


for _technique in ("full", "lora", "prompt"):
    engine_run(_technique, "single"), engine_run(_technique, "fsdp")
engine_run("lora", "fsdp_offload", 1)


@pytest.mark.parametrize("technique", ["full", "lora", "prompt"])
def test_fsdp_on_two_ranks_matches_one_process(trainings, technique):
    single_dir, _ = trainings.finished(engine_run(technique, "single"))
    fsdp_dir, _ = trainings.finished(engine_run(technique, "fsdp"))
    for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4)):
        a, b = step_metrics(single_dir, key), step_metrics(fsdp_dir, key)
        assert len(a) == len(b) == 10
        for step, (x, y) in enumerate(zip(a, b), start=1):
            assert y == pytest.approx(x, rel=rel), f"step {step} {key}: single {x} vs fsdp {y}"
    losses = step_metrics(fsdp_dir, "loss")
    assert losses[-1] < losses[0] * (0.98 if technique == "prompt" else 0.95)  # it learns
    summary = summary_of(fsdp_dir)
    assert (summary["parallel"], summary["world_size"], summary["grad_accum_steps"]) == ("fsdp", 2, 2)
    # The CLI built the model on the meta device and filled the shards from rank 0's one copy;
    # the losses above equal one process's, so what arrived is the model a single run builds.
    assert summary["model_build"] == "meta" and single_dir and summary_of(single_dir)["model_build"] == "eager"
    logs = trainings[engine_run(technique, "fsdp")]["logs"]
    assert "[rank0]" in logs[0] and "[rank1]" in logs[1]
    # Evaluation and generation ran on the sharded model, both ranks in lockstep.
    single = summary_of(single_dir)
    assert summary["eval_after"]["loss"] == pytest.approx(single["eval_after"]["loss"], rel=1e-5)
    assert summary["eval_after"]["num_generated"] == single["eval_after"]["num_generated"] == 4


def test_fsdp_on_one_process_matches_single(trainings):
    """parallel=fsdp_offload on one process (one GPU whose optimizer state lives in host memory):
    the engine makes its own 1-rank group; nothing is split, so the losses are those of
    parallel=single (measured: identical)."""
    single_dir, _ = trainings.finished(engine_run("lora", "single"))
    fsdp_dir, _ = trainings.finished(engine_run("lora", "fsdp_offload", 1))
    assert step_metrics(fsdp_dir, "loss") == pytest.approx(step_metrics(single_dir, "loss"), rel=1e-6)
    assert summary_of(fsdp_dir)["world_size"] == 1
    assert summary_of(fsdp_dir)["model_build"] == "eager"  # one rank: nothing to save by building on meta


def test_adapters_saved_by_fsdp_reload_on_one_process(trainings):
    """The adapter gathered from the shards and saved by rank 0 reloads into a plain PeftModel on
    one process and scores the run's own held-out loss (rel 1e-5: the same forward, once
    all-gathered, once not; measured: identical). Its tensors are the trained ones: LoRA B starts
    at zero, and they match the single-process run's adapter (atol 1e-4; measured 2e-6 on weights
    up to 0.14)."""
    import torch
    from safetensors.torch import load_file

    from distft.checkpoint.export import load_model
    from distft.checkpoint.verify import resolve_checkpoint
    from distft.data.batching import eval_batches
    from distft.data.pipeline import prepare_data
    from distft.evaluation.evaluate import held_out_loss

    fsdp_dir, _ = trainings.finished(engine_run("lora", "fsdp"))
    single_dir, _ = trainings.finished(engine_run("lora", "single"))
    cfg, model, tokenizer = load_model(fsdp_dir)
    data = prepare_data(cfg.data, tokenizer, seed=cfg.data.seed)
    held_out = eval_batches(data.eval, cfg.eval.batch_size, cfg.data.max_seq_len, cfg.data.packing,
                            tokenizer.pad_token_id)
    loss = held_out_loss(model, held_out, "cpu")["loss"]
    assert loss == pytest.approx(summary_of(fsdp_dir)["eval_after"]["loss"], rel=1e-5)

    def adapter(run_dir):
        return load_file(os.path.join(resolve_checkpoint(run_dir), "model", "adapter_model.safetensors"))

    saved, reference = adapter(fsdp_dir), adapter(single_dir)
    assert sorted(saved) == sorted(reference)
    assert sum("lora_B" in name for name in saved) == 7 * 4 + 1  # 7 linears per layer, and lm_head
    for name, tensor in saved.items():
        assert tensor.numel() > 0 and torch.isfinite(tensor).all(), name
        if "lora_B" in name:
            assert tensor.abs().max() > 0, f"{name} is still zero: the saved adapter is untrained"
        assert torch.allclose(tensor, reference[name], atol=1e-4), name


def launch_worker(out_dir, layouts: dict) -> dict[str, list[dict]]:
    """One 2-rank launch of fsdp_worker.py for every layout: each layout's results, by rank."""
    plan = os.path.join(str(out_dir), "plan.json")
    with open(plan, "w") as f:
        json.dump([{"layout": name, "parallel": name, "args": args} for name, (args, *_) in layouts.items()], f)
    # Every allocation of 1 MiB or more gets its own mapping, returned to the OS when freed, so a
    # rank's peak RSS counts the tensors it really held (not malloc's reuse of freed heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         WORKER, str(out_dir), plan],
        capture_output=True, text=True, cwd=REPO, timeout=900, env=env,
    )
    results = []
    for rank in (0, 1):
        path = os.path.join(out_dir, f"rank{rank}.json")
        assert os.path.exists(path), proc.stderr[-4000:]
        with open(path) as f:
            results.append(json.load(f))
    failed = {f"{layout}/{name}": cell["traceback"] for r in results for layout, found in r["layouts"].items()
              for name, cell in found["cells"].items() if "error" in cell}
    assert proc.returncode == 0 and not failed, (failed or proc.stderr[-4000:])
    return {layout: [r["layouts"][layout] for r in results] for layout in layouts}


# Hybrid sharding changes nothing technique-specific: one technique of each kind is enough there.
HYBRID_TECHNIQUES = ("full", "lora", "qlora", "prompt")
LAYOUTS = {
    # parallel, worker args, mesh, placements, local share of the parameters, offload policy
    "fsdp": (["--meta", "--extras"], [2], ["S(0)"], 0.5, "OffloadPolicy"),
    "fsdp_offload": ([], [2], ["S(0)"], 0.5, "CPUOffloadPolicy"),
    "fsdp_hybrid": (["parallel.fsdp.shard_size=1", f"--only={','.join(HYBRID_TECHNIQUES)}"], [2, 1], ["R", "S(0)"],
                    1.0, "OffloadPolicy"),
}


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    done = launch_worker(tmp_path_factory.mktemp("fsdp-layouts"), LAYOUTS)
    return done.__getitem__


@pytest.mark.parametrize("parallel", list(LAYOUTS))
def test_every_technique_trains_on_every_fsdp_layout(worker_results, parallel):
    rank0, rank1 = worker_results(parallel)
    _, mesh, placements, local_share, offload = LAYOUTS[parallel]
    expected = set(HYBRID_TECHNIQUES if parallel == "fsdp_hybrid" else TECHNIQUES)
    expected |= {"full_bf16", "qlora_bf16_fp32_storage"} if parallel == "fsdp" else set()
    assert set(rank0["cells"]) == set(rank1["cells"]) == expected
    for name, cell in rank0["cells"].items():
        other = rank1["cells"][name]
        assert "rejected" not in cell, f"{name}: {cell.get('rejected')}"
        # One unit per decoder layer (tiny: 4) plus the root, which is the model object itself.
        assert cell["engine"] == "FSDPEngine" and cell["units"] == 5 and cell["root_is_model"], name
        assert cell["mesh"] == mesh and cell["placements"] == placements, name
        # Everything is sharded but the virtual-token encoder of prefix/prompt tuning (whole on
        # every rank: PEFT runs it on rank 0 alone to save the adapter).
        if name in ("prefix", "prompt"):
            assert cell["not_sharded"] == ["prompt_encoder.default.embedding.weight"], name
        else:
            assert cell["not_sharded"] == [], name
        assert cell["local_fraction"] == pytest.approx(local_share, abs=0.01), name
        assert cell["offload"] == [offload], name
        # Evaluation and greedy generation on the sharded model (every rank in lockstep) give
        # what the same model gave before sharding: the same forward, all-gathered. bf16 cells:
        # FSDP gathers parameters in bf16 where the reference autocasts fp32 ones (~3e-6 seen).
        tolerance = 1e-4 if "bf16" in name else 1e-6
        assert cell["eval_sharded"] == pytest.approx(cell["eval_unsharded"], rel=tolerance), name
        assert cell["answers_sharded"] == cell["answers_unsharded"], name
        assert cell["accumulation"] == 2
        # Both ranks report the same (all-reduced) step losses and global grad norm.
        assert cell["losses"] == other["losses"] and cell["grad_norms"] == other["grad_norms"], name
        assert all(norm > 0 for norm in cell["grad_norms"]), name
        # It learns: the same held-out batches score at least 2% lower after a few steps
        # (measured: 4-20%; an eval loss on fixed batches has no sampling noise).
        assert cell["eval_trained"] < 0.98 * cell["eval_unsharded"], (name, cell["eval_trained"])
        assert cell["losses"][-1] < cell["losses"][0], name
        # The full state dict comes back on rank 0 only, with the keys the model had before
        # sharding, as plain CPU tensors holding the real (trained / untouched) values.
        assert other["gathered"] is None, name
        assert cell["gathered"] == {"same_keys": True, "same_shapes": True, "plain_cpu": True,
                                    "trainable": cell["gathered"]["trainable"], "trainable_changed": True,
                                    "frozen_identical": True}, name
        assert cell["gathered"]["trainable"] > 0
        # Each rank wrote its own shards of the training state (DCP), plus the non-tensor rest.
        assert cell["state_files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "engine_state.json"], name
        # Saved by the trainer's save_checkpoint from the gathered weights (prompt/prefix tuning
        # too: PEFT runs their encoder on rank 0 to save it) and reloaded by load_model on one
        # rank: it scores what the sharded model scored. Measured: identical in fp32; QLoRA 1e-5
        # (bitsandbytes' CPU eval kernels repack unsharded 4-bit weights); bf16 cells 5e-5 (the
        # sharded model gathers bf16 parameters, the reloaded one autocasts fp32 ones).
        reload_rel = 5e-4 if "bf16" in name else 1e-4 if "qlora" in name else 1e-6
        assert cell["eval_reloaded"] == pytest.approx(cell["eval_trained"], rel=reload_rel), name
        assert "eval_reloaded" not in other


def test_offload_and_hybrid_layouts_compute_what_full_shard_computes(worker_results):
    """Where parameters live and how ranks split the work must not change the math. CPU offload
    is bitwise identical here (same device); the (2 x 1) hybrid mesh sums the clipping norm over
    whole replicated gradients instead of shards: measured <= 5e-7 relative, and for QLoRA (bf16
    compute amplifies it) 1.4e-5 on the loss, 6.7e-5 on the grad norm."""
    full_shard = worker_results("fsdp")[0]["cells"]
    for parallel in ("fsdp_offload", "fsdp_hybrid"):
        cells = worker_results(parallel)[0]["cells"]
        assert set(cells) >= set(HYBRID_TECHNIQUES)
        for technique in cells:
            loss_rel, norm_rel = (2e-4, 1e-3) if technique == "qlora" else (1e-5, 1e-5)
            a, b = full_shard[technique], cells[technique]
            assert b["losses"] == pytest.approx(a["losses"], rel=loss_rel), (parallel, technique)
            assert b["grad_norms"] == pytest.approx(a["grad_norms"], rel=norm_rel), (parallel, technique)


def test_meta_device_loading_shards_before_allocating(worker_results):
    """A model built on the meta device, sharded, then filled from rank 0 equals the eagerly built
    one (every tensor, and the held-out loss, so the rotary buffers too): LoRA, prompt tuning
    (PEFT aliases the word embeddings), tied embeddings, a local model directory. Memory, on a 57M-param
    model (227 MB fp32): rank 1's peak host memory grows by its shard plus one tensor in flight
    (measured 0.53x the model), while building the model eagerly costs it a full copy (measured
    1.00x; each peak is taken above the resident set its path starts from). Bound: below 0.75x
    for the meta path, above it for the eager one."""
    rank0, rank1 = worker_results("fsdp")
    assert set(rank0["meta"]) == {"lora", "prompt_text_init", "full_tied", "full_local_dir"}
    for case, meta in rank0["meta"].items():
        assert meta["built_on_meta"] and meta["state_equal"] is True, case
        assert meta["meta_loss"] == meta["eager_loss"] == rank1["meta"][case]["meta_loss"], case
    memory = rank1["memory"]
    full = memory["full_bytes"]
    assert full > 200e6 and memory["local_bytes"] == pytest.approx(full / 2, rel=0.01)
    assert memory["meta_delta_bytes"] < 0.75 * full, memory
    assert memory["eager_delta_bytes"] > 0.75 * full, memory  # the measurement does see a full copy


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel=fsdp_hybrid", "parallel.fsdp.shard_size=3"],
         "parallel.fsdp.shard_size=3 does not divide the world size 2"),
        (["parallel=fsdp", "parallel.fsdp.shard_size=2"],
         "parallel.fsdp.shard_size=2 is only read with parallel.fsdp.hybrid_shard=true"),
        (["parallel=fsdp_hybrid", "parallel.fsdp.shard_size=-1"], "parallel.fsdp.shard_size=-1 must be >= 0"),
    ],
)
def test_fsdp_layouts_that_cannot_work_are_rejected(overrides, message):
    from distft.preflight import preflight

    _, errors = preflight(["+experiment=tiny_lora", "launcher.nproc_per_node=2", *overrides])
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_every_technique_is_a_valid_fsdp_config():
    from distft.preflight import preflight

    for parallel in ("fsdp", "fsdp_offload", "fsdp_hybrid"):
        for technique in TECHNIQUES:
            argv = [f"+experiment=tiny_{technique}", f"parallel={parallel}", "launcher.nproc_per_node=2"]
            assert preflight(argv)[1] == [], argv
