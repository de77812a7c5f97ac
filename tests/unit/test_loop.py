"""The loop's switches one by one: schedule, clipping, gradient checkpointing, bf16 autocast,
early stopping."""

from __future__ import annotations

import math
import os

import pytest
import torch

from distft.engines import build_engine, lr_lambda
from distft.preflight import preflight


def compose(*overrides: str):
    cfg, errors = preflight(list(overrides))
    assert errors == [], errors
    return cfg


def test_warmup_then_cosine_and_linear_schedules():
    # Linear warm-up reaches the peak at the end of warm-up...
    assert [lr_lambda(s, 4, 20, "cosine", 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # ...cosine decays to min_lr_ratio at max_steps, through the midpoint value.
    assert lr_lambda(4, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_lambda(12, 4, 20, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(12, 4, 20, "linear", 0.0) == pytest.approx(0.5)
    assert lr_lambda(15, 4, 20, "constant", 0.1) == 1.0


def _step_batch(cfg):
    from distft.data.batching import eval_batches
    from distft.data.pipeline import prepare_data
    from distft.model.build import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, seed=0)
    return eval_batches(data.train[:8], 4, cfg.data.max_seq_len, cfg.data.packing, tokenizer.pad_token_id)


def _engine(cfg):
    from distft.techniques.build import build_trainable_model

    torch.manual_seed(0)
    return build_engine(cfg, build_trainable_model(cfg, torch.float32), torch.device("cpu"))


@pytest.mark.parametrize("technique", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_step(technique):
    from distft.train import optimizer_step

    results = []
    for checkpointing in ("false", "true"):
        cfg = compose(f"technique={technique}", "data.synthetic.num_examples=100", "technique.dropout=0.0",
                      f"train.gradient_checkpointing={checkpointing}", "train.adam_eps=1.0")
        engine = _engine(cfg)
        engine.train()
        loss, tokens, grad_norm, _ = optimizer_step(engine, _step_batch(cfg))
        params = {k: v.detach().clone() for k, v in engine.unwrapped().named_parameters() if v.requires_grad}
        results.append((loss, grad_norm, params))
        model = engine.unwrapped()
        assert getattr(model, "is_gradient_checkpointing", False) == (checkpointing == "true")
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert norm_a == pytest.approx(norm_b, rel=1e-4) and norm_a > 0
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_update_and_reports_the_raw_norm():
    from distft.model.build import token_loss

    cfg = compose("data.synthetic.num_examples=100", "train.grad_clip=0.01", "train.lr=100.0",
                  "train.adam_beta1=0.0", "train.adam_eps=100.0", "train.weight_decay=0.0", "train.warmup_steps=0")
    engine = _engine(cfg)
    before = {k: v.detach().clone() for k, v in engine.unwrapped().named_parameters()}
    batch = _step_batch(cfg)[0]
    s, n = token_loss(engine.forward(batch), batch["labels"])
    engine.backward(s / n)
    norm = engine.step()
    assert norm > 0.01  # the returned norm is the raw one, before clipping
    # With eps >> |g| Adam's step is lr * g / eps = g here: the update's norm is the clipped norm.
    delta = torch.sqrt(sum(((p.double() - before[k].double()) ** 2).sum()
                           for k, p in engine.unwrapped().named_parameters()))
    assert float(delta) == pytest.approx(0.01, rel=1e-2)


def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16():
    cfg = compose("data.synthetic.num_examples=100", "train.precision=bf16")
    engine = _engine(cfg)
    batch = _step_batch(cfg)[0]
    logits = engine.forward(batch)
    assert logits.dtype == torch.bfloat16
    fp32 = _engine(compose("data.synthetic.num_examples=100", "train.precision=fp32")).forward(batch)
    assert fp32.dtype == torch.float32
    assert torch.allclose(logits.float(), fp32, atol=0.1)


def test_early_stopping_stops_when_eval_loss_stops_improving(tmp_path):
    from distft.tracking import read_metrics
    from distft.train import train

    # min_delta larger than any possible improvement: the first eval sets the best, the next
    # `patience` evals cannot beat it, so training stops at step eval_every * (1 + patience).
    cfg = compose("+experiment=tiny_full", f"run.root={tmp_path}", "train.max_steps=50", "train.eval_every=2",
                  "train.early_stopping_patience=2", "train.early_stopping_min_delta=100", "eval.num_samples=2",
                  "eval.max_new_tokens=2", "train.log_every=1")
    summary = train(cfg)
    assert summary["stopped_early"] is True
    assert summary["steps"] == 6
    evals = [r["step"] for r in read_metrics(f"{summary['run_dir']}/metrics.jsonl") if "eval_perplexity" in r]
    assert evals == [2, 4, 6]
    assert math.isfinite(summary["eval_after"]["loss"])


def test_early_stopping_keeps_scores_and_hands_on_the_best_checkpoint(tmp_path, capsys):
    """Issue 19, item 2: the best eval's checkpoint is saved when it happens, survives keep_last,
    and is what the final report, summary, `distft.evaluation.evaluate` and `distft.checkpoint.export` use; resuming
    still continues from the newest; loss.png is drawn with the best marked."""
    import json

    from distft.checkpoint.store import read_best
    from distft.checkpoint.verify import find_resumable, resolve_checkpoint
    from distft.commands.evaluate import main as evaluate_main
    from distft.tracking import read_metrics
    from distft.train import train

    # The first eval (step 2) is the best; steps 4 and 6 cannot beat it by 100: stop at step 6.
    cfg = compose("+experiment=tiny_lora", f"run.root={tmp_path}", "train.max_steps=50", "train.eval_every=2",
                  "train.early_stopping_patience=2", "train.early_stopping_min_delta=100", "eval.num_samples=3",
                  "eval.max_new_tokens=4", "train.log_every=1", "checkpoint.keep_last=1", "data.max_seq_len=128",
                  "eval.compare_base=false", "tracking.progress_bar=false")
    summary = train(cfg)
    run_dir = summary["run_dir"]
    assert summary["stopped_early"] and summary["steps"] == 6 and summary["best_step"] == 2
    best = os.path.join(run_dir, "checkpoints", "step_000002")
    last = os.path.join(run_dir, "checkpoints", "step_000006")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["best.json", "latest", "step_000002",
                                                                       "step_000006"]  # keep_last=1 spared the best
    assert summary["final_checkpoint"] == last and summary["evaluated_checkpoint"] == best
    record = read_best(run_dir)
    assert record["step"] == 2 and record["default"] is True and "stopped early at step 6" in record["why"]
    # The final evaluation scored the best weights: its loss is step 2's eval loss, not step 6's.
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
             if "eval_perplexity" in r}
    assert summary["eval_after"]["loss"] == pytest.approx(evals[2], rel=1e-6)
    assert summary["eval_after"]["loss"] != pytest.approx(evals[6], rel=1e-6)
    report = open(os.path.join(run_dir, "eval_report.md")).read()
    assert report.startswith("# Evaluation report: tiny_lora\n\n**What this job shows**: a ")
    assert f"- checkpoint: {best} (the best eval loss, {evals[2]:.4f} at step 2; training stopped early" in report
    assert "**Best checkpoint**: this report scores step_000002" in report
    assert os.path.getsize(os.path.join(run_dir, "loss.png")) > 1000
    # evaluate and export take the best for the run directory, and say so; resume takes the newest.
    assert resolve_checkpoint(run_dir) == best
    assert find_resumable(run_dir) == last
    assert evaluate_main([run_dir, "--no-base", "--num-samples", "2"]) == 0
    err = capsys.readouterr().err
    assert f"distft: using the best checkpoint {best} (eval loss {evals[2]:.4f} at step 2; training stopped" in err
    assert f"the newest is step_000006: pass {last} for it" in err
    scored = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    assert scored["evaluated_checkpoint"] == best


def test_keep_best_without_early_stopping_keeps_the_last_when_it_is_best(tmp_path):
    """checkpoint.keep_best saves each new best eval's checkpoint; when the last model scores at
    least as well (a loss still falling), the last is the result and best.json points at it."""
    from distft.checkpoint.store import read_best
    from distft.checkpoint.verify import resolve_checkpoint
    from distft.train import train

    cfg = compose("+experiment=tiny_lora", f"run.root={tmp_path}", "train.max_steps=6", "train.eval_every=2",
                  "checkpoint.keep_best=true", "eval.num_samples=1", "eval.max_new_tokens=1", "data.max_seq_len=128",
                  "eval.compare_base=false", "tracking.progress_bar=false", "train.lr=3e-3")
    summary = train(cfg)
    run_dir = summary["run_dir"]
    saved = sorted(n for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.startswith("step_"))
    assert saved == ["step_000004", "step_000006"]  # the best evals' (2, then 4) and the final; keep_last=2
    record = read_best(run_dir)
    assert record["step"] == 6 and record["default"] and record["eval_loss"] == pytest.approx(summary["eval_after"]["loss"])
    assert summary["evaluated_checkpoint"] == summary["final_checkpoint"] == resolve_checkpoint(run_dir)
    # The summary names the same best as best.json: the last step, not the best periodic eval (4).
    assert (summary["best_step"], summary["best_eval_loss"]) == (6, record["eval_loss"])
    assert not summary["stopped_early"]


def test_a_last_model_better_than_every_periodic_eval_is_the_runs_best(tmp_path):
    """Issue 20: the default job's loss still falls at its last step. Its summary and loss.png
    marked the best periodic eval (step 300 of 400) as the run's best while the plotted final eval
    loss lay below it; the best is the last step's, as the report's note says."""
    from distft.tracking import read_metrics
    from distft.train import train

    cfg = compose("+experiment=tiny_lora", f"run.root={tmp_path}", "train.max_steps=6", "train.eval_every=2",
                  "eval.num_samples=1", "eval.max_new_tokens=1", "data.max_seq_len=128", "eval.compare_base=false",
                  "tracking.progress_bar=false", "train.lr=3e-3")
    summary = train(cfg)
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl"))
             if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 6] and evals[6] < min(evals[2], evals[4])
    assert summary["best_step"] == 6 and summary["best_eval_loss"] == pytest.approx(evals[6], rel=1e-9)
    assert summary["best_eval_loss"] == pytest.approx(summary["eval_after"]["loss"], rel=1e-9)
    report = open(os.path.join(summary["run_dir"], "eval_report.md")).read()
    assert f"The last model (step 6) is the best: its eval loss {evals[6]:.4f} is below every periodic eval's" in report


def test_the_logged_lr_is_the_lr_the_step_applied(tmp_path):
    """metrics.jsonl's lr of step s (1-based) is the optimizer's lr during that step: the peak
    times lr_lambda(s - 1). It used to log the scheduler's lr after the step, the next step's."""
    from distft.tracking import read_metrics
    from distft.train import train

    cfg = compose("+experiment=tiny_full", f"run.root={tmp_path}", "train.max_steps=6", "train.warmup_steps=3",
                  "train.log_every=1", "eval.num_samples=1", "eval.max_new_tokens=1", "eval.compare_base=false",
                  "train.lr=1e-3")
    summary = train(cfg)
    logged = [(r["step"], r["lr"]) for r in read_metrics(f"{summary['run_dir']}/metrics.jsonl") if "lr" in r]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    for step, lr in logged:
        assert lr == pytest.approx(1e-3 * lr_lambda(step - 1, 3, 6, "cosine", 0.1), rel=1e-12), step
    assert logged[0][1] == pytest.approx(1e-3 / 3)  # the first step: 1/3 of the peak, not 2/3
    # Both losses, named: the last step's and the run's token-weighted mean (Hugging Face's train_loss).
    losses = [r["loss"] for r in read_metrics(f"{summary['run_dir']}/metrics.jsonl") if "loss" in r]
    assert summary["final_train_loss"] == losses[-1]
    assert min(losses) < summary["mean_train_loss"] < max(losses) and summary["mean_train_loss"] > losses[-1]


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_fp16_weights_for_full_fine_tuning_are_refused_in_every_precision(precision):
    _, errors = preflight(["+experiment=tiny_full", "model.dtype=float16", f"train.precision={precision}"])
    assert len(errors) == 1 and "model.dtype=float16 with technique=full: fp16 cannot hold AdamW's" in errors[0]
    assert "eps 1e-8 is 0 in fp16" in errors[0]


def test_a_step_that_leaves_weights_non_finite_stops_the_run_before_anything_is_saved(tmp_path, monkeypatch):
    """A weight turned NaN right after step 3's update (loss and gradients finite, as an fp16
    overflow in the update does): the run stops at step 3 naming it; step 2's checkpoint is
    intact, nothing of step 3 or later is saved, no summary is written."""
    import os

    from distft.checkpoint.verify import verify
    from distft.train import NonFiniteError, train

    monkeypatch.setenv("DISTFT_FAULTS", "nan_weights:3")
    run_dir = tmp_path / "run"
    cfg = compose("+experiment=tiny_full", f"run.dir={run_dir}", "train.max_steps=6", "checkpoint.save_every=2",
                  "eval.num_samples=1", "eval.max_new_tokens=1", "eval.compare_base=false")
    with pytest.raises(NonFiniteError, match=r"step 3 left trainable weights non-finite \(rank 0: model\.embed_tokens"):
        train(cfg)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_000002"]
    assert verify(str(run_dir / "checkpoints" / "step_000002")) == []
    assert not (run_dir / "summary.json").exists()


def test_no_checkpoint_and_no_export_is_ever_written_from_non_finite_weights(tmp_path):
    """The save guard on its own (what protects runs whose weights live in host memory, where the
    per-step check is off) and the export guard (a checkpoint written by an older distft, here
    by save_checkpoint directly): both refuse with one message and leave nothing behind."""
    import os

    from distft.checkpoint.checkpointer import Checkpointer, nonfinite_parameters
    from distft.checkpoint.export import export
    from distft.checkpoint.store import save_checkpoint
    from distft.dist import DistInfo
    from distft.errors import CheckpointError, NonFiniteError
    from distft.run import TrainState, build_run

    cfg = compose("+experiment=tiny_full", f"run.dir={tmp_path / 'run'}")
    run = build_run(cfg, DistInfo(), torch.device("cpu"))
    engine, tokenizer, batches = run.engine, run.tokenizer, run.batches
    assert nonfinite_parameters(engine) == []
    with torch.no_grad():
        engine.unwrapped().model.layers[1].mlp.up_proj.weight[3, 5] = float("inf")
    assert nonfinite_parameters(engine) == ["model.layers.1.mlp.up_proj.weight"]
    checkpointer = Checkpointer(run, str(tmp_path / "run"), TrainState(step=4))
    with pytest.raises(NonFiniteError, match=r"refusing to save step 4: .*model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpointer.save(4)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    legacy = save_checkpoint(str(tmp_path / "run"), 4, engine, tokenizer, cfg,
                             {"step": 4, "loop": {}, "data": batches.state_dict(), "world_size": 1,
                              "parallel": "single"}, None)
    with pytest.raises(CheckpointError, match=r"holds non-finite weights \(model\.layers\.1\.mlp\.up_proj"):
        export(legacy, str(tmp_path / "merged"))
    assert not os.path.exists(tmp_path / "merged") and not os.path.exists(tmp_path / "merged.tmp")


@pytest.mark.parametrize("parallel, why", [
    ("fsdp", "FSDP2's parameters are DTensor shards, which bitsandbytes' optimizer kernels do not take"),
    ("zero2", "DeepSpeed ZeRO steps the optimizer on its own flat partitions"),
    ("zero3", "DeepSpeed ZeRO steps the optimizer on its own flat partitions"),
])
def test_bitsandbytes_optimizers_are_refused_where_the_engine_cannot_run_them(parallel, why):
    for optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        _, errors = preflight(["+experiment=tiny_lora", f"parallel={parallel}", "launcher.nproc_per_node=2",
                               f"train.optimizer={optimizer}"])
        assert len(errors) == 1 and errors[0].startswith(f"train.optimizer={optimizer} runs on parallel=single|ddp only")
        assert why in errors[0] and "use train.optimizer=adamw" in errors[0]
    _, errors = preflight(["+experiment=tiny_lora", "train.optimizer=sgd"])
    assert len(errors) == 1 and "train.optimizer='sgd'" in errors[0] and "paged_adamw_8bit" in errors[0]
    # The QLoRA presets train with paged 8-bit AdamW on one GPU; sharded, they say what to change.
    _, errors = preflight(["+experiment=qlora_13b", f"parallel={parallel}", "launcher.nproc_per_node=2"])
    assert any("train.optimizer=paged_adamw_8bit runs on parallel=single|ddp only" in e for e in errors)


def test_each_optimizer_is_the_implementation_it_names(caplog):
    """torch's AdamW (fused only where every trained parameter is on a GPU, so not here) and
    bitsandbytes' three, with the same groups and hyperparameters; a paged one on the CPU says
    once that it runs unpaged, and bitsandbytes' own warning about it is not repeated."""
    import logging
    import warnings

    import bitsandbytes

    expected = {"adamw": torch.optim.AdamW, "adamw_8bit": bitsandbytes.optim.AdamW8bit,
                "paged_adamw_8bit": bitsandbytes.optim.PagedAdamW8bit,
                "paged_adamw_32bit": bitsandbytes.optim.PagedAdamW32bit}
    for name, cls in expected.items():
        cfg = compose("+experiment=tiny_full", f"train.optimizer={name}", "train.weight_decay=0.1",
                      "train.adam_beta2=0.99")
        from distft.engines import build_optimizer
        from distft.techniques.build import build_trainable_model

        model = build_trainable_model(cfg, torch.float32)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distft"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer, _ = build_optimizer(cfg, model)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
        assert type(optimizer) is cls
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
        assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-8 for g in optimizer.param_groups)
        said = [r.getMessage() for r in caplog.records if "paging needs CUDA" in r.getMessage()]
        assert len(said) == (1 if name.startswith("paged") else 0)
        assert not [w for w in caught if "Paged optimizers are not supported" in str(w.message)]
        if name == "adamw":
            assert not optimizer.defaults["fused"]


def test_train_state_round_trips_and_reads_older_checkpoints():
    """TrainState is what trainer_state.json holds under "loop": its dict has the keys checkpoints
    always had (so older ones load), and a key a checkpoint lacks stays at its default."""
    import json

    from distft.run import TrainState

    state = TrainState(step=7, train_tokens=900, best_eval_loss=1.5, eval_before={"loss": 2.0, "samples": [1]})
    saved = json.loads(json.dumps(state.state_dict()))
    assert set(saved) == {"step", "train_tokens", "train_target_tokens", "train_time_s", "best_eval_loss",
                          "evals_without_improvement", "stopped_early", "eval_before", "nonfinite_steps",
                          "train_loss_sum", "train_loss_tokens", "last_train_loss", "best_step"}
    loaded = TrainState()
    loaded.load_state_dict(saved)
    assert loaded == state
    older = {k: v for k, v in saved.items()
             if k not in ("train_loss_sum", "train_loss_tokens", "last_train_loss", "best_step")}
    fresh = TrainState()
    fresh.load_state_dict({**older, "a_key_from_elsewhere": 1})
    assert fresh.step == 7 and fresh.train_loss_sum == 0.0 and fresh.train_loss_tokens == 0
    assert fresh.last_train_loss is None and fresh.best_step is None
    assert json.loads(json.dumps(TrainState().state_dict()))["best_eval_loss"] == math.inf
