"""Prompt and prefix tuning answer with a KV cache (issue 36, section 3): evaluate's cached decoder
for virtual tokens gives exactly the tokens of the full-forward reference (`_generate_full_forward`,
the training layout: virtual tokens, then the sample from position 0), for prompt tuning, prefix
tuning and prefix tuning through its projection MLP, on a batch of prompts of different lengths
where some rows stop at eos and others run to the limit, on the real SmolLM2-135M-Instruct (its
virtual tokens started from the default text, so the answers are real ones) and on the tiny model;
and `generate_outputs` decodes them that way (one token per forward after the prompt), where it
used to re-run the whole sequence for every token. Under bf16 autocast the two differ at most where
two tokens' logits are a rounding step apart; a disabled adapter answers as its base."""

from __future__ import annotations

import contextlib

import pytest
import torch

from distft.evaluation.evaluate import _eos_ids, _generate_full_forward, _generate_virtual_cached, generate_outputs
from distft.tracking import GenerationProgress

VARIANTS = {
    "prompt": ["technique=prompt"],
    "prefix": ["technique=prefix"],
    "prefix_projection": ["technique=prefix", "technique.prefix_projection=true"],
}
# Short questions SmolLM2 answers in a few tokens or in many, under a short system prompt (SmolLM2's
# template writes a long one when there is none): 22, 24 and 26 tokens.
QUESTIONS = ["Name three primary colours.", "What is the capital of France?", "Translate 'thank you' into French."]
NEW_TOKENS = 10


def build(overrides: list[str]):
    from distft.model.build import load_tokenizer
    from distft.preflight import preflight
    from distft.techniques.build import build_trainable_model

    cfg, errors = preflight(["data.packing=false", *overrides], run_here=False)
    assert not errors, errors
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    return build_trainable_model(cfg, torch.float32, tokenizer).eval(), tokenizer, cfg


@contextlib.contextmanager
def query_lengths(model):
    """The number of positions each forward of `model`'s base computes (its first layer's input)."""
    lengths: list[int] = []
    layer = model.get_base_model().model.layers[0]
    handle = layer.register_forward_pre_hook(lambda _module, args: lengths.append(args[0].shape[1]))
    try:
        yield lengths
    finally:
        handle.remove()


def answer(tokenizer, tokens: list[int], eos_ids: list[int]) -> tuple[str, bool]:
    """What generate_outputs makes of a row's tokens: the text before the first stop token, and cut."""
    stop = next((k for k, t in enumerate(tokens) if t in eos_ids), None)
    return tokenizer.decode(tokens[:stop], skip_special_tokens=True).strip(), stop is None


def check_cached_decoding(model, tokenizer, rows: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    """The cached decoder's tokens equal the reference's, and generate_outputs (one batch, already
    in its length order) returns their answers from one forward of the prompts plus one of a
    single token a step. Returns the reference's tokens."""
    pad, eos_ids = tokenizer.pad_token_id, _eos_ids(model, tokenizer, stop_ids)  # as generate_outputs stops
    with torch.no_grad():
        reference = _generate_full_forward(model, rows, NEW_TOKENS, eos_ids, pad, "cpu")
        cached = _generate_virtual_cached(model, rows, NEW_TOKENS, eos_ids, pad, "cpu")
    assert cached == reference

    progress = GenerationProgress("answering", enabled=True, every_s=3600)
    with query_lengths(model) as lengths:
        outputs = generate_outputs(model, tokenizer, rows, NEW_TOKENS, len(rows), "cpu", stop_ids=stop_ids,
                                   progress=progress)
    assert outputs == [answer(tokenizer, tokens, eos_ids) for tokens in reference]
    steps = max(map(len, reference))
    # Prompt tuning's virtual tokens first, once; then the prompts; then one token a step. The
    # full forward would compute (virtual +) width, width + 1, ... positions.
    virtual = model.active_peft_config.num_virtual_tokens
    first = [virtual] if model.active_peft_config.peft_type == "PROMPT_TUNING" else []
    assert lengths == first + [max(map(len, rows))] + [1] * (steps - 1)
    assert progress.tokens == len(rows) * steps  # every step reported, as the other decoders do
    return reference


@pytest.mark.parametrize("variant", VARIANTS)
def test_smollm2_answers_the_same_with_the_cache(smollm2, variant):
    from distft.techniques.build import DEFAULT_INIT_TEXT, init_text

    model, tokenizer, cfg = build([f"model.name_or_path={smollm2}", "technique.num_virtual_tokens=20",
                                   *VARIANTS[variant]])
    assert init_text(cfg) == DEFAULT_INIT_TEXT  # the virtual tokens a run starts from
    rows = [tokenizer.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                           {"role": "user", "content": question}],
                                          add_generation_prompt=True)["input_ids"] for question in QUESTIONS]
    rows = sorted(rows, key=len)
    assert len({len(row) for row in rows}) == len(rows)
    eos_ids = [tokenizer.eos_token_id]  # <|im_end|>
    reference = check_cached_decoding(model, tokenizer, rows, eos_ids)
    answers = [answer(tokenizer, tokens, eos_ids) for tokens in reference]
    assert ("The capital of France is Paris.", False) in answers  # a real answer, ended at eos mid-batch
    assert any(cut for _, cut in answers)  # while another row ran to NEW_TOKENS


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_tiny_model_answers_the_same_with_the_cache(variant):
    """The tiny preset, its virtual tokens PEFT's random ones. A stop token is added: one the
    reference decodes in a row after its first step, and another row never (the untrained model
    knows no eos worth the name), so that rows stop at different steps."""
    model, tokenizer, _ = build(["model=tiny", *VARIANTS[variant]])
    rows = [tokenizer(text).input_ids for text in ("a", "12+34=", "Reverse: stone", "Uppercase: the quick brown fox")]
    with torch.no_grad():
        free = _generate_full_forward(model, rows, NEW_TOKENS, _eos_ids(model, tokenizer), tokenizer.pad_token_id,
                                      "cpu")
    row, stop = next((i, k) for i, tokens in enumerate(free) for k in range(1, len(tokens))
                     if tokens[k] not in tokens[:k] and any(tokens[k] not in other for other in free))
    reference = check_cached_decoding(model, tokenizer, rows, [free[row][stop]])
    assert len(reference[row]) == stop + 1 and len({len(tokens) for tokens in reference}) > 1
    assert max(map(len, reference)) == NEW_TOKENS


