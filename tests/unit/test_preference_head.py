"""Preference tuning's log-probs without the full logits (distft/model/loss.py
`computing_token_logps`, issue 40's memory point): the head's matmul and the log-softmax chunk by
chunk in the forward, and again in the backward (a pair's gradient weight, its sigmoid, is known
only after both answers are scored). The DPO loss, its rewards and every gradient equal the plain
path's (the [rows, tokens, V] logits, `answer_logps`) on the real SmolLM2-135M-Instruct (tied
embeddings; full, LoRA, prompt tuning) and at a Llama-3-size vocabulary, and a pair step at 128k
never holds the logits."""

from __future__ import annotations

import pytest
import torch

from distft.model.build import model_inputs
from distft.model.loss import chunk_tokens, computing_token_logps, output_head
from distft.model.preference import answer_logps, answer_sums, pair_losses, split_pairs
from distft.tracking import MemoryMeter
from tests.unit.test_loss_path import LLAMA3_VOCAB, difference, llama3_vocab_model
from tests.unit.test_prefix_init import batch, config

EXACT = 1e-6  # relative, fp32
BETA = 0.1


def dpo_gradients(model, rows, chunked: bool):
    """(per-pair DPO losses, {name: grad}) of one forward and backward of the pairs' summed DPO
    loss; the reference's log-probs are fixed offsets of the policy's, so each pair has its own
    sigmoid weight."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    labels = rows["labels"]
    if chunked:
        with computing_token_logps(model, labels) as armed:
            logps, _ = answer_sums(armed.result(model(**model_inputs(rows), use_cache=False).logits), labels)
        assert armed.used  # the head was armed: the model returned per-token log-probs, not logits
    else:
        logps, _ = answer_logps(model(**model_inputs(rows), use_cache=False).logits, labels)
    chosen, rejected = split_pairs(logps)
    offsets = torch.linspace(-3.0, 2.0, chosen.numel())
    losses, _, _ = pair_losses(chosen, rejected, chosen.detach() + offsets, rejected.detach() - offsets, BETA)
    losses.sum().backward()
    return losses.detach(), logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(model, rows) -> None:
    losses_a, logps_a, grads_a = dpo_gradients(model, rows, chunked=False)
    losses_b, logps_b, grads_b = dpo_gradients(model, rows, chunked=True)
    assert torch.allclose(logps_b, logps_a, rtol=EXACT, atol=0)
    assert torch.allclose(losses_b, losses_a, rtol=EXACT, atol=0)
    assert set(grads_a) == set(grads_b) and grads_a
    assert difference(grads_a, grads_b) <= 2 * EXACT


@pytest.mark.parametrize("technique", ["full", "lora", "prompt"])
def test_the_dpo_loss_and_gradients_equal_the_full_logits_on_smollm2(smollm2, smollm2_tokenizer, technique):
    from distft.techniques.build import build_trainable_model

    torch.manual_seed(0)
    model = build_trainable_model(config(smollm2, f"technique={technique}"), torch.float32, smollm2_tokenizer)
    head = output_head(model)
    assert head is not None and head.weight is model.get_input_embeddings().weight  # tied, and armed
    rows = {key: value[:4] for key, value in batch(smollm2_tokenizer).items()}  # two pairs
    assert_same(model, rows)


def pair_rows(tokens: int, vocab: int = LLAMA3_VOCAB):
    """Two pairs (four rows) of `tokens` tokens at a large vocabulary, each answer its last
    three quarters, the rejected ones right-padded by a few tokens."""
    model, one = llama3_vocab_model(tokens, vocab)
    input_ids = torch.randint(0, vocab, (4, tokens))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2:, tokens - 5:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : tokens // 4] = -100
    return model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_a_128k_vocabulary_gives_the_same_dpo_loss_and_gradients():
    model, rows = pair_rows(96)  # 4 x 71 targets: 3 chunks of at most 130
    assert chunk_tokens(LLAMA3_VOCAB, 4 * 71) == 130
    assert_same(model, rows)


def test_a_pair_step_at_128k_holds_no_full_logits():
    """Two pairs of 1024 tokens: the plain path holds ~4 [4096, 128256] fp32 tensors (8.4 GB);
    the chunked one a chunk's blocks, the head's weight gradient (128k x 64) and the [tokens,
    hidden] gradient: measured 294 MiB, a seventh of one copy of the logits."""
    model, rows = pair_rows(1024)
    model.zero_grad(set_to_none=True)
    meter = MemoryMeter(torch.device("cpu"), cpu_steps=1)
    with computing_token_logps(model, rows["labels"]) as armed:
        logps, _ = answer_sums(armed.result(model(**model_inputs(rows)).logits), rows["labels"])
    chosen, rejected = split_pairs(logps)
    pair_losses(chosen, rejected, chosen.detach(), rejected.detach(), BETA)[0].sum().backward()
    meter.stop()
    logits_bytes = 4 * 1024 * LLAMA3_VOCAB * 4
    assert meter.peak() < 0.2 * logits_bytes, meter.peak() / 2**20
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_packed_answers_sum_by_their_index():
    """Packed rows hold several answers: `sequences` names each position's answer (-1: padding),
    and each answer's log-prob is the sum over its own targets, wherever it sits."""
    labels = torch.tensor([[-100, 5, 6, -100, -100, 7], [-100, 8, -100, 9, 9, -100]])
    sequences = torch.tensor([[0, 0, 0, 2, 2, 2], [1, 1, 3, 3, 3, -1]])
    token_logps = torch.tensor([[-1.0, -2.0, -0.0, -0.0, -4.0], [-8.0, -0.0, -16.0, -32.0, -0.0]])
    sums, tokens = answer_sums(token_logps, labels, sequences)
    assert sums.tolist() == [-3.0, -8.0, -4.0, -48.0] and tokens.tolist() == [2, 1, 1, 2]
