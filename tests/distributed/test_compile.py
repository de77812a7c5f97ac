"""train.compile=true (distft/engines/compile.py): the compiled decoder layers train as the eager
ones do (LoRA, 2 FSDP2 ranks, gradient checkpointing); the checkpoint holds the eager model's
tensors; what cannot compile whole is refused before the run."""

from __future__ import annotations

import pytest

from distft.preflight import preflight
from distft.validation import compile_problem
from tests.distributed.helpers import COMMON, declare_run, engine_run, final_weights, step_metrics, summary_of

# Beside the engine tests' one-process reference (the "engines" set of the shared runs). One
# compiled run covers the common case and both hard ones: PEFT's LoRA layers inside the graph,
# FSDP2's hooks around it, and gradient checkpointing recomputing it in backward.
SINGLE_LORA = engine_run("lora", "single")
COMPILED = declare_run("fsdp-lora-compiled-checkpointed",
                       ["+experiment=tiny_lora", *COMMON, "technique.dropout=0.0", "parallel=fsdp",
                        "launcher.nproc_per_node=2", "train.compile=true", "train.gradient_checkpointing=true"])


def _same_training(reference: str, compiled: str) -> None:
    for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4)):
        a, b = step_metrics(reference, key), step_metrics(compiled, key)
        assert len(a) == len(b) == 10
        for step, (x, y) in enumerate(zip(a, b), start=1):
            assert y == pytest.approx(x, rel=rel), f"step {step} {key}: eager {x} vs compiled {y}"
    eager, summary = summary_of(reference), summary_of(compiled)
    assert summary["eval_after"]["loss"] == pytest.approx(eager["eval_after"]["loss"], rel=1e-5)
    assert summary["eval_after"]["num_generated"] == eager["eval_after"]["num_generated"] == 4
    weights, reference_weights = final_weights(compiled), final_weights(reference)
    assert sorted(weights) == sorted(reference_weights)  # the eager model's names: no _orig_mod
    for name, tensor in weights.items():
        assert tensor.float().sub(reference_weights[name].float()).abs().max() < 1e-4, name


def test_compiled_layers_train_as_the_eager_ones(trainings):
    """LoRA on 2 FSDP ranks under gradient checkpointing, compiled, against one eager process.
    Without dynamo's skip_fwd_side_effects_in_bwd_under_checkpoint every layer broke its graph in
    the recomputation (measured)."""
    reference, _ = trainings.finished(SINGLE_LORA)
    compiled, _ = trainings.finished(COMPILED)
    _same_training(reference, compiled)
    summary = summary_of(compiled)
    assert (summary["technique"], summary["parallel"], summary["world_size"]) == ("lora", "fsdp", 2)
    logs = trainings[COMPILED]["logs"]
    assert "train.compile=true: 4 decoder layers compiled" in logs[0]
    lines = [line for line in logs[0].splitlines() if "train.compile: " in line]
    assert len(lines) == 1, logs[0][-3000:]
    # A few graphs serve the 4 layers (forward, backward), and nothing fell back to eager.
    assert lines[0].endswith("no graph breaks") and "INFO" in lines[0], lines[0]
    assert 1 <= int(lines[0].split("train.compile: ")[1].split()[0]) <= 4, lines[0]


def _problems(*overrides: str) -> list[str]:
    _, errors = preflight(list(overrides))
    return errors


def test_what_cannot_compile_whole_is_refused_before_the_run():
    assert not _problems("+experiment=tiny_lora", "train.compile=true", "parallel=fsdp")
    zero3 = _problems("+experiment=tiny_lora", "train.compile=true", "parallel=zero3")
    assert len(zero3) == 1 and "train.compile=true does not work with parallel=zero3" in zero3[0]
    assert "use parallel=ddp, zero1, zero2 or fsdp, or set train.compile=false" in zero3[0]
    prefix = _problems("+experiment=tiny_prefix", "train.compile=true")
    assert len(prefix) == 1 and "technique=prefix" in prefix[0] and "recompile limit" in prefix[0]
    assert not _problems("+experiment=tiny_prompt", "train.compile=true")
    flex = _problems("model=tiny", "train.device=cpu", "model.attn_implementation=flex_attention")
    assert len(flex) == 1 and "no backward on the CPU" in flex[0]


def test_a_machine_without_a_compiler_is_named_before_the_run(monkeypatch, tmp_path):
    assert compile_problem("cpu") is None  # make setup's machines have g++
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    problem = compile_problem("cpu")
    assert problem and "needs a C++ compiler" in problem and "train.compile=false" in problem
