"""Generation speed: distft's decoders against `model.generate`, seconds per generated token.

What it measures. The real SmolLM2-135M-Instruct (fp32, CPU) answering the same `--prompts` chat
prompts (its own template and default system prompt: 33-42 tokens) in one batch, each answer
forced to exactly `--new-tokens` tokens (the stop token is an id no logit has), in one process:

- plain and LoRA (SmolLM2 + distft's LoRA adapter, unmerged): `evaluate.generate_outputs`, what
  an evaluation runs, against the same model's `model.generate` on the same left-padded batch;
- prefix and prompt tuning (20 virtual tokens from the default text): `generate_outputs`, now
  the KV-cached decoder for virtual tokens, against the old decoder (`_generate_full_forward`,
  the whole forward again for every token) and against the base model's `model.generate` (the
  same prompts without the virtual tokens: what a cached decoder cannot beat).

    s/token = wall time / (prompts x new tokens); speed = baseline s/token / distft s/token

Each figure is the median over `--repeats` rounds, each round running every decoder of a model
once in turn (A, B, C, B, C, A, ...), so background load and the order hit all alike; a first
untimed round warms them up. The answers of the old and the new decoder for virtual tokens are compared too
(the test of their equality is tests/unit/test_generation_cache.py).

Why. Issue 36: prompt and prefix tuning answered ~10x slower per token than `model.generate`,
because PEFT's generation hooks break with transformers 5 (evaluate.py's docstring). Target:
distft's speed >= 0.9 of `model.generate`'s, per generated token.

    python bench/generation.py [--prompts 4] [--new-tokens 16] [--repeats 3] [--record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "What is two plus three?",
    "How do you say 'thank you' in French?", "Why is the sky blue?", "Give me a synonym for happy.",
    "What is the boiling point of water?", "Who wrote Hamlet?",
]
TECHNIQUES = {"plain": ["technique=full"], "lora": ["technique=lora"], "prefix": ["technique=prefix"],
              "prompt": ["technique=prompt"]}


class NeverEnds:
    """`tokenizer`, its eos an id no logit has (the model's vocabulary size), so that every answer runs
    to max_new_tokens: the decoders are compared per token, not by where a model chose to stop."""

    def __init__(self, tokenizer, never: int):
        self._tokenizer, self.eos_token_id = tokenizer, never

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)


def build(smollm2: str, technique: list[str], tokenizer, never: int):
    import torch

    from distft.preflight import preflight
    from distft.techniques.build import build_trainable_model

    cfg, errors = preflight([f"model.name_or_path={smollm2}", "data.packing=false", "technique.num_virtual_tokens=20",
                             *technique], run_here=False)
    assert not errors, errors
    torch.manual_seed(0)
    model = build_trainable_model(cfg, torch.float32, tokenizer).eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config.eos_token_id = never  # generate_outputs also stops at the model's own eos
    return model


def left_padded(rows: list[list[int]], pad_id: int):
    import torch

    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def hf_generate(model, rows: list[list[int]], new_tokens: int, pad_id: int, never: int) -> list[list[int]]:
    """The baseline: `model.generate`, greedy, on the left-padded batch, as its documentation has it."""
    input_ids, attention_mask = left_padded(rows, pad_id)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                            pad_token_id=pad_id, eos_token_id=never)
    tokens = output[:, input_ids.shape[1] :].tolist()
    assert all(len(t) == new_tokens for t in tokens)
    return tokens


def distft_generate(model, tokenizer, rows, new_tokens: int) -> list[str]:
    """What an evaluation runs (one batch: batch_size = the prompts)."""
    from distft.evaluation.evaluate import generate_outputs
    from distft.tracking import GenerationProgress

    outputs = generate_outputs(model, tokenizer, rows, new_tokens, len(rows), "cpu",
                               progress=GenerationProgress(enabled=False))
    assert not any(not cut for _, cut in outputs)  # every answer ran to new_tokens
    return [text for text, _ in outputs]


def full_forward(model, tokenizer, rows, new_tokens: int, never: int) -> list[str]:
    """The decoder prompt and prefix tuning had before (kept as the reference)."""
    import torch

    from distft.evaluation.evaluate import _generate_full_forward

    with torch.no_grad():
        tokens = _generate_full_forward(model, rows, new_tokens, [never], tokenizer.pad_token_id, "cpu")
    assert all(len(t) == new_tokens for t in tokens)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]


def decoders(name: str, model, tokenizer, rows, new_tokens: int, never: int) -> dict:
    """The decoders to time for one model, by name (the baseline last)."""
    never_ends = NeverEnds(tokenizer, never)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pad_id = tokenizer.pad_token_id
    if name in ("prefix", "prompt"):
        return {
            "distft (cached)": lambda: distft_generate(model, never_ends, rows, new_tokens),
            "old full forward": lambda: full_forward(model, tokenizer, rows, new_tokens, never),
            "base model.generate": lambda: hf_generate(base, rows, new_tokens, pad_id, never),
        }
    return {
        "distft": lambda: distft_generate(model, never_ends, rows, new_tokens),
        "model.generate": lambda: hf_generate(model, rows, new_tokens, pad_id, never),
    }


def timed_rounds(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each run over `repeats` interleaved rounds, after an untimed one; and
    each run's last result. Each round starts one run later (A B C, B C A, C A B, ...), so that
    no decoder always follows the same one (the allocator's and the caches' state it leaves)."""
    results = {name: run() for name, run in runs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            started = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts, answered in one batch")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--techniques", default=",".join(TECHNIQUES), help="a comma-separated subset of "
                        + ", ".join(TECHNIQUES))
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from distft.model.pretrained import HOW_TO_GET_IT, smollm2_dir

    smollm2 = smollm2_dir()
    if smollm2 is None:
        sys.exit(f"SmolLM2-135M-Instruct is not prepared: {HOW_TO_GET_IT}")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    never = AutoConfig.from_pretrained(smollm2).vocab_size  # 49152: no logit has this id
    questions = (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    rows = sorted((list(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                      add_generation_prompt=True)["input_ids"]) for q in questions),
                  key=len)  # generate_outputs' order, so every decoder gets the very same batch
    tokens = args.prompts * args.new_tokens
    lines, summary, started = [], [], time.perf_counter()
    for name in args.techniques.split(","):
        model = build(smollm2, TECHNIQUES[name], tokenizer, never)
        runs = decoders(name, model, tokenizer, rows, args.new_tokens, never)
        medians, results = timed_rounds(runs, args.repeats)
        ours = medians["distft (cached)" if name in ("prefix", "prompt") else "distft"]
        baseline = medians["base model.generate" if name in ("prefix", "prompt") else "model.generate"]
        for run, seconds in medians.items():
            lines.append(f"| {name} | {run} | {seconds:.2f} | {seconds / tokens * 1000:.1f} | "
                         f"{baseline / seconds:.2f} |")
        text = f"{name}: speed vs model.generate {baseline / ours:.2f} (target >= 0.90)"
        if name in ("prefix", "prompt"):
            same = results["distft (cached)"] == results["old full forward"]
            text += (f", {medians['old full forward'] / ours:.1f}x faster than the old full forward, "
                     f"same answers as it: {same}")
        summary.append(text)
        print(text, flush=True)
        del model, runs

    table = "\n".join(["| model | decoder | median s | ms / token | speed vs model.generate |",
                       "|---|---|---:|---:|---:|", *lines])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    details = (f"SmolLM2-135M-Instruct fp32, {args.prompts} chat prompts ({len(rows[0])}-{len(rows[-1])} tokens) in one "
               f"batch, {args.new_tokens} new tokens each (no stop), {torch.get_num_threads()} torch threads; median of "
               f"{args.repeats} interleaved rounds after a warm-up; prefix/prompt: 20 virtual tokens; 1-min load "
               f"{load:.1f} at the end; {time.perf_counter() - started:.0f} s in all")
    report("generation", command_line(), details, table, "\n".join(summary), keep=args.record)


if __name__ == "__main__":
    main()
