"""Data, prompts and answers on a real pretrained model (issue 35): SmolLM2-135M-Instruct, whose
byte-level BPE tokenizer adds no bos (its bos_token `<|im_start|>` exists but only its ChatML
template writes it), next to the repo's Llama-2 and Llama-3 style tokenizers, which add one.

The rule under test (templates.bos_ids): a training sample is exactly what the tokenizer's own
call gives for the rendered text (+ eos for the instruction templates), so an exported model
prompted the usual way (`tok(prompt)`, `generate`) sees the context it was trained on."""

from __future__ import annotations

import pytest

from distft.config import DataConfig
from distft.data.encoding import encode_rows
from distft.data.pipeline import encode
from distft.data.samples import IGNORE_INDEX
from distft.data.templates import bos_ids, render_row

ROWS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
    {"instruction": "Translate to German.", "input": "Good morning, my friend.", "output": "Guten Morgen, mein Freund."},
    {"instruction": "Sum the numbers.", "input": "12 and 30", "output": "42"},
]
MESSAGES = [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"},
            {"role": "assistant", "content": "6"}]


def _targets(tokenizer, encoded) -> list[str]:
    """The trained text, one string per run of consecutive targets."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = runs + [tokenizer.decode(current)], []
    return runs + ([tokenizer.decode(current)] if current else [])


def test_smollm2_samples_are_its_tokenizers_own_encoding(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert bos_ids(tok) == [] and tok.bos_token == "<|im_start|>"  # a bos token it never adds
    for template in ("alpaca", "plain"):
        cfg = DataConfig(template=template, max_seq_len=512)
        for row in ROWS:
            encoded, rendered = encode(dict(row), "alpaca", cfg, tok)
            assert encoded.input_ids == tok(rendered.text)["input_ids"] + [tok.eos_token_id]
            assert encoded.input_ids[0] != tok.bos_token_id  # main put <|im_start|> before every sample
            assert _targets(tok, encoded) == [row["output"] + "<|im_end|>"]
            assert encoded.input_ids[: encoded.prompt_len] == tok(rendered.prompt)["input_ids"]
    # A conversation is the chat template's text as the tokenizer encodes it: it starts with the
    # template's own <|im_start|> once (main stripped it as a "bos" and put the bos id back).
    encoded, rendered = encode({"messages": MESSAGES}, "chat", DataConfig(max_seq_len=512), tok)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered.text == text and encoded.input_ids == tok(text)["input_ids"]
    assert _targets(tok, encoded) == ["4<|im_end|>", "6<|im_end|>"]
    prompt = tok.apply_chat_template(MESSAGES[:-1], tokenize=False, add_generation_prompt=True)
    assert encoded.input_ids[: encoded.prompt_len] == tok(prompt)["input_ids"]


def test_batch_encoding_follows_the_same_rule(smollm2_tokenizer):
    """encode_rows (the cache's fast path) gives encode_row's ids, with no bos for SmolLM2."""
    import numpy as np

    tok = smollm2_tokenizer
    rendered = [render_row(dict(row), "alpaca", "alpaca", tok) for row in ROWS]
    rendered.append(render_row({"messages": MESSAGES}, "chat", "alpaca", tok))
    for r, (ids, targets, prompt_len) in zip(rendered, encode_rows(rendered, tok, 512)):
        expected, _ = (encode({"messages": MESSAGES}, "chat", DataConfig(max_seq_len=512), tok) if r.messages else
                       encode(dict(ROWS[rendered.index(r)]), "alpaca", DataConfig(max_seq_len=512), tok))
        assert ids.tolist() == expected.input_ids
        assert (ids[0] == tok.bos_token_id) == bool(r.messages)  # only the ChatML text starts with <|im_start|>
        assert np.flatnonzero(targets).tolist() == [i for i, x in enumerate(expected.labels) if x != IGNORE_INDEX]
        assert prompt_len == expected.prompt_len


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_tokenizers_that_add_bos_get_it_once(family):
    from distft.data.tokenizers import build_tokenizer

    tok = build_tokenizer(family)
    assert bos_ids(tok) == [tok.bos_token_id]
    for row in ROWS:
        encoded, rendered = encode(dict(row), "alpaca", DataConfig(template="alpaca", max_seq_len=512), tok)
        assert encoded.input_ids == tok(rendered.text)["input_ids"] + [tok.eos_token_id]
        assert encoded.input_ids.count(tok.bos_token_id) == 1
    if family == "llama3":  # its chat template writes bos as text too: still one bos
        encoded, _ = encode({"messages": MESSAGES}, "chat", DataConfig(max_seq_len=512), tok)
        assert encoded.input_ids.count(tok.bos_token_id) == 1 and encoded.input_ids[0] == tok.bos_token_id


def test_generation_prompts_and_general_text_carry_no_bos_smollm2_never_adds(smollm2, smollm2_tokenizer, tmp_path):
    """The evaluation's text prompts and the forgetting check's documents are encoded as the
    tokenizer encodes them; a chat prompt gets SmolLM2's real answer, cut at <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM

    from distft.evaluation.evaluate import generate_outputs
    from distft.evaluation.forgetting import general_batches

    tok = smollm2_tokenizer
    corpus = tmp_path / "general.txt"
    corpus.write_text("The sun is a star.\n\nWater boils at 100 degrees Celsius at sea level.\n")
    batches = general_batches(str(corpus), tok, max_seq_len=64, batch_size=2, max_tokens=1000)
    first = batches[0]["input_ids"][0].tolist()
    assert first[: len(tok("The sun")["input_ids"])] == tok("The sun")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, tokenize=False)
    [(answer, cut)] = generate_outputs(model, tok, [prompt], max_new_tokens=16, batch_size=1, device="cpu",
                                       stop_ids=[tok.eos_token_id])
    assert (answer, cut) == ("The capital of France is Paris.", False)
