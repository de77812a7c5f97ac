"""The loss path: a training step's tensor peak and tokens/s with distft's chunked loss
(distft/model/loss.py: the head and the cross-entropy together, chunk by chunk) against the plain path
it replaced (the head's full [tokens, V] logits, then `token_loss`), at Llama-2's (32,000),
SmolLM2's (49,152) and Llama-3's (128,256) vocabularies x 2048 and 8192 tokens.

The model is SmolLM2-135M's layer shape (hidden 576, MLP 1536, 9 heads, 3 KV heads), 2 layers
(`--layers 30`: SmolLM2's depth, where the layers' activations dwarf the loss), untied head, fp32, one row; each step is a forward and a backward. Per cell:
- peak: the step's tensor peak (torch profiler, as tracking.cpu_memory_steps measures a run);
- head + loss share: (peak - the peak of the same step whose loss is the hidden states' sum) / peak,
  i.e. what the head and the loss add to the step; loss share: the same without the head's weight
  gradient (V x h x 4 bytes), which any loss path makes (the issue's goal: below 10%). Every mode
  starts without gradients (the profiler counts from zero: gradients freed inside would lower it);
- tokens/s: median over interleaved pairs (chunked, plain, chunked, plain, ...).
Plain cells whose logits alone would pass --max-plain-gb are not run (their peak is ~4x the fp32
logits).

    python bench/loss_path.py [--repeats 3] [--max-plain-gb 10] [--layers 2] [--tokens 2048 8192] [--record]
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

VOCABS = (32_000, 49_152, 128_256)
TOKENS = (2048, 8192)


def build(vocab: int, tokens: int, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=tokens,
                                         tie_word_embeddings=False))
    input_ids = torch.randint(0, vocab, (1, tokens))
    labels = input_ids.clone()
    labels[:, : tokens // 8] = -100  # a prompt
    return model, {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}, labels


def step(model, inputs, labels, mode: str) -> None:
    from distft.model.build import token_loss
    from distft.model.loss import computing_loss

    model.zero_grad(set_to_none=True)
    if mode == "chunked":
        with computing_loss(model, labels) as armed:
            loss, _ = armed.result(model(**inputs, use_cache=False).logits)
    elif mode == "plain":
        loss, _ = token_loss(model(**inputs, use_cache=False).logits, labels)
    else:  # "no head": what the step holds without the head and the loss
        loss = model.model(**inputs, use_cache=False).last_hidden_state.sum()
    loss.backward()


def peak(model, inputs, labels, mode: str) -> int:
    import torch

    from distft.tracking import MemoryMeter

    model.zero_grad(set_to_none=True)  # the last step's gradients go before counting starts, in every mode
    meter = MemoryMeter(torch.device("cpu"), cpu_steps=1)
    step(model, inputs, labels, mode)
    meter.stop()
    return meter.peak()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-plain-gb", type=float, default=10.0)
    parser.add_argument("--layers", type=int, default=2,
                        help="decoder layers (SmolLM2 has 30: the loss's share at a real model's depth)")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    import torch

    gib = 2**30
    rows, shares, ratios = [], [], []
    for vocab in VOCABS:
        for tokens in args.tokens:
            model, inputs, labels = build(vocab, tokens, args.layers)
            run_plain = 4 * tokens * vocab * 4 <= args.max_plain_gb * gib
            modes = ["chunked", "plain"] if run_plain else ["chunked"]
            base = peak(model, inputs, labels, "no head")
            peaks = {mode: peak(model, inputs, labels, mode) for mode in modes}
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    start = time.perf_counter()
                    step(model, inputs, labels, mode)
                    times[mode].append(time.perf_counter() - start)
            speed = {mode: tokens / statistics.median(times[mode]) for mode in modes}
            share = (peaks["chunked"] - base) / peaks["chunked"]
            # The head's weight gradient (V x h, fp32), which every path makes: what is left is the loss's.
            head_grad = model.lm_head.weight.numel() * 4
            loss_only = (peaks["chunked"] - base - head_grad) / peaks["chunked"]
            shares.append(loss_only)
            plain_peak = f"{peaks['plain'] / gib:.3f}" if run_plain else "not run"
            plain_share = f"{(peaks['plain'] - base) / peaks['plain']:.0%}" if run_plain else "-"
            plain_speed = f"{speed['plain']:.0f}" if run_plain else "-"
            ratio = speed["chunked"] / speed["plain"] if run_plain else None
            if ratio is not None:
                ratios.append(ratio)
            rows.append(f"| {vocab:,} | {tokens} | {peaks['chunked'] / gib:.3f} | {plain_peak} | {share:.1%} | "
                        f"{loss_only:.1%} | "
                        f"{plain_share} | {speed['chunked']:.0f} | {plain_speed} | "
                        f"{f'{ratio:.2f}' if ratio is not None else '-'} |")
            print(rows[-1], flush=True)
            del model
    table = "\n".join([
        "| vocabulary | tokens | chunked peak GiB | plain peak GiB | chunked: head + loss share | chunked: loss share "
        "| plain: head + loss share | chunked tokens/s | plain tokens/s | speed ratio |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows])
    summary = (f"the chunked loss's share of the step's peak (the head's weight gradient apart): at most "
               f"{max(shares):.1%}; tokens/s chunked / plain: "
               f"{min(ratios):.2f} to {max(ratios):.2f}")
    report("loss path", command_line(),
           f"one row, fp32, SmolLM2's layer shape x {args.layers} layers, untied head; torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved steps", table, summary, args.record)


if __name__ == "__main__":
    main()
