"""A slow evaluation is never silent (issue 35, item 7): generating answers reports prompts done
of the total and tokens per second (tracking.GenerationProgress), by the decoding step, in both
decoders; a fast one adds no line."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from distft.evaluation.evaluate import _generate_full_forward, generate_outputs
from distft.model.build import build_offline_tokenizer
from distft.tracking import GenerationProgress

LINE = re.compile(r"^answering: (\d+)/(\d+) prompts answered, (\d+) tokens in \d+:\d\d:\d\d, ([\d.]+) tokens/s")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_offline_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, bos_token_id=1, eos_token_id=2, use_cache=False)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def info_lines():
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("distft")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_generation_logs_prompts_done_and_tokens_per_second(tiny, info_lines):
    """Every PROGRESS_EVERY_S (here: at every step) a line with prompts answered / total, the
    tokens decoded so far and their rate; the last line says the whole. The prompts go in
    batches of 3 and 2: a decoding step of the first batch decodes 3 tokens."""
    model, tokenizer = tiny
    prompts = ["abc", "hello there", "xy", "a longer prompt here", "q"]
    progress = GenerationProgress("answering", enabled=True, every_s=0)
    answers = generate_outputs(model, tokenizer, prompts, max_new_tokens=5, batch_size=3, device="cpu",
                               progress=progress)
    assert len(answers) == 5
    parsed = [LINE.match(line) for line in info_lines[:-1]]
    assert all(parsed) and len(parsed) >= 4, info_lines
    steps = [(int(m.group(1)), int(m.group(2)), int(m.group(3))) for m in parsed]
    assert steps[0] == (0, 5, 3)  # one line a decoding step, before any prompt is answered
    assert [done for done, _, _ in steps] == sorted(done for done, _, _ in steps)
    assert {done for done, _, _ in steps} == {0, 3, 5} and steps[-1][0] == 5
    first_batch = [tokens for done, _, tokens in steps if done == 0]
    assert first_batch == [3 * k for k in range(1, len(first_batch) + 1)] and len(first_batch) <= 5
    assert all(float(m.group(4)) > 0 for m in parsed)
    total = steps[-1][2]
    assert re.fullmatch(rf"answering: 5/5 prompts answered in \d+:\d\d:\d\d, {total} tokens, [\d.]+ tokens/s",
                        info_lines[-1]), info_lines[-1]


def test_a_fast_generation_or_another_rank_adds_no_line(tiny, info_lines):
    model, tokenizer = tiny
    generate_outputs(model, tokenizer, ["abc", "de"], max_new_tokens=3, batch_size=2, device="cpu",
                     progress=GenerationProgress("answering", enabled=True, every_s=3600))
    generate_outputs(model, tokenizer, ["abc", "de"], max_new_tokens=3, batch_size=2, device="cpu",
                     progress=GenerationProgress("answering", enabled=False, every_s=0))
    assert info_lines == []


def test_the_full_forward_decoder_reports_its_steps_too(tiny):
    """The full-forward decoder (evaluate._generate_full_forward, the reference the cached
    prompt/prefix decoder is tested against) reports the rows of each step too; the cached one's
    steps are counted in tests/unit/test_generation_cache.py."""
    model, _ = tiny
    progress = GenerationProgress("answering", enabled=True, every_s=3600)
    progress.start(2)
    out = _generate_full_forward(model, [[1, 40, 41], [1, 42]], 4, eos_ids=[0], pad_id=3, device="cpu",
                                 progress=progress)
    assert progress.tokens == 2 * max(len(tokens) for tokens in out) > 0  # both rows, every step taken
    progress.close()


def test_an_evaluation_reports_its_generation(tiny, info_lines):
    """evaluate_model (the trainer's and distft.evaluation.evaluate's scoring) hands its progress to the
    generation: the held-out prompts it scores are the total."""
    from distft.config import EvalConfig
    from distft.evaluation.evaluate import evaluate_model

    model, tokenizer = tiny
    rows = [{"prompt": p, "reference": "x"} for p in ("abc", "de", "fgh", "ij")]
    evaluate_model(model, tokenizer, None, rows, EvalConfig(num_samples=3, max_new_tokens=2, batch_size=2), "cpu",
                   progress=GenerationProgress("base model: generating", enabled=True, every_s=0))
    assert info_lines[0].startswith("base model: generating: 0/3 prompts answered, 2 tokens in ")
    assert info_lines[-1].startswith("base model: generating: 3/3 prompts answered in ")
