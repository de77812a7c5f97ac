"""The real tokenizer families built in code: each reproduces the published pipeline's behaviour.

The tests that start a process: tests/cli/test_tokenizer_families.py."""


import pytest

from distft.data import tokenizers as tokenizer_families
from distft.data.tokenizers import build_tokenizer, save_tokenizer

ALPACA_PROMPT = "### Instruction:\nAdd the numbers.\n\n### Response:\n"


def tokens(tok, text, **kwargs):
    return tok.convert_ids_to_tokens(tok(text, **kwargs).input_ids)


def test_llama2_ids_specials_and_bos_like_llama_tokenizer_fast():
    tok = build_tokenizer("llama2")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.convert_tokens_to_ids(["<0x00>", "<0x0A>", "<0xFF>"]) == [3, 13, 258]  # LLaMA's byte ids
    assert len(tok) == tokenizer_families.DEFAULT_VOCAB_SIZE["llama2"]
    hello = tokens(tok, "Hello world")
    assert hello[0] == "<s>" and hello[1].startswith("▁") and hello[-1] != "</s>"
    assert tok("x").input_ids[0] == tok.bos_token_id
    assert tok("x", add_special_tokens=False).input_ids[0] != tok.bos_token_id
    assert tokens(tok, "a", text_pair="b") == ["<s>", "▁a", "<s>", "▁b"]  # Llama's pair template


def test_llama2_byte_fallback_and_round_trip():
    tok = build_tokenizer("llama2")
    got = tokens(tok, "a\nb €", add_special_tokens=False)
    assert got[:3] == ["▁a", "<0x0A>", "b"]  # a newline is never a piece: always the byte token
    assert got[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]  # "€" is not in the corpus: its UTF-8 bytes
    assert tok.unk_token_id not in tok("€✓ 日本").input_ids
    for text in ["Hello world", "a\nb €✓ café", "Don’t  double  spaces,\n\nkeep them. 3.14", tokenizer_families.PROSE]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_llama2_prompt_and_response_encoded_apart_differ_from_the_whole_text():
    tok = build_tokenizer("llama2")
    whole = tokens(tok, "### Response:\nThe answer", add_special_tokens=False)
    assert whole[-3:] == ["<0x0A>", "The", "▁answer"]  # after the newline byte: no word marker
    assert tokens(tok, "The answer", add_special_tokens=False) == ["▁The", "▁answer"]  # a fresh call: ▁The
    # A response that starts with a digit gets a lone "▁" of its own when encoded apart.
    assert tokens(tok, ALPACA_PROMPT + "42", add_special_tokens=False)[-3:] == ["<0x0A>", "4", "2"]
    assert tokens(tok, "42", add_special_tokens=False) == ["▁", "4", "2"]
    prompt_ids = tok(ALPACA_PROMPT, add_special_tokens=False).input_ids
    response_ids = tok("42", add_special_tokens=False).input_ids
    assert prompt_ids + response_ids != tok(ALPACA_PROMPT + "42", add_special_tokens=False).input_ids
    # Legacy mode: the text after a literal special token also starts a new word.
    assert tokens(tok, "<s>The", add_special_tokens=False) == ["<s>", "▁The"]


def test_llama3_specials_bos_and_byte_level_round_trip():
    tok = build_tokenizer("llama3")
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.pad_token is None and tok.unk_token is None
    specials = tok.convert_tokens_to_ids(list(tokenizer_families.LLAMA3_SPECIALS))
    assert specials == list(range(len(tok) - 5, len(tok)))  # after the learned vocabulary, as Llama-3's
    assert tok("x").input_ids[0] == tok.bos_token_id and tok("x").input_ids[-1] != tok.eos_token_id
    assert tokens(tok, "a", text_pair="b") == ["<|begin_of_text|>", "a", "<|begin_of_text|>", "b"]
    assert tokens(tok, "Reverse the word.", add_special_tokens=False) == ["Reverse", "Ġthe", "Ġword", "."]
    for text in ["a\nb €✓ café", "Hello , world I 'm", tokenizer_families.PROSE]:
        assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_llama3_leading_space_merges_into_the_next_word():
    tok = build_tokenizer("llama3")
    whole = tokens(tok, "Reverse the word.", add_special_tokens=False)
    apart = tokens(tok, "Reverse the ", add_special_tokens=False) + tokens(tok, "word.", add_special_tokens=False)
    assert "Ġword" in whole
    assert apart[:4] == ["Reverse", "Ġthe", "Ġ", "w"] and "Ġword" not in apart  # the space stays behind, alone
    # Newlines glue to the punctuation before them (":Ċ"), so a response after "\n" is the same apart.
    assert tokens(tok, "### Response:\nThe answer", add_special_tokens=False)[-3:] == [":Ċ", "The", "Ġanswer"]


@pytest.mark.parametrize(
    "family,literal", [("llama2", "<s>"), ("llama2", "</s>"), ("llama3", "<|eot_id|>"), ("char", "</s>")]
)
def test_literal_special_token_text_is_parsed_as_a_control_id_unless_split(family, literal):
    tok = build_tokenizer(family)
    control = tok.convert_tokens_to_ids(literal)
    text = f"say {literal} now"
    assert control in tok(text, add_special_tokens=False).input_ids
    plain = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert not set(plain) & set(tok.all_special_ids)
    assert tok.decode(plain) == text


def test_llama3_chat_template_renders_headers_eot_and_generation_prompt():
    tok = build_tokenizer("llama3")
    messages = [{"role": "user", "content": "Add 2 and 3. "}, {"role": "assistant", "content": "5"}]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    # The template writes bos as text, so encoding its output with special tokens gives two bos.
    assert tok(prompt).input_ids[:2] == [tok.bos_token_id, tok.bos_token_id]


def test_vocab_size_is_the_tokenizer_length_and_bad_arguments_are_rejected():
    assert len(build_tokenizer("llama2", 600)) == 600
    assert len(build_tokenizer("llama3", 600)) == 600
    with pytest.raises(ValueError, match="llama2 vocab_size must be above 359"):
        build_tokenizer("llama2", 300)
    with pytest.raises(ValueError, match="unknown tokenizer family 'gpt2'; allowed: llama2, llama3, char"):
        build_tokenizer("gpt2")
    with pytest.raises(ValueError, match="fixed vocabulary"):
        build_tokenizer("char", 512)


def test_builds_are_independent_objects():
    first = build_tokenizer("llama2")
    first.pad_token = first.eos_token
    assert build_tokenizer("llama2").pad_token is None


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_saved_tokenizer_loads_through_model_tokenizer(family, tmp_path):
    from distft.config import ModelConfig
    from distft.model.build import load_tokenizer

    built = build_tokenizer(family)
    loaded = load_tokenizer(ModelConfig(tokenizer=str(save_tokenizer(family, tmp_path / "tok"))))
    text = ALPACA_PROMPT + "The answer is 42 €"
    assert loaded(text).input_ids == built(text).input_ids
    assert loaded(text, text_pair="x").input_ids == built(text, text_pair="x").input_ids
    assert loaded.chat_template == built.chat_template
    assert loaded.pad_token == built.eos_token  # load_tokenizer pads with eos when there is no pad


@pytest.mark.parametrize("family", tokenizer_families.FAMILIES)
def test_each_family_drives_a_tiny_llama(family):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(family)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)
    )
    ids = torch.tensor([tok(ALPACA_PROMPT + "5").input_ids])
    assert int(ids.max()) < len(tok)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
