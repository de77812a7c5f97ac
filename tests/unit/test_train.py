"""The trainer end to end on one CPU process: every technique learns, accumulation is exact,
checkpoints export to a model that generates the same tokens, secrets never leak, the CLI keeps
its contracts (run_dir line, summary.json, deterministic run directory).

The tests that start a process: tests/cli/test_train.py."""

from __future__ import annotations

import os

import pytest
import torch

from distft.preflight import preflight
from distft.tracking import read_metrics

TECHNIQUES = ["full", "lora", "qlora", "dora", "prefix", "prompt"]
SECRET = "sk-distft-test-0123456789abcdefghijklmnop"


def compose(*overrides: str):
    cfg, errors = preflight(list(overrides))
    assert errors == [], errors
    return cfg


def fast(tmp_path, *overrides: str) -> list[str]:
    """Overrides that keep a tiny run to seconds while it still learns; a key in `overrides`
    replaces the default's (a command line gives each key once: distft refuses repeats)."""
    defaults = [f"run.root={tmp_path}", "tracking.wandb.mode=disabled", "tracking.progress_bar=false",
                "eval.num_samples=16", "eval.max_new_tokens=12"]
    given = {override.split("=", 1)[0].lstrip("+~") for override in overrides}
    return [d for d in defaults if d.split("=", 1)[0] not in given] + list(overrides)


# Packed rows of 128 tokens instead of the presets' 256 for the LoRA family and the resume check:
# what is checked (it learns, exports and reloads, resumes) does not depend on the row length, and
# a step costs half. Not for full fine-tuning (the base of the virtual-token runs) nor the
# virtual tokens: on 128-token rows prefix tuning's loss fell 3% in 25 steps (5% asked) and prompt
# tuning ended at 0.990 of its control (0.985 asked).
SHORT_ROWS = ["data.max_seq_len=128"]