def test_under_autocast_only_near_ties_can_differ():
    """bf16 autocast (generate_outputs' `autocast_ctx`): both decoders run in bf16, which rounds
    different shapes of work differently, so a greedy choice between two tokens whose bf16 logits
    are a rounding step apart can go either way (measured: once in these 12 rows, a gap of 1 bf16
    step; on SmolLM2 an exact bf16 tie). Every row's tokens are the reference's up to such a tie."""
    prompts = ("x", "abc", "12+34=", "hello world", "reverse: abcdef", "the quick brown fox")
    for variant in ("prefix", "prompt"):
        model, tokenizer, _ = build(["model=tiny", *VARIANTS[variant]])
        rows = [tokenizer(text).input_ids for text in prompts]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            reference = _generate_full_forward(model, rows, 24, [], tokenizer.pad_token_id, "cpu")
            cached = _generate_virtual_cached(model, rows, 24, [], tokenizer.pad_token_id, "cpu")
            for row, want, got in zip(rows, reference, cached):
                if want == got:
                    continue
                k = next(i for i, (a, b) in enumerate(zip(want, got)) if a != b)
                logits = model(input_ids=torch.tensor([row + want[:k]])).logits[0, -1].float()
                step = 2.0**-8 * float(logits.abs().max())  # bf16 keeps 8 significant bits
                assert abs(float(logits[want[k]] - logits[got[k]])) <= 2 * step, (variant, row, k)
        assert sum(want == got for want, got in zip(reference, cached)) >= len(rows) - 1


def test_a_disabled_adapter_answers_as_its_base():
    """Inside PEFT's disable_adapter() (the base's scores during training) a prompt-learning model is
    its base: generate_outputs decodes with the base's own generate, where the virtual tokens
    would be wrong; the answers are the base's (the full forward of the disabled model)."""
    model, tokenizer, _ = build(["model=tiny", "technique=prefix"])
    rows = [tokenizer(text).input_ids for text in ("x", "abc", "hello world")]
    eos_ids = _eos_ids(model, tokenizer)
    with model.disable_adapter():
        with torch.no_grad():
            reference = _generate_full_forward(model, rows, NEW_TOKENS, eos_ids, tokenizer.pad_token_id, "cpu")
        outputs = generate_outputs(model, tokenizer, rows, NEW_TOKENS, len(rows), "cpu")
    with torch.no_grad():
        virtual = _generate_full_forward(model, rows, NEW_TOKENS, eos_ids, tokenizer.pad_token_id, "cpu")
    assert outputs == [answer(tokenizer, tokens, eos_ids) for tokens in reference]
    assert virtual != reference  # the prefix does change the answers: the check above could fail
