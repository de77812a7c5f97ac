"""The data path, token for token, with every tokenizer family users really run (issue 14).

Families (distft/data/tokenizers.py): `llama2` (SentencePiece-style BPE: `▁` word marker on every
encode call, byte fallback, `<s>`/`</s>`, no pad), `llama3` (byte-level BPE, `<|begin_of_text|>`,
`<|eot_id|>`, the published Llama-3 chat template) and the character-level `char`. Every check
would fail with the old piecewise encoding on `llama2` (its first response token differs in every
Alpaca row) and with special-token matching on (literal `<s>` in a row became a control id).
"""

from __future__ import annotations

import json

import pytest
import torch

from distft.config import DataConfig, EvalConfig, SyntheticDataConfig
from distft.data.pipeline import encode, pack, prepare_data, tokenize_row
from distft.data.templates import end_of_turn_tokens, render_row, stop_token_ids
from distft.data.tokenizers import FAMILIES, build_tokenizer
from distft.evaluation.evaluate import evaluate_model, generate_answers
from distft.model.build import IGNORE_INDEX
from tests.families import family_tokenizer

TEMPLATES = ("alpaca", "alpaca_short", "plain", "chat")
LITERAL_SPECIALS = "<s> </s> <unk> <|eot_id|> <|begin_of_text|> <|end_header_id|>"



@pytest.fixture(scope="module", params=FAMILIES)
def tok(request):
    return family_tokenizer(request.param)


def synthetic_rows(n: int = 40) -> list[dict]:
    from distft.data import synthetic

    return synthetic.generate(n, seed=3)


def special_ids(tok) -> set[int]:
    return {i for i, t in tok.added_tokens_decoder.items() if t.special}


def full_text_ids(tok, text: str, template_specials: bool) -> list[int]:
    """What the tokenizer itself gives for the whole text, with one bos in front (the char family's
    post-processor adds none; distft adds it for every tokenizer that has one). Special-token text
    is parsed only when the template writes it (chat templates); Alpaca templates write none."""
    ids = tok(text, split_special_tokens=not template_specials).input_ids
    return ids if ids[:1] == [tok.bos_token_id] else [tok.bos_token_id] + ids


def targets(tok, sample) -> list[int]:
    return [i for i, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]


@pytest.mark.parametrize("template", TEMPLATES)
def test_ids_are_the_full_text_tokenization_and_the_mask_is_the_response(tok, template):
    cfg = DataConfig(template=template, max_seq_len=4096)
    for row in synthetic_rows():
        sample = tokenize_row(dict(row), "alpaca", cfg, tok)
        text = render_row(row, "alpaca", template, tok).text
        expected = full_text_ids(tok, text, template_specials=template == "chat")
        if template != "chat":
            expected += [tok.eos_token_id]
        assert sample["input_ids"] == expected, (template, row)
        # The targets are exactly the response and the token that ends it (eos / end-of-turn).
        end = tok.eos_token if template != "chat" else end_of_turn_tokens(tok)[0]
        assert tok.decode(targets(tok, sample)) == row["output"] + end
        # ...and they are the tail of the ids: nothing after the end token is trained.
        n = len(targets(tok, sample))
        trailing = len(tok(text[text.rindex(end) + len(end):], add_special_tokens=False).input_ids) if (
            template == "chat") else 0
        tail = sample["input_ids"][len(sample["input_ids"]) - n - trailing: len(sample["input_ids"]) - trailing]
        assert targets(tok, sample) == tail


def test_llama2_response_starts_as_inside_the_text_not_as_a_new_word():
    tok = build_tokenizer("llama2")
    sample = tokenize_row({"instruction": "Add.", "input": "", "output": "The sum is 42"}, "alpaca",
                          DataConfig(template="alpaca_short"), tok)
    first = tok.convert_ids_to_tokens(targets(tok, sample))[:1]
    assert first[0] == "The"  # piecewise encoding trained "▁The"
    digits = tokenize_row({"instruction": "Add.", "input": "", "output": "42"}, "alpaca",
                          DataConfig(template="alpaca_short"), tok)
    assert tok.convert_ids_to_tokens(targets(tok, digits)) == ["4", "2", "</s>"]  # no lone "▁"


