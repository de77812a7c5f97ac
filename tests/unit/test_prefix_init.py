"""Virtual tokens start as a real text (issue 35, item 4): an untrained prefix or prompt on the real
SmolLM2-135M-Instruct scores like its base, because it *is* the base reading that text first
(prompt tuning: the text's embeddings; prefix tuning: its keys and values through the frozen
base, laid out as PEFT reads them for a GQA model, also through PEFT's projection MLP). PEFT's
random init, which distft used before, made a prefix's first loss several times the base's."""

from __future__ import annotations

import pytest
import torch

# Short conversations in SmolLM2's chat template (43-54 tokens, 7-13 answer tokens), which the base answers well.
CONVERSATIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three primary colours.", "Red, yellow and blue are the three primary colours."),
    ("What is two plus three?", "Two plus three is five."),
    ("How do you say 'thank you' in French?", "In French, 'thank you' is 'merci'."),
]
# Measured on this batch: base 1.36; default text 1.10 (x0.81: the text gives the rows' first tokens
# context); PEFT's random init: prefix 7.09 (x5.2), prompt 1.23, prefix through the MLP 1.29.
MARGIN = 0.10  # the untrained model may be better than its base, never worse by more than this


def config(smollm2, *overrides):
    from distft.preflight import preflight

    cfg, errors = preflight([f"model.name_or_path={smollm2}", "data.packing=false", "technique.num_virtual_tokens=20",
                             *overrides], run_here=False)
    assert not errors, errors
    return cfg


def batch(tokenizer) -> dict:
    """The conversations right-padded, their answers the targets (as a run masks its prompts)."""
    rows, prompt_lengths = [], []
    for question, answer in CONVERSATIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        rows.append(prompt + tokenizer(answer + tokenizer.eos_token, add_special_tokens=False).input_ids)
        prompt_lengths.append(len(prompt))
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    positions = torch.arange(width)
    lengths, prompt_lengths = torch.tensor([[len(row)] for row in rows]), torch.tensor([[n] for n in prompt_lengths])
    attention_mask = (positions < lengths).long()
    labels = input_ids.masked_fill((positions < prompt_lengths) | (attention_mask == 0), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def losses(model, rows: dict) -> tuple[float, float]:
    """(the model's loss, its base's loss) on `rows`, as evaluation scores them."""
    from distft.evaluation.evaluate import held_out_loss
    from distft.techniques.build import base_model_context

    with base_model_context(model):
        base = held_out_loss(model, [rows], "cpu")["loss"]
    return held_out_loss(model, [rows], "cpu")["loss"], base


def loss_after_text(model, rows: dict, text_ids: list[int]) -> float:
    """The base's loss on the rows' own tokens when `text_ids` are written before each row."""
    from distft.model.build import token_loss

    count, size = len(text_ids), rows["input_ids"].shape[0]
    input_ids = torch.cat([torch.tensor([text_ids]).expand(size, -1), rows["input_ids"]], dim=1)
    mask = torch.cat([torch.ones(size, count, dtype=rows["attention_mask"].dtype), rows["attention_mask"]], dim=1)
    with torch.no_grad():
        logits = model.get_base_model()(input_ids=input_ids, attention_mask=mask).logits
    loss_sum, tokens = token_loss(logits, rows["labels"])  # the last positions: the row's
    return float(loss_sum) / int(tokens)


@pytest.mark.parametrize("technique", ["prefix", "prefix_projection", "prompt"])
def test_untrained_virtual_tokens_score_like_the_base(smollm2, smollm2_tokenizer, technique):
    from distft.techniques.build import DEFAULT_INIT_TEXT, build_trainable_model

    overrides = ["technique=prefix", "technique.prefix_projection=true"] if technique == "prefix_projection" else [
        f"technique={technique}"]
    cfg = config(smollm2, *overrides)
    torch.manual_seed(0)
    model = build_trainable_model(cfg, torch.float32, smollm2_tokenizer)
    rows = batch(smollm2_tokenizer)
    tuned, base = losses(model, rows)
    assert tuned <= (1 + MARGIN) * base, (tuned, base)
    # Exactly the base reading the default text (cut or repeated to 20 tokens) before each row:
    # the prefix's layout (layer, key|value, 3 KV heads, head_dim 64) and positions are PEFT's.
    text_ids = smollm2_tokenizer(DEFAULT_INIT_TEXT, add_special_tokens=False).input_ids
    text_ids = (text_ids * 2)[:20]
    assert tuned == pytest.approx(loss_after_text(model, rows, text_ids), rel=1e-4)


def test_a_chosen_text_an_empty_text_and_a_model_built_from_scratch(smollm2, smollm2_tokenizer):
    from distft.techniques.build import build_meta_model, build_trainable_model, init_text

    rows = batch(smollm2_tokenizer)
    chosen = config(smollm2, "technique=prefix", "technique.prompt_init_text=Answer the question briefly.")
    model = build_trainable_model(chosen, torch.float32)  # no tokenizer given: the model's own is loaded
    text_ids = smollm2_tokenizer("Answer the question briefly.", add_special_tokens=False).input_ids
    assert losses(model, rows)[0] == pytest.approx(loss_after_text(model, rows, (text_ids * 20)[:20]), rel=1e-4)

    # "": PEFT's random init, which ruins the pretrained model's loss (the reason for the default).
    torch.manual_seed(0)
    tuned, base = losses(build_trainable_model(config(smollm2, "technique=prefix", "technique.prompt_init_text=''"),
                                               torch.float32, smollm2_tokenizer), rows)
    assert tuned > 2 * base, (tuned, base)

    # From scratch there is no behaviour to keep: PEFT's random init, as before.
    from distft.preflight import preflight

    scratch, errors = preflight(["+experiment=tiny_prefix"], run_here=False)
    assert not errors and init_text(scratch) is None
    prefix = build_trainable_model(scratch, torch.float32).prompt_encoder["default"].embedding.weight
    assert float(prefix.detach().std()) == pytest.approx(1.0, abs=0.05)  # torch.nn.Embedding's N(0, 1)
    # On the meta device (FSDP's sharded build) nothing is read: rank 0's real build fills the shards.
    meta = build_meta_model(config(smollm2, "technique=prefix"), torch.float32, smollm2_tokenizer)
    assert all(p.is_meta for p in meta.parameters())
