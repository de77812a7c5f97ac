"""Export in the dtype the base was distributed in, and a tied weight stored once, on the real
SmolLM2-135M-Instruct (bf16 safetensors, `lm_head` tied to the embeddings).

A one-step full fine-tune of it (one process, 64-token rows, lr 5e-5) is exported: by default in
bfloat16, the base's dtype (269 MB, where float32 took 538 MB), saying so, and warning that most
updates of one small step round away in bf16; in float32 when asked, with every update kept. Its
checkpoint's DCP state holds the tied matrix once, and a state written before (holding it under
both names) still loads.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from distft.config import Config
from distft.preflight import preflight

PARAMETERS = 134_515_008  # SmolLM2-135M's weights, the tied matrix counted once


def smollm2_args(smollm2: str, root) -> list[str]:
    return [f"model.name_or_path={smollm2}", "technique=full", "train.max_steps=1", "train.warmup_steps=0",
            "train.lr=5e-5", "data.synthetic.num_examples=200", "data.max_seq_len=64", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.eval_every=0", "eval.num_samples=1", "eval.max_new_tokens=1",
            "eval.compare_base=false", "tracking.wandb.mode=disabled", "tracking.plot=false",
            "tracking.progress_bar=false", f"run.root={root}"]


def compose(*overrides: str) -> Config:
    cfg, errors = preflight(list(overrides))
    assert errors == [], errors
    return cfg


@pytest.fixture(scope="module")
def checkpoint(smollm2, tmp_path_factory) -> str:
    """The final checkpoint of a one-step full fine-tune of SmolLM2 (fp32 weights, as trained on the CPU)."""
    from distft.train import train

    return train(compose(*smollm2_args(smollm2, tmp_path_factory.mktemp("smollm2"))))["final_checkpoint"]


def tensors_of(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def test_export_defaults_to_the_base_models_dtype_and_warns_when_updates_round_away(checkpoint, smollm2, tmp_path,
                                                                                     capsys):
    from transformers import AutoModelForCausalLM

    from distft.commands.export import main

    out = tmp_path / "bf16"
    assert main([checkpoint, "--out", str(out)]) == 0
    said = capsys.readouterr()
    err = said.err
    assert said.out.splitlines() == ["weights in bfloat16, the base model's dtype; --dtype float32 to keep full "
                                     "precision", f"exported: {out}"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    size = os.path.getsize(out / "model.safetensors")
    assert 2 * PARAMETERS < size < 2 * PARAMETERS * 1.001  # the base's own size (was 538 MB in float32)
    exported = tensors_of(str(out))
    assert "lm_head.weight" not in exported and {t.dtype for t in exported.values()} == {torch.bfloat16}
    # The warning's fraction is the real one: elements bit-identical to the base's bf16 weights.
    base = tensors_of(smollm2)
    same = sum(int((exported[k] == base[k]).sum()) for k in exported)
    fraction = same / sum(t.numel() for t in exported.values())
    assert 0.5 < fraction < 1  # one small step: most updates round away, not all
    found = re.search(r"distft: warning: (\d+\.\d)% of the exported weights are bit-identical to the base model's "
                      r"in bfloat16.*export with --dtype float32 to keep them", err)
    assert found, err
    assert float(found.group(1)) == pytest.approx(100 * fraction, abs=0.051)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_a_float32_export_keeps_every_update_and_says_so(checkpoint, tmp_path, capsys):
    from distft.commands.export import main

    out = tmp_path / "fp32"
    assert main([checkpoint, "--out", str(out), "--dtype", "float32"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines()[0] == "weights in float32, as asked (--dtype)" and "warning" not in said.err
    assert 4 * PARAMETERS < os.path.getsize(out / "model.safetensors") < 4 * PARAMETERS * 1.001
    exported, trained = tensors_of(str(out)), tensors_of(os.path.join(checkpoint, "model"))
    assert set(exported) == set(trained) and all(torch.equal(exported[k], trained[k]) for k in trained)


def test_the_export_dtype_follows_the_base(smollm2):
    from distft.checkpoint.export import export_dtype

    assert export_dtype(compose("+experiment=tiny_full")) == (
        torch.float32, "weights in float32, as trained (a from-scratch model has no distributed dtype); "
                       "--dtype bfloat16 for half the size")
    cfg = compose(f"model.name_or_path={smollm2}", "technique=lora")
    assert export_dtype(cfg)[0] == torch.bfloat16
    assert export_dtype(cfg, torch.float16) == (torch.float16, "weights in float16, as asked (--dtype)")


def test_the_single_process_state_holds_the_tied_weight_once(checkpoint):
    import torch.distributed.checkpoint as dcp

    with safe_open(os.path.join(checkpoint, "model", "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    saved = dcp.FileSystemReader(os.path.join(checkpoint, "state")).read_metadata().state_dict_metadata
    assert "model.model.embed_tokens.weight" in saved and not [k for k in saved if "lm_head" in k]
    state = sum(os.path.getsize(os.path.join(checkpoint, "state", n)) for n in os.listdir(os.path.join(checkpoint,
                                                                                                        "state")))
    assert 3 * 4 * PARAMETERS < state < 3 * 4 * PARAMETERS * 1.005  # weights, Adam's two moments: once each


def test_a_state_saved_with_the_tied_weight_twice_still_loads(smollm2, tmp_path, monkeypatch):
    """What distft wrote before (the head under its own key too) and what it writes now both
    restore the trained weights, tied, and the optimizer state into a fresh engine."""
    import torch.distributed.checkpoint as dcp

    from distft import dist
    from distft.config import grad_accum_steps
    from distft.engines import dcp as engine_dcp
    from distft.run import build_run
    from distft.train import optimizer_step

    cfg = compose(*smollm2_args(smollm2, tmp_path))
    cpu = torch.device("cpu")
    run = build_run(cfg, dist.from_env(), cpu)
    trained = run.engine
    micro = iter(run.batches)
    optimizer_step(trained, [next(micro) for _ in range(grad_accum_steps(cfg))])
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    trained.save_state(new)
    with monkeypatch.context() as patch:
        patch.setattr(engine_dcp, "tied_aliases", lambda model: {})  # the state as saved before the fix
        trained.save_state(old)
    assert "model.lm_head.weight" in dcp.FileSystemReader(old).read_metadata().state_dict_metadata
    assert "model.lm_head.weight" not in dcp.FileSystemReader(new).read_metadata().state_dict_metadata
    expected = {k: v.clone() for k, v in trained.unwrapped().state_dict().items()}
    moments = [state["exp_avg"].clone() for state in trained.optimizer.state.values()]
    del trained, run, micro
    for path in (new, old):
        engine = build_run(cfg, dist.from_env(), cpu).engine  # the base's weights, no optimizer state
        model = engine.unwrapped()
        assert not torch.equal(model.lm_head.weight, expected["lm_head.weight"])
        engine.load_state(path)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        loaded = model.state_dict()
        assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected), path
        assert all(torch.equal(state["exp_avg"], m) for state, m in zip(engine.optimizer.state.values(), moments))
        del engine, model, loaded
