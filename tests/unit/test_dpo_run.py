"""Preference tuning as a run (objective=dpo, distft/objective.py), one process: the tiny_dpo
preset learns to prefer the right answer over the echoed input, logs TRL's metrics every step,
scores the held-out pairs before and after, keeps the reference's log-probs in the run directory
(those of the model as built), and resumes bit-exactly after a stop signal mid-run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

from distft.errors import Preempted
from distft.preflight import preflight
from tests.distributed.helpers import step_metrics

QUICK = ["+experiment=tiny_dpo", "data.synthetic.num_examples=200", "data.eval_size=8", "train.max_steps=8",
         "train.warmup_steps=2", "train.log_every=1", "eval.num_samples=2", "eval.max_new_tokens=2",
         "tracking.progress_bar=false", "checkpoint.save_every=0"]


def compose(*overrides: str):
    cfg, errors = preflight(list(overrides))
    assert errors == [], errors
    return cfg


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from distft.train import train

    root = tmp_path_factory.mktemp("tiny-dpo")
    return train(compose("+experiment=tiny_dpo", f"run.root={root}", "tracking.progress_bar=false"))


def test_the_demo_learns_the_preference(demo):
    before, after = demo["eval_before"], demo["eval_after"]
    assert before["reward_accuracy"] == 0.0 and before["reward_margin"] == 0.0  # the base is its own reference
    assert after["reward_accuracy"] >= 0.9  # measured 1.0 (40 held-out pairs)
    # The bar: measured 0.725 -> 1.0 (the base already favours the shorter digits of add and count).
    assert after["preference_accuracy"] >= 0.9 and after["preference_accuracy"] > before["preference_accuracy"]
    assert after["preference_margin"] > before["preference_margin"] + 10  # measured 11.9 -> 33.6 nats
    assert after["pairs"] == 40 and demo["steps"] == 50
    rows = [json.loads(line) for line in open(os.path.join(demo["run_dir"], "metrics.jsonl"))]
    logged = [r for r in rows if "rewards/margins" in r]
    assert len(logged) == 6  # steps 1, 10, ..., 50 (train.log_every=10)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "loss"):
        assert all(key in r for r in logged), key
    assert logged[-1]["loss"] < logged[0]["loss"] * 0.6 and logged[-1]["rewards/accuracies"] >= 0.75
    first = logged[0]
    assert first["rewards/margins"] == pytest.approx(first["rewards/chosen"] - first["rewards/rejected"], abs=1e-6)
    report = demo["data"]
    assert (report["loaded"], report["kept"], report["eval"]) == (800, 800, 40)
    text = open(os.path.join(demo["run_dir"], "eval_report.md")).read()
    row = next(line for line in text.splitlines() if line.startswith("| reward_accuracy |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == 0 and float(cells[2]) == pytest.approx(after["reward_accuracy"], abs=5e-5)
    assert "| preference_accuracy |" in text and "DPO's implicit reward" in text


def test_evaluating_the_checkpoint_scores_the_pairs_as_the_run_did(demo, tmp_path):
    """`python -m distft.evaluate` on a dpo checkpoint reads the run's pairs (through the data
    cache, as the run did) and scores base and tuned on the held-out pairs: the same preference
    and reward figures as the run's own eval_before/eval_after (the base is the reference)."""
    from distft.evaluation.evaluate import evaluate_checkpoint

    out, after, before = evaluate_checkpoint(demo["final_checkpoint"], out=str(tmp_path / "report.md"),
                                             num_samples=1)
    for key in ("preference_accuracy", "reward_accuracy"):
        assert after[key] == demo["eval_after"][key] and before[key] == demo["eval_before"][key], key
    for key in ("preference_margin", "reward_margin"):
        assert after[key] == pytest.approx(demo["eval_after"][key], rel=1e-4), key
    assert before["reward_margin"] == 0.0 and after["pairs"] == 40
    assert "| reward_accuracy | 0.0000 | 1.0000 |" in open(out).read()