def tiny_run(technique: str, tmp_path_factory, runs: dict) -> dict:
    """One short training run of `technique`, as `tiny_runs` trains it (prefix and prompt tuning
    from `runs["full"]`'s checkpoint)."""
    from distft.train import train

    tmp = tmp_path_factory.mktemp(technique)
    extra = []
    if technique in ("prefix", "prompt"):
        base = runs["full"]["final_checkpoint"]
        extra = [f"model.name_or_path={base}/model", f"model.tokenizer={base}/tokenizer"]
        if technique == "prompt":
            # It starts from real token embeddings (std 0.02 in this model; techniques.init_text),
            # not PEFT's N(0, 1): the preset's 3e-2 throws that start away in one step.
            extra.append("train.lr=3e-3")
    if technique in ("lora", "dora", "qlora"):
        extra = SHORT_ROWS
    cfg = compose(f"+experiment=tiny_{technique}", *fast(tmp, "train.max_steps=25", "train.log_every=1", *extra))
    return train(cfg)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One short training run per technique, shared by the tests below.

    Prefix and prompt tuning steer a model through virtual tokens, which does little for a random
    network; as in real use they start from a trained base: the full run's checkpoint, loaded
    through `model.name_or_path` (which also covers loading a local Hugging Face directory).
    """
    from distft.train import train

    runs = {}
    for technique in TECHNIQUES:
        runs[technique] = tiny_run(technique, tmp_path_factory, runs)
    # Prompt tuning's control: the same run on the same batches with a learning rate too small to
    # move anything, so "it learns" is judged against the batches' own noise, step for step.
    base = runs["full"]["final_checkpoint"]
    cfg = compose("+experiment=tiny_prompt", *fast(tmp_path_factory.mktemp("prompt_control"), "train.max_steps=25",
                  "train.log_every=1", "train.lr=1e-12", f"model.name_or_path={base}/model",
                  f"model.tokenizer={base}/tokenizer", "eval.num_samples=1", "eval.max_new_tokens=1"))
    runs["prompt_control"] = train(cfg)
    return runs


def step_losses(summary: dict) -> list[float]:
    return [r["loss"] for r in read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_every_technique_trains_with_falling_loss(tiny_runs, technique):
    summary = tiny_runs[technique]
    losses = step_losses(summary)
    assert len(losses) == 25
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    if technique == "prompt":
        # 20 x 128 virtual-token weights move a trained base the least, and batch-to-batch noise is
        # of the same order as 25 steps' progress; so compare with the control on the same batches,
        # where a run that does not learn scores exactly 1.0 (measured: 0.84).
        control = step_losses(tiny_runs["prompt_control"])
        assert len(control) == 25 and control[0] == pytest.approx(losses[0], rel=1e-6)  # same batches, same start
        ratio = sum(losses[-5:]) / sum(control[-5:])
        assert ratio < 0.985, f"prompt: last 5 steps at {ratio:.3f} of the no-learning control's"
    else:
        assert last < first * 0.95, f"{technique}: loss did not fall ({first:.3f} -> {last:.3f})"
    assert summary["technique"] == technique
    if technique not in ("prefix", "prompt"):
        # LoRA-family adapters start as an exact no-op, so 25 steps must already beat the base.
        # Virtual tokens start as a text the base reads first, which perturbs it: 25 steps may not win it back.
        assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["steps"] == 25 and summary["train_tokens"] > 0 and summary["tokens_per_s"] > 0
    for key in ("loss", "perplexity", "exact_match", "f1", "rouge_l"):
        assert key in summary["eval_before"] and key in summary["eval_after"]
    ckpt = summary["final_checkpoint"]
    assert os.path.exists(os.path.join(ckpt, "COMMITTED"))
    weights = "model.safetensors" if technique == "full" else "adapter_model.safetensors"
    assert os.path.exists(os.path.join(ckpt, "model", weights))


def test_a_model_loaded_from_a_path_is_named_by_its_path(tiny_runs):
    """model.name_or_path=<dir> with the tiny preset's defaults: summary.json and the report name
    the directory the weights came from, not the preset ('tiny')."""
    summary = tiny_runs["prefix"]
    expected = f"{tiny_runs['full']['final_checkpoint']}/model"
    assert summary["model"] == expected
    report = open(os.path.join(summary["run_dir"], "eval_report.md")).read()
    assert f"- model: {expected}\n" in report


def test_base_and_tuned_are_scored_on_the_same_prompts(tiny_runs):
    report = open(os.path.join(tiny_runs["lora"]["run_dir"], "eval_report.md")).read()
    assert "| metric | base | tuned | change |" in report
    assert f"{tiny_runs['lora']['eval_after']['loss']:.4f}" in report


@pytest.mark.parametrize("technique", ["full", "lora", "dora", "qlora"])
def test_export_round_trip_generates_the_same_tokens(tiny_runs, technique, tmp_path):
    from transformers import AutoModelForCausalLM

    from distft.checkpoint.export import export, load_base, load_model

    ckpt = tiny_runs[technique]["final_checkpoint"]
    out = export(ckpt, str(tmp_path / "merged"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "adapter_config.json"))
    _, in_framework, tokenizer = load_model(ckpt)
    exported = AutoModelForCausalLM.from_pretrained(out)
    prompts = ["### Instruction:\nUppercase the word.\n\n### Input:\nhello\n\n### Response:\n",
               "### Instruction:\nAdd the two numbers.\n\n### Input:\n12 + 7\n\n### Response:\n",
               "### Instruction:\nReverse the letters.\n\n### Input:\nabcd\n\n### Response:\n"]
    ids_in = _greedy_ids(in_framework.eval(), tokenizer, prompts)
    if technique != "qlora":
        assert _greedy_ids(exported.eval(), tokenizer, prompts) == ids_in
    else:
        _check_same_choices(in_framework, exported.eval(), tokenizer, prompts, ids_in)
    # Not vacuous: the untuned base generates something else.
    cfg, _, _ = load_model(ckpt)
    assert _greedy_ids(load_base(cfg).eval(), tokenizer, prompts) != ids_in


# QLoRA's 4-bit layers compute in bf16 (technique.compute_dtype) where its export holds the
# dequantized base with the adapter merged, computed in fp32: their logits differ by bf16 rounding
# (measured up to 0.06 on this model). Greedy tokens then agree wherever the choice is not a
# near-tie within that (one first token here had a top-2 margin of 0.0001 and flipped with the
# thread count), so the test asks exactly that of every generated token.
QLORA_EXPORT_LOGIT_TOLERANCE = 0.15


def _check_same_choices(in_framework, exported, tokenizer, prompts, answers) -> None:
    """Teacher-forced on the in-framework greedy answers: the exported model's logits are within
    QLORA_EXPORT_LOGIT_TOLERANCE, and it picks the same token at every step whose top-2 margin
    is wider than twice that."""
    clear = 0
    for prompt, answer in zip(prompts, answers):
        ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        x = torch.tensor([ids + answer])
        with torch.no_grad():
            a = in_framework(input_ids=x).logits[0, len(ids) - 1: len(ids) - 1 + len(answer)].float()
            b = exported(input_ids=x).logits[0, len(ids) - 1: len(ids) - 1 + len(answer)].float()
        assert float((a - b).abs().max()) <= QLORA_EXPORT_LOGIT_TOLERANCE
        top = a.topk(2, dim=-1).values
        for position, token in enumerate(answer):
            if float(top[position, 0] - top[position, 1]) > 2 * QLORA_EXPORT_LOGIT_TOLERANCE:
                clear += 1
                assert int(a[position].argmax()) == int(b[position].argmax()) == token, (prompt, position)
    assert clear >= sum(map(len, answers)) // 2  # most choices were clear: the check is not vacuous


def _greedy_ids(model, tokenizer, prompts, new_tokens=12):
    out = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        out.append(gen[0, len(ids):].tolist())
    return out


def test_export_refuses_a_non_empty_directory(tiny_runs, tmp_path):
    from distft.checkpoint.export import export
    from distft.errors import CheckpointError

    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        export(tiny_runs["full"]["final_checkpoint"], str(target))
    assert (target / "keep.txt").read_text() == "mine"


def test_export_prompt_learning_writes_base_and_adapter(tiny_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distft.checkpoint.export import export, load_model

    ckpt = tiny_runs["prefix"]["final_checkpoint"]
    out = export(ckpt, str(tmp_path / "prefix"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(os.path.join(out, "base")),
                                      os.path.join(out, "adapter"))
    _, in_framework, tokenizer = load_model(ckpt)
    prompts = ["### Instruction:\nUppercase the word.\n\n### Input:\nhello\n\n### Response:\n"]
    assert _greedy_ids(model.eval(), tokenizer, prompts) == _greedy_ids(in_framework.eval(), tokenizer, prompts)


def test_gradient_accumulation_matches_one_big_micro_batch():
    """micro-batch 4 x 1 accumulation == micro-batch 1 x 4 accumulations, exactly (token-weighted)."""
    from distft.data.pipeline import eval_batches, prepare_data
    from distft.engines import build_engine
    from distft.model.build import load_tokenizer
    from distft.techniques.build import build_trainable_model
    from distft.train import optimizer_step

    cfg = compose("data.synthetic.num_examples=200", "data.packing=false", "train.grad_clip=0",
                  "train.warmup_steps=0", "train.lr=1e-2",
                  # eps >> |grad| makes Adam's first update proportional to the gradient instead of
                  # ~lr*sign(grad), so float noise in near-zero gradients cannot flip a sign.
                  "train.adam_eps=1.0")
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, seed=0)
    samples = sorted(data.train[:40], key=lambda s: len(s["input_ids"]))[::10][:4]  # four different lengths
    targets = [sum(1 for t in s["labels"][1:] if t != -100) for s in samples]
    assert len(set(targets)) > 1, "the check needs samples with different numbers of target tokens"
    pad = tokenizer.pad_token_id

    def run(micro_size):
        torch.manual_seed(0)
        engine = build_engine(cfg, build_trainable_model(cfg, torch.float32), torch.device("cpu"))
        engine.train()
        batches = eval_batches(samples, micro_size, cfg.data.max_seq_len, False, pad)
        loss, n_targets, _, _ = optimizer_step(engine, batches)
        return loss, n_targets, {k: v.detach().clone() for k, v in engine.unwrapped().named_parameters()}

    loss_big, tokens_big, params_big = run(4)
    loss_small, tokens_small, params_small = run(1)
    assert tokens_big == tokens_small == sum(targets)
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    for name, value in params_big.items():
        torch.testing.assert_close(params_small[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # Control: the same step with a per-micro-batch mean (the common bug) moves the weights differently.
    torch.manual_seed(0)
    model = build_trainable_model(cfg, torch.float32)
    engine = build_engine(cfg, model, torch.device("cpu"))
    from distft.model.build import model_inputs, token_loss

    for batch in eval_batches(samples, 1, cfg.data.max_seq_len, False, pad):
        s, n = token_loss(model(**model_inputs(batch)).logits, batch["labels"])
        (s / n / 4).backward()
    engine.step()
    differs = any(not torch.allclose(p, params_big[k], rtol=1e-5, atol=1e-6) for k, p in model.named_parameters())
    assert differs


def test_secret_overrides_leave_the_command_line_for_the_environment():
    from distft.commands.train import secrets_to_environment

    argv, env, problems = secrets_to_environment([
        f"tracking.wandb.api_key={SECRET}", "train.lr=1e-3", "+launcher.env.HF_TOKEN=hf_abc",
        "+launcher.env.NCCL_SOCKET_IFNAME=ib0", "-m", "--cfg", "job", "tracking.wandb={mode:offline}",
    ])
    assert argv == ["train.lr=1e-3", "+launcher.env.NCCL_SOCKET_IFNAME=ib0", "-m", "--cfg", "job",
                    "tracking.wandb={mode:offline}"]
    assert env == {"WANDB_API_KEY": SECRET, "HF_TOKEN": "hf_abc"} and problems == []
    # Quoted, numeric or not Hydra syntax: the characters meant; null and empty clear a key and stay.
    argv, env, problems = secrets_to_environment(["tracking.wandb.api_key='a b'", "+launcher.env.A_TOKEN=0123",
                                                  "+launcher.env.B_TOKEN=12345", "+launcher.env.C_TOKEN=x]y",
                                                  "tracking.wandb.api_key=null", "+launcher.env.D_TOKEN="])
    assert env == {"WANDB_API_KEY": "a b", "A_TOKEN": "0123", "B_TOKEN": "12345", "C_TOKEN": "x]y"}
    assert argv == ["tracking.wandb.api_key=null", "+launcher.env.D_TOKEN="] and problems == []
    # No variable to go to, several values, a dict holding one: reported, and off the line.
    argv, env, problems = secrets_to_environment(["+model.hf_token=abc", "tracking.wandb.api_key=a,b",
                                                  f"tracking.wandb={{api_key:{SECRET},mode:offline}}"])
    assert argv == [] and env == {}
    assert [p.split(":")[0] for p in problems] == ["model.hf_token", "tracking.wandb.api_key", "tracking.wandb"]
    assert not any(SECRET in p or "abc" in p for p in problems)


def test_rerun_after_a_crash_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """Kill a run after its step-4 checkpoint (here: delete what came after it); running the same
    command again continues from step 4 and produces the same losses as a run never stopped."""
    import shutil

    from distft.train import train

    def cfg_for(root):
        return compose("+experiment=tiny_lora", f"run.root={root}", "train.max_steps=8", "checkpoint.save_every=4",
                       "checkpoint.keep_last=5", "train.log_every=1", "eval.num_samples=4", "eval.max_new_tokens=4",
                       *SHORT_ROWS, "train.global_batch_size=8")

    uninterrupted = train(cfg_for(tmp_path / "a"))
    crashed = train(cfg_for(tmp_path / "b"))
    rdir = crashed["run_dir"]
    os.remove(os.path.join(rdir, "summary.json"))
    shutil.rmtree(os.path.join(rdir, "checkpoints", "step_000008"))
    resumed = train(cfg_for(tmp_path / "b"))
    assert resumed["steps"] == 8

    def losses(summary):
        return [(r["step"], r["loss"]) for r in read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl"))
                if "loss" in r]

    assert [s for s, _ in losses(resumed)] == list(range(1, 9))  # steps 5-8 logged once, not twice
    for (step, a), (_, b) in zip(losses(uninterrupted), losses(resumed)):
        assert a == pytest.approx(b, rel=1e-5), step
    assert resumed["eval_after"]["loss"] == pytest.approx(uninterrupted["eval_after"]["loss"], rel=1e-5)
    assert resumed["eval_before"] == uninterrupted["eval_before"]  # carried over, not recomputed


def test_adapter_checkpoints_hold_the_adapter_only_even_with_lm_head_targeted(tiny_runs):
    """tiny_lora targets lm_head: PEFT's default would also store the frozen head (and, at 7B, 262 MB
    per save); the checkpoint holds LoRA matrices only, and loads and merges as before (the export
    tests above)."""
    from safetensors import safe_open

    path = os.path.join(tiny_runs["lora"]["final_checkpoint"], "model", "adapter_model.safetensors")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    assert any("lm_head.lora_A" in k for k in keys)
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys), [k for k in keys if "lora_" not in k]


def test_the_memory_line_says_what_is_measured_against_which_estimate():
    """One short sentence compares like with like: the busiest rank's measured peak (of what: CUDA
    tensors or live tensors), the plan's sum of the same terms and how far off it is; a resident
    set, which the plan does not count, gets no verdict but the setting that measures tensors."""
    from distft.summary import memory_line

    planned = {"weights": 0.5, "gradients": 0.25, "optimizer": 1.0, "comm": 0.0, "activations": 0.125}
    assert memory_line("cuda_allocated", 2 * 2**30, 2**29, planned) == (
        "memory per rank: 2.000 GiB measured (CUDA tensors), 1.875 GiB planned (6.2% under); the terms are in "
        "summary.json")
    assert "GiB measured (live tensors), 1.875 GiB planned (87.5% over)" in memory_line("cpu_tensors", 2**30, 0, planned)
    assert "(exact)" in memory_line("cpu_tensors", int(1.875 * 2**30), 0, planned)
    rss = memory_line("host_rss", 3 * 2**30, 2**30, planned)
    assert rss == ("memory per rank: 3.000 GiB resident, 1.875 GiB planned for tensors "
                   "(tracking.cpu_memory_steps=2 measures those)")
    assert all(len(memory_line(kind, 2**30, 0, planned)) < 130 for kind in ("cuda_allocated", "cpu_tensors", "host_rss"))
