"""Preference tuning's math (distft/model/preference.py) against TRL's DPOTrainer (issue 40's parity
point): on the same model, batch and beta, the DPO loss, the rewards and the gradients agree to
1e-5 relative in fp32, for full fine-tuning (the reference a frozen copy of the starting model) and
LoRA (the reference the base, adapters off). The batch is the one TRL's own collator builds from
{prompt, chosen, rejected} rows (chosen rows first, then rejected; its completion mask marking
the answers), so the two differ only in how they compute.

The policy is moved off its reference first (a random step on every trainable weight), so the
rewards are far from zero and each pair's sigmoid weight differs.
"""

from __future__ import annotations

import copy

import pytest
import torch

from distft.data.samples import IGNORE_INDEX
from distft.model.preference import answer_logps, pair_losses, pair_metrics, split_pairs

BETA = 0.1
ROWS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
         "rejected": f" Maybe {i + 7}, I think so{'.' * i}"} for i in range(4)]


def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256))


def nudge(model) -> None:
    """A random step on every trainable weight: the policy no longer equals its reference."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def trl_step(model, ref_model, tokenizer, tmp_path, loss_type="sigmoid"):
    """TRL's loss on its first batch, its logged metrics and the gradients; and the batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), beta=BETA, loss_type=[loss_type], per_device_train_batch_size=4,
                     report_to=[], use_cpu=True, max_length=128, save_strategy="no", bf16=False)  # fp32: TRL's default bf16
    # would wrap the reference's forward in autocast
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return float(loss), metrics, grads, batch


def distft_step(model, reference, batch, loss_type="sigmoid"):
    """distft's loss, its metrics (means over the pairs) and the gradients, on TRL's batch."""
    model.zero_grad()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}  # as the engines call it
    logps, tokens = answer_logps(model(**inputs).logits, labels)
    with torch.no_grad(), reference() as ref_model:
        ref_logps, _ = answer_logps(ref_model(**inputs).logits, labels)
    (pc, pr), (rc, rr), (tc, tr) = split_pairs(logps), split_pairs(ref_logps), split_pairs(tokens)
    losses, chosen_rewards, rejected_rewards = pair_losses(pc, pr, rc, rr, BETA, loss_type, tc, tr)
    loss = losses.mean()
    loss.backward()
    pairs = losses.numel()
    metrics = {k: float(v) / pairs for k, v in pair_metrics(chosen_rewards, rejected_rewards, pc, pr).items()}
    return float(loss), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(trl, ours):
    trl_loss, trl_metrics, trl_grads, _ = trl
    loss, metrics, grads = ours
    assert loss == pytest.approx(trl_loss, rel=1e-5)
    for key, value in metrics.items():
        assert value == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    assert abs(metrics["rewards/margins"]) > 0.01  # a real comparison: the policy is off its reference
    assert sorted(grads) == sorted(trl_grads) and grads
    for name, grad in grads.items():
        scale = float(trl_grads[name].abs().max())
        assert float((grad - trl_grads[name]).abs().max()) <= 1e-5 * scale + 1e-9, name


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_full_fine_tuning_matches_trl(tmp_path, loss_type):
    from distft.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("llama3")
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_model(tokenizer)
    reference = copy.deepcopy(model).eval()
    nudge(model)
    trl = trl_step(copy.deepcopy(model), copy.deepcopy(reference), tokenizer, tmp_path, loss_type)

    def frozen():
        from contextlib import nullcontext

        return nullcontext(reference)

    assert_same(trl, distft_step(model, frozen, trl[3], loss_type))


def test_lora_matches_trl_with_the_base_as_reference(tmp_path):
    """TRL given a LoRA config adds a fresh adapter and scores the reference with it disabled, as
    distft does; both then start from the same adapter, nudged."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig, DPOTrainer

    from distft.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("llama3")
    tokenizer.pad_token = tokenizer.eos_token
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    args = DPOConfig(output_dir=str(tmp_path), beta=BETA, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                     max_length=128, save_strategy="no", bf16=False)
    trainer = DPOTrainer(model=tiny_model(tokenizer), args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer, peft_config=config)
    nudge(trainer.model)  # the adapter's A and B: the policy leaves the base
    model = get_peft_model(tiny_model(tokenizer), config)  # not a deepcopy: TRL's forward patch points at its own
    model.load_state_dict(trainer.model.state_dict())
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trl = (float(loss), {k: v[-1] for k, v in trainer._metrics["train"].items()},
           {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}, batch)

    def base():
        import contextlib

        @contextlib.contextmanager
        def adapters_off():
            with model.disable_adapter():
                yield model
        return adapters_off()

    assert_same(trl, distft_step(model, base, batch))