def test_literal_special_token_text_in_data_never_becomes_a_control_id(tok):
    specials = special_ids(tok)
    row = {"instruction": f"Explain {LITERAL_SPECIALS} in HTML.", "input": LITERAL_SPECIALS,
           "output": f"They are tags: {LITERAL_SPECIALS}."}
    for template in TEMPLATES:
        sample = tokenize_row(dict(row), "alpaca", DataConfig(template=template, max_seq_len=4096), tok)
        found = [i for i in sample["input_ids"] if i in specials]
        clean = tokenize_row({k: v.replace("<", "[") for k, v in row.items()}, "alpaca",
                             DataConfig(template=template, max_seq_len=4096), tok)
        assert found == [i for i in clean["input_ids"] if i in specials], template  # only the template's
        assert found.count(tok.bos_token_id) == 1 and found.count(tok.eos_token_id) <= 2
        assert tok.decode(targets(tok, sample), skip_special_tokens=True) == row["output"]
    messages = [{"role": "user", "content": f"what is {LITERAL_SPECIALS}?"},
                {"role": "assistant", "content": f"markup: {LITERAL_SPECIALS}"}]
    sample = tokenize_row({"messages": messages}, "chat", DataConfig(max_seq_len=4096), tok)
    plain = tokenize_row({"messages": [{**m, "content": m["content"].replace("<", "[")} for m in messages]}, "chat",
                         DataConfig(max_seq_len=4096), tok)
    assert [i for i in sample["input_ids"] if i in specials] == [i for i in plain["input_ids"] if i in specials]
    assert tok.decode(targets(tok, sample), skip_special_tokens=True) == messages[1]["content"]


def test_one_bos_per_sample_also_inside_packed_rows(tok, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(60)))
    cfg = DataConfig(source="jsonl", path=str(path), template="alpaca_short", max_seq_len=512, eval_size=4)
    data = prepare_data(cfg, tok)
    rows = pack(data.train, cfg.max_seq_len, tok.pad_token_id or tok.eos_token_id)
    assert len(rows) < len(data.train)  # really packed
    for row in rows:
        ids, positions = list(row["input_ids"]), list(row["position_ids"])
        starts = [k for k, p in enumerate(positions) if p == 0]
        real = [k for k in starts if k < len(ids) and ids[k] == tok.bos_token_id]
        assert ids.count(tok.bos_token_id) == len(real)  # bos only where a sample starts
    assert sum(list(r["input_ids"]).count(tok.bos_token_id) for r in rows) == len(data.train)


MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Uppercase: abc"},
    {"role": "assistant", "content": "ABC"},
    {"role": "user", "content": "Now reverse it."},
    {"role": "assistant", "content": "CBA"},
    {"role": "user", "content": "And add 2 + 40?"},
    {"role": "assistant", "content": "42"},
]


@pytest.mark.parametrize("turns", [3, 7], ids=["single-turn", "multi-turn"])
def test_eval_prompt_is_exactly_the_training_prefix(tok, tmp_path, turns):
    conversation = {"messages": MULTI_TURN[:turns]}
    rows = [{"messages": [{**m, "content": f"{m['content']} #{i}"} for m in MULTI_TURN[:turns]]} for i in range(8)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "eval.jsonl"
    held.write_text(json.dumps(conversation) + "\n")
    data = prepare_data(DataConfig(source="jsonl", path=str(train), eval_path=str(held), max_seq_len=4096), tok)
    (row,), (sample,) = data.eval_rows, data.eval
    n = len(row["prompt_ids"])
    assert row["prompt_ids"] == sample["input_ids"][:n]
    last = MULTI_TURN[turns - 1]["content"]
    assert row["reference"] == last
    # What follows the prompt in training is exactly the last answer and its end-of-turn token.
    assert tok.decode(targets(tok, {"input_ids": sample["input_ids"][n:], "labels": sample["labels"][n:]})) == (
        last + end_of_turn_tokens(tok)[0])
    assert sample["labels"][n] != IGNORE_INDEX and sample["labels"][n - 1] == IGNORE_INDEX
    # Earlier answers are targets too, inside the prompt (they are trained, and fed back at eval).
    earlier = [m["content"] for m in MULTI_TURN[: turns - 1] if m["role"] == "assistant"]
    inside = tok.decode([i for i, lab in zip(sample["input_ids"][:n], sample["labels"][:n]) if lab != IGNORE_INDEX])
    assert inside == "".join(a + end_of_turn_tokens(tok)[0] for a in earlier)


def test_end_of_turn_tokens_of_real_templates():
    llama3 = build_tokenizer("llama3")
    assert end_of_turn_tokens(llama3) == ["<|eot_id|>"]
    base = build_tokenizer("llama3")
    base.eos_token = "<|end_of_text|>"  # the base (not Instruct) Llama-3 config
    assert stop_token_ids(base) == base.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    chatml = build_tokenizer("llama2")
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert end_of_turn_tokens(chatml) == ["<|im_end|>"]
    assert stop_token_ids(chatml, ["<|im_start|>"]) == chatml.convert_tokens_to_ids(
        ["</s>", "<|im_end|>", "<|im_start|>"])
    sample = tokenize_row({"messages": MULTI_TURN[1:5]}, "chat", DataConfig(), chatml)
    assert tok_str(chatml, targets(chatml, sample)) == ["A", "BC", "<|im_end|>", "C", "BA", "<|im_end|>"] or (
        chatml.decode(targets(chatml, sample)) == "ABC<|im_end|>CBA<|im_end|>")
    with pytest.raises(Exception, match=r"data.stop_tokens: '<\|im_stop\|>' is not a token"):
        stop_token_ids(chatml, ["<|im_stop|>"])


def tok_str(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_a_bad_stop_token_is_one_data_error(tmp_path):
    from distft.errors import DataError

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(10)))
    with pytest.raises(DataError, match=r"data.stop_tokens: 'END' is not a token of the tokenizer"):
        prepare_data(DataConfig(source="jsonl", path=str(path), stop_tokens=["END"]), build_tokenizer("llama2"))