def test_comparing_the_checkpoint_with_its_base_shows_the_preference(demo, tmp_path):
    """`python -m distft.compare` on a dpo run: each model's held-out preference figures, the
    rewards against the base (the run's reference), as the run's summary has them."""
    from distft.evaluation.compare import compare

    summary = compare([demo["final_checkpoint"]], str(tmp_path / "cmp"), num_samples=1)
    base, tuned = (m["metrics"] for m in summary["models"])
    assert base["preference_accuracy"] == demo["eval_before"]["preference_accuracy"] and base["reward_margin"] == 0
    assert tuned["preference_accuracy"] == demo["eval_after"]["preference_accuracy"]
    assert tuned["reward_margin"] == pytest.approx(demo["eval_after"]["reward_margin"], rel=1e-4)
    assert "| reward_accuracy | 0.0000 | 1.0000 |" in open(summary["report"]).read()


def test_the_reference_is_the_model_as_built_and_is_kept(demo):
    from safetensors.torch import load_file

    tables = load_file(os.path.join(demo["run_dir"], "reference_logps.safetensors"))
    assert tuple(tables["train"].shape) == (760, 2) and tuple(tables["eval"].shape) == (40, 2)
    assert torch.allclose(base_eval_logps(compose("+experiment=tiny_dpo"), 3), tables["eval"][:3], rtol=1e-5)


def base_eval_logps(cfg, count: int) -> torch.Tensor:
    """[count, 2]: the base model's (as built, no adapter) log-probs of the first held-out pairs."""
    from distft.data.preference import pair_batch, prepare_pairs
    from distft.model.build import build_model, load_tokenizer
    from distft.model.preference import answer_logps

    tokenizer = load_tokenizer(cfg.model)
    pairs = prepare_pairs(cfg.data, tokenizer).eval[:count]
    torch.manual_seed(cfg.train.seed)
    base = build_model(cfg.model, torch.float32).eval()
    batch = pair_batch(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = answer_logps(base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False).logits, batch["labels"])
    return torch.stack([logps[:count], logps[count:]], dim=1)


@pytest.mark.parametrize("technique, lr", [("prefix", "1e-2"), ("prompt", "3e-2")])
def test_virtual_token_techniques_prefer_against_the_base_without_them(tmp_path, technique, lr):
    """Prefix and prompt tuning start from trained-in virtual tokens that already change the
    model's answers: the reference is the base without them (PEFT's adapter disabled), so the
    rewards measure what the virtual tokens add, and the held-out rewards grow with training.
    (Packing is off, as for SFT with these techniques: the virtual tokens sit in front of every row.)"""
    from safetensors.torch import load_file

    from distft.train import train

    cfg = compose(*QUICK, f"technique={technique}", "data.packing=false", f"train.lr={lr}",
                  f"run.dir={tmp_path / technique}")
    summary = train(cfg)
    tables = load_file(os.path.join(summary["run_dir"], "reference_logps.safetensors"))
    assert torch.allclose(base_eval_logps(cfg, 3), tables["eval"][:3], rtol=1e-5)
    first = step_metrics(summary["run_dir"], "rewards/margins")[0]
    assert first != 0.0  # step 1's policy (with its virtual tokens) is not its reference
    after = summary["eval_after"]
    assert after["reward_margin"] > 0 and after["reward_accuracy"] >= 0.75


@pytest.mark.parametrize("technique, lr", [("qlora", "3e-2"), ("dora", "1e-2")])
def test_the_other_adapters_prefer_against_their_base(tmp_path, technique, lr):
    """QLoRA (the 4-bit base, adapter off, as the reference) and DoRA (magnitudes and directions:
    off means the base's weights exactly): the reference table is the base's, and the held-out
    rewards grow with training."""
    from safetensors.torch import load_file

    from distft.train import train

    cfg = compose(*QUICK, f"technique={technique}", f"train.lr={lr}", f"run.dir={tmp_path / technique}")
    summary = train(cfg)
    first = step_metrics(summary["run_dir"], "rewards/margins")[0]
    assert first == pytest.approx(0, abs=1e-5)  # step 1's policy is its reference: the adapter starts as the identity
    tables = load_file(os.path.join(summary["run_dir"], "reference_logps.safetensors"))
    if technique == "dora":  # QLoRA's reference is the quantised base, not the fp32 one
        assert torch.allclose(base_eval_logps(cfg, 3), tables["eval"][:3], rtol=1e-5)
    after = summary["eval_after"]
    assert after["reward_margin"] > 0 and after["reward_accuracy"] >= 0.75


