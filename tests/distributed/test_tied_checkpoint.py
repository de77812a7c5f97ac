"""A tied output head stored once by the sharded engines, on 2 real gloo ranks and the real
SmolLM2-135M-Instruct (its `lm_head.weight` is `model.embed_tokens.weight`, 28M of its 135M weights).

ZeRO-3 and FSDP gather the full weights for the checkpoint's model/ as copies, one per name, and
FSDP's DCP state lists the head under its own key: each stored the 113 MB embedding matrix twice
(engines/tied.py). Here each engine's checkpoint holds it once and exports a model whose held-out
loss is the one the run measured on its live sharded model; FSDP's resumes exactly (run B: run A
stopped after its step-1 checkpoint and started again).

Resume is checked on FSDP only: its training state is the DCP state that tied.py now writes
without the head's name. ZeRO-3 resumes from DeepSpeed's own state files, which tied.py does not
touch (they hold each parameter once already); its exact resume is tests/distributed/test_resume.py's,
and a third real-model launch here cost ~70 s of the suite's 40-minute budget.

One 2-rank launch for both engines (helpers.declare_run, share "tied"): run A trains 2 steps on
64-token rows with a checkpoint after each, run B the second step again.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from distft.model.pretrained import smollm2_dir
from tests.distributed.helpers import declare_run, final_weights, step_metrics, summary_of

SHARED_RUNS = "tied"
ENGINES = ("zero3", "fsdp")
RESUMED = ("fsdp",)
PARAMETERS = 134_515_008  # SmolLM2-135M's weights, the tied matrix counted once
FP32_BYTES = 4 * PARAMETERS
ARGS = [
    f"model.name_or_path={smollm2_dir() or 'SmolLM2-135M-Instruct-is-not-prepared'}", "technique=full",
    "train.max_steps=2", "checkpoint.save_every=1", "checkpoint.keep_last=0", "train.warmup_steps=0",
    "train.lr=5e-5", "data.synthetic.num_examples=200", "data.max_seq_len=64", "train.global_batch_size=4",
    "train.micro_batch_size=2", "train.eval_every=0", "train.log_every=1", "eval.num_samples=1",
    "eval.max_new_tokens=1", "eval.compare_base=false", "tracking.wandb.mode=disabled", "tracking.plot=false",
    "tracking.progress_bar=false", "launcher.nproc_per_node=2",
]
for _parallel in ENGINES:
    _a = declare_run(f"tied-a-{_parallel}", [*ARGS, f"parallel={_parallel}"], share=SHARED_RUNS)
    if _parallel in RESUMED:
        declare_run(f"tied-b-{_parallel}", [*ARGS, f"parallel={_parallel}"], resume_from=(_a, 1), share=SHARED_RUNS)


@pytest.fixture(scope="module")
def runs(smollm2, trainings):
    """The module's runs (one launch, the first time a test reads them); fails when SmolLM2 is missing."""
    return trainings


def files_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(parent, name)) for parent, _, names in os.walk(directory) for name in names)


@pytest.mark.parametrize("parallel", ENGINES)
def test_the_tied_weight_is_stored_once(runs, parallel):
    run_dir, _ = runs.finished(f"tied-a-{parallel}")
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000001")
    weights = os.path.join(checkpoint, "model", "model.safetensors")
    with safe_open(weights, "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    # Every weight once in fp32 (was 651 MB: the 113 MB matrix twice), plus the header.
    assert FP32_BYTES < os.path.getsize(weights) < FP32_BYTES * 1.001
    # The training state: fp32 weights and Adam's two moments, each once (FSDP's was 1730 MB).
    state = files_bytes(os.path.join(checkpoint, "state"))
    assert 3 * FP32_BYTES < state < 3 * FP32_BYTES * 1.005, state
    if parallel == "fsdp":
        import torch.distributed.checkpoint as dcp

        saved = dcp.FileSystemReader(os.path.join(checkpoint, "state")).read_metadata().state_dict_metadata
        assert "model.model.embed_tokens.weight" in saved and not [k for k in saved if "lm_head" in k]


@pytest.mark.parametrize("parallel", RESUMED)
def test_a_run_resumes_exactly_from_it(runs, parallel):
    a, _ = runs.finished(f"tied-a-{parallel}")
    b, log = runs.finished(f"tied-b-{parallel}")
    assert summary_of(b)["resumed_from"].endswith("step_000001")
    assert "step 2/2 " in log and "step 1/2 " not in log  # B trained step 2 only, from the checkpoint
    assert step_metrics(b) == step_metrics(a) and len(step_metrics(a)) == 2
    assert step_metrics(b, "grad_norm") == step_metrics(a, "grad_norm")
    weights_a, weights_b = final_weights(a), final_weights(b)
    assert set(weights_a) == set(weights_b) and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    base = load_file(os.path.join(smollm2_dir(), "model.safetensors"))["model.embed_tokens.weight"]
    assert not torch.equal(weights_a["model.embed_tokens.weight"].to(base.dtype), base)  # the tied matrix trained


@pytest.mark.parametrize("parallel", ENGINES)
def test_its_export_scores_the_loss_the_run_measured(runs, parallel, tmp_path, capsys):
    """Exported in float32 (the run's own precision on the CPU), reloaded by transformers with its
    head tied to the trained embeddings: the held-out loss is the run's own final evaluation of
    its live sharded model."""
    from transformers import AutoModelForCausalLM

    from distft.checkpoint.export import checkpoint_config, load_tokenizer_from
    from distft.commands.export import main
    from distft.data.cache import prepared
    from distft.data.pipeline import prepare_data
    from distft.evaluation.evaluate import held_out_loss

    run_dir, _ = runs.finished(f"tied-a-{parallel}")
    summary = summary_of(run_dir)
    checkpoint = summary["final_checkpoint"]
    out = tmp_path / "exported"
    assert main([checkpoint, "--out", str(out), "--dtype", "float32"]) == 0
    assert "weights in float32, as asked (--dtype)" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    cfg = checkpoint_config(checkpoint)
    tokenizer = load_tokenizer_from(checkpoint)
    data = prepared(cfg.data, tokenizer, cfg.data.seed, str(tmp_path / "data"), prepare_data).data
    from distft.data.batching import eval_batches

    batches = eval_batches(data.eval, cfg.eval.batch_size, cfg.data.max_seq_len, cfg.data.packing,
                           tokenizer.pad_token_id, cfg.data.pack_strategy)
    loss = held_out_loss(model, batches, "cpu")
    assert loss["tokens"] == summary["eval_after"]["tokens"]
    assert loss["loss"] == pytest.approx(summary["eval_after"]["loss"], rel=1e-5)
