"""The loss without the full logits (issue 36, section 1; distft/model/loss.py): the output head and the
cross-entropy computed together, chunk by chunk, give the loss and every gradient of the plain
path (the head's [tokens, V] logits, then `token_loss`), on the real SmolLM2-135M-Instruct (tied
embeddings: the head's weight is the input embedding matrix) and on a Llama-3-size vocabulary,
while a step's tensor peak no longer holds four [tokens, V] fp32 tensors."""

from __future__ import annotations

import pytest
import torch

from distft.model.build import model_inputs, token_loss
from distft.model.loss import chunk_tokens, computing_loss, output_head
from distft.tracking import MemoryMeter
from tests.unit.test_prefix_init import batch, config

LLAMA3_VOCAB = 128_256
EXACT = 1e-6  # relative, fp32


def gradients(model, rows, chunked: bool, scale: float = 1.0):
    """(loss sum, tokens, {name: grad}) of one forward and backward of `scale` x the summed loss,
    the gradients divided by `scale` again; chunked: through computing_loss, else the plain path."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks (LoRA's) every time
    labels = rows["labels"]
    if chunked:
        with computing_loss(model, labels) as armed:
            loss, tokens = armed.result(model(**model_inputs(rows), use_cache=False).logits)
        assert armed.used  # the head was armed: the model returned the loss, not logits
    else:
        loss, tokens = token_loss(model(**model_inputs(rows), use_cache=False).logits, labels)
    (loss * scale).backward()
    grads = {name: p.grad / scale for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), int(tokens), grads


def difference(grads_a: dict, grads_b: dict) -> float:
    """|b - a| / |a| over the whole gradient (every trainable tensor)."""
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads_a.values()]))
    return float(torch.linalg.vector_norm(torch.stack([(grads_b[k] - g).norm() for k, g in grads_a.items()])) / norm)


def assert_same(model, rows):
    """The chunked path's loss to 1e-6 relative, its whole gradient and grad norm to 1e-6 of the
    plain path's, or, where the plain path's own rounding is larger, to twice that rounding: the
    plain path's gradient when the loss is scaled by 1/tokens first (as the trainer scales it),
    an equally exact computation. Measured: SmolLM2 full 7.1e-7, LoRA 7.4e-7, prompt tuning
    1.6e-6, whose 20 virtual tokens get their gradient through all 30 layers (its plain path
    moves by 1.8e-6 under the scale), 128k vocabulary 1.3e-7."""
    loss_a, tokens_a, grads_a = gradients(model, rows, chunked=False)
    loss_b, tokens_b, grads_b = gradients(model, rows, chunked=True)
    assert tokens_a == tokens_b > 0
    assert float(loss_b) == pytest.approx(float(loss_a), rel=EXACT)
    assert set(grads_a) == set(grads_b) and grads_a
    error = difference(grads_a, grads_b)
    if error > EXACT:  # measured only where needed: one more forward and backward
        rounding = difference(grads_a, gradients(model, rows, chunked=False, scale=1 / tokens_a)[2])
        assert error <= 2 * rounding, (error, rounding)
    norms = [torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])) for grads in (grads_a, grads_b)]
    assert float(norms[1]) == pytest.approx(float(norms[0]), rel=EXACT)  # the grad norm a run logs and clips
    return grads_b


@pytest.mark.parametrize("technique", ["full", "lora", "prompt"])
def test_the_loss_and_its_gradients_equal_the_full_logits_on_smollm2(smollm2, smollm2_tokenizer, technique):
    """Full fine-tuning trains the tied head/embedding matrix (both its gradients meet in one
    parameter), LoRA only adapters below a frozen head, prompt tuning puts 20 virtual positions
    in front of the labels."""
    from distft.techniques.build import build_trainable_model

    torch.manual_seed(0)
    cfg = config(smollm2, f"technique={technique}")
    model = build_trainable_model(cfg, torch.float32, smollm2_tokenizer)
    head = output_head(model)
    assert head is not None and head.weight is model.get_input_embeddings().weight  # tied, and armed
    rows = {key: value[:2] for key, value in batch(smollm2_tokenizer).items()}  # two conversations
    grads = assert_same(model, rows)
    if technique == "full":  # the head's and the embedding's gradients met in the one matrix
        assert "model.embed_tokens.weight" in grads and "lm_head.weight" not in grads


def llama3_vocab_model(tokens: int, vocab: int = LLAMA3_VOCAB):
    """A Llama-3-size vocabulary (or `vocab`) under tiny layers (so the loss is the step's memory), and one row
    of `tokens` tokens with its first quarter masked out as a prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=tokens, tie_word_embeddings=False))
    input_ids = torch.randint(0, vocab, (1, tokens))
    labels = input_ids.clone()
    labels[:, : tokens // 4] = -100
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_a_128k_vocabulary_gives_the_same_loss_and_gradients():
    model, rows = llama3_vocab_model(384)  # 3 chunks of at most 130 target tokens
    assert chunk_tokens(LLAMA3_VOCAB, 287) == 130
    assert_same(model, rows)


def step_peak(model, rows, chunked: bool) -> int:
    """The tensor peak of one forward and backward, as tracking.cpu_memory_steps measures a run."""
    model.zero_grad(set_to_none=True)
    meter = MemoryMeter(torch.device("cpu"), cpu_steps=1)
    if chunked:
        with computing_loss(model, rows["labels"]) as armed:
            loss, _ = armed.result(model(**model_inputs(rows), use_cache=False).logits)
    else:
        loss, _ = token_loss(model(**model_inputs(rows), use_cache=False).logits, rows["labels"])
    loss.backward()
    meter.stop()
    return meter.peak()


def test_a_2048_token_step_at_128k_holds_no_full_logits():
    """Before: four [2048, 128256] fp32 tensors at the peak (the logits, their shifted copy, the
    log-softmax, the gradient: 4.2 GB, the issue's 4.15 GB). Now one chunk's working set (twice
    LOSS_CHUNK_BYTES) and the [tokens, hidden] gradient: the loss's share of the step is small
    beside the weights' gradients (the 128k x 64 head and embeddings, 33 MB each)."""
    model, rows = llama3_vocab_model(2048)
    logits_bytes = 2048 * LLAMA3_VOCAB * 4
    chunked = step_peak(model, rows, chunked=True)
    assert chunked < 0.25 * logits_bytes, chunked / 2**20  # 1.05 GB of fp32 logits never exist at once
    assert chunked < 1.0 * 2**30


def test_evaluation_scores_through_the_same_path():
    """held_out_loss arms the head too: the same number as the plain path, without the full logits."""
    from distft.evaluation.evaluate import held_out_loss

    model, rows = llama3_vocab_model(2048)
    with torch.no_grad():
        plain_sum, tokens = token_loss(model(**model_inputs(rows)).logits, rows["labels"])
    meter = MemoryMeter(torch.device("cpu"), cpu_steps=1)
    scored = held_out_loss(model, [rows], "cpu")
    meter.stop()
    assert scored["tokens"] == int(tokens)
    assert scored["loss"] == pytest.approx(float(plain_sum) / int(tokens), rel=EXACT)
    assert meter.peak() < 0.25 * 2048 * LLAMA3_VOCAB * 4


def test_bf16_autocast_follows_the_plain_paths_rounding():
    """Under bf16 autocast the head's matmul runs in bf16 and the log-softmax in fp32, as the plain
    path does: the same loss to bf16's matmul rounding, the same gradients to a few bf16 ulps,
    in the parameters' own fp32 (Llama-2's 32,000 vocabulary: bf16 matmuls are slow on CPUs)."""
    model, rows = llama3_vocab_model(128, vocab=32_000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, _, grads_a = gradients(model, rows, chunked=False)
        loss_b, _, grads_b = gradients(model, rows, chunked=True)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-3)
    assert all(grads_b[k].dtype == g.dtype == torch.float32 for k, g in grads_a.items())
    assert difference(grads_a, grads_b) <= 2e-2


def test_a_head_that_is_not_a_plain_linear_keeps_the_logits():
    """A LoRA on the head itself (PEFT's lora.Linear): the chunked path cannot read one weight, so
    the model returns logits and token_loss scores them, the same numbers."""
    from peft import LoraConfig, get_peft_model

    base, rows = llama3_vocab_model(64)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    assert output_head(model) is None
    with computing_loss(model, rows["labels"]) as armed:
        loss, tokens = armed.result(model(**model_inputs(rows)).logits)
    assert not armed.used
    with torch.no_grad():
        expected, _ = token_loss(model(**model_inputs(rows)).logits, rows["labels"])
    assert float(loss.detach()) == pytest.approx(float(expected), rel=EXACT) and int(tokens) == 48  # 63 shifted, 15 masked