def test_a_live_reference_trains_as_the_precomputed_one(tmp_path):
    """objective.reference=live (LoRA): each step scores its pairs' reference with the adapter
    off instead of reading the table; the same steps as with the precomputed table, and only the
    held-out pairs' table is written. Full fine-tuning has no adapter to turn off: refused with
    the way out. Unpacked, as the table is scored: within 1e-4 (the rounding of other batches'
    padding); packed rows round differently again (1.5e-4 measured by step 7 at this lr)."""
    from safetensors.torch import load_file

    from distft.train import train

    lora = [*QUICK, "technique=lora", "technique.dropout=0.0", "train.lr=1e-2", "data.packing=false"]
    table = train(compose(*lora, f"run.dir={tmp_path / 'table'}"))
    live = train(compose(*lora, "objective.reference=live", f"run.dir={tmp_path / 'live'}"))
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
        a, b = step_metrics(table["run_dir"], key), step_metrics(live["run_dir"], key)
        assert len(a) == len(b) == 8 and b == pytest.approx(a, rel=1e-4, abs=1e-6), key
    assert step_metrics(live["run_dir"], "rewards/margins")[0] == pytest.approx(0, abs=1e-5)  # step 1: policy = reference
    assert set(load_file(os.path.join(live["run_dir"], "reference_logps.safetensors"))) == {"eval"}
    assert live["eval_after"]["reward_accuracy"] == table["eval_after"]["reward_accuracy"]
    _, errors = preflight([*QUICK, "objective.reference=live"])
    assert len(errors) == 1 and errors[0].startswith("objective.reference=live with technique=full: ")
    assert "use objective.reference=precomputed" in errors[0]


def test_a_run_stopped_mid_way_resumes_exactly(tmp_path, monkeypatch):
    """Stopped by SIGUSR2 mid-run (sent once the first step is logged; the wait_for_signal fault
    holds step 5 until it has landed, so the stop comes at step 5 at the latest), then resumed:
    the same losses, rewards and final weights as a run never stopped."""
    from safetensors.torch import load_file

    from distft.train import train

    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    whole = train(compose(*QUICK, f"run.dir={tmp_path / 'whole'}"))
    stopped_dir = tmp_path / "stopped"
    monkeypatch.setenv("DISTFT_FAULTS", "wait_for_signal:5")
    sender = threading.Thread(target=lambda: (time.sleep(0.5), os.kill(os.getpid(), signal.SIGUSR2)), daemon=True)
    waiting = threading.Thread(target=lambda: (
        [time.sleep(0.1) for _ in range(600) if not (stopped_dir / "metrics.jsonl").exists()], sender.start()),
        daemon=True)
    waiting.start()
    with pytest.raises(Preempted):
        train(compose(*QUICK, f"run.dir={stopped_dir}"))
    monkeypatch.delenv("DISTFT_FAULTS")
    resumed = train(compose(*QUICK, f"run.dir={stopped_dir}"))
    assert resumed["resumed_from"] and resumed["steps"] == 8
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert step_metrics(str(stopped_dir), key) == step_metrics(whole["run_dir"], key), key
    a = load_file(os.path.join(whole["final_checkpoint"], "model", "model.safetensors"))
    b = load_file(os.path.join(resumed["final_checkpoint"], "model", "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["eval_after"]["reward_margin"] == whole["eval_after"]["reward_margin"]