def bigram_model(tok, after: dict[int, int]):
    """A real LlamaForCausalLM whose next token depends only on the current one, by its weights:
    attention and MLP outputs zeroed, each token of `after` its own embedding direction, and the
    head mapping it to its successor. Every unlisted token is followed by the first key."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0  # every other token: direction 0
        head.zero_()
        for k, (token, successor) in enumerate(after.items(), start=1):
            emb[token].zero_()
            emb[token, k] = 1.0
            head[successor, k] += 10.0
        head[next(iter(after)), 0] += 10.0
    return model


def test_generation_stops_at_the_end_of_turn_token_not_only_at_eos():
    tok = build_tokenizer("llama3")
    tok.eos_token = "<|end_of_text|>"  # a base Llama-3 with the Instruct chat template
    (answer,) = tok("The", add_special_tokens=False).input_ids
    eot, newline = tok.convert_tokens_to_ids(["<|eot_id|>", "Ċ"])
    model = bigram_model(tok, {answer: eot, eot: newline, newline: answer})
    prompt = tok.apply_chat_template([{"role": "user", "content": "ok?"}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids  # the template writes bos itself
    # The run's stop ids (eos and the template's end-of-turn): the answer ends at <|eot_id|>.
    assert generate_answers(model, tok, [prompt_ids], 12, 1, "cpu", stop_ids=stop_token_ids(tok)) == ["The"]
    # eos alone: the model runs on past the end of its turn, answering again and again.
    model.generation_config.eos_token_id = None
    assert generate_answers(model, tok, [prompt_ids], 12, 1, "cpu") == ["The\nThe\nThe\nThe"]
    result = evaluate_model(model, tok, None, [{"prompt": prompt, "prompt_ids": prompt_ids, "reference": "The"}],
                            EvalConfig(num_samples=1, max_new_tokens=12), "cpu", stop_ids=stop_token_ids(tok))
    assert result["exact_match_strict"] == 1.0


def test_rows_of_synthetic_data_are_exact_with_every_family(tok):
    cfg = DataConfig(template="alpaca_short", synthetic=SyntheticDataConfig(num_examples=120), eval_size=20)
    data = prepare_data(cfg, tok)
    for row, sample in zip(data.eval_rows, data.eval):
        n = len(row["prompt_ids"])
        assert row["prompt_ids"] == sample["input_ids"][:n]
        assert tok.decode(targets(tok, sample)) == row["reference"] + tok.eos_token
    encoded, rendered = encode(dict(synthetic_rows(1)[0]), "alpaca", cfg, tok)
    assert rendered.prompt == rendered.text[: rendered.targets[-1][0]]


def test_preflight_checks_the_chat_template_before_anything_runs(tmp_path):
    from distft.data.tokenizers import save_tokenizer
    from distft.preflight import preflight

    base = save_tokenizer("llama2", tmp_path / "llama2")  # a base tokenizer: no chat template
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": MULTI_TURN[1:3]}) + "\n")
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(3)))
    common = [f"model.tokenizer={base}", "model.vocab_size=1000", f"run.root={tmp_path / 'runs'}", "data=jsonl"]
    _, errors = preflight([*common, f"data.path={chat}"])
    assert len(errors) == 1 and "the tokenizer of model.tokenizer=" in errors[0]
    assert "set data.chat_template=headers" in errors[0]
    assert preflight([*common, f"data.path={chat}", "data.chat_template=headers"])[1] == []
    assert preflight([*common, f"data.path={alpaca}"])[1] == []  # Alpaca rows need no chat template...
    _, errors = preflight([*common, f"data.path={alpaca}", "data.template=chat"])  # ...unless rendered as chat
    assert len(errors) == 1 and "has none" in errors[0]
    _, errors = preflight([*common, f"data.path={alpaca}", "data.chat_template=chatml"])
    assert errors and "data.chat_template='chatml' is neither a named template (headers) nor a Jinja" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_a_from_scratch_model_generates_with_its_tokenizers_special_ids():
    """LLaMA's ids (bos 1, eos 2) are a byte token of the llama3 family: generation would stop at it."""
    from distft.config import Config, ModelConfig
    from distft.techniques.build import build_base

    tok = build_tokenizer("llama3")
    model = build_base(Config(model=ModelConfig(vocab_size=len(tok), num_hidden_layers=1)), torch.float32, tok)
    for target in (model.config, model.generation_config):
        assert (target.bos_token_id, target.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) == (995, 999)
