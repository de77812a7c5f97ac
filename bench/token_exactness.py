"""Token exactness: distft's training ids against the tokenizer's own encoding of the whole text.

With a LLaMA-2-style SentencePiece tokenizer of `--vocab` tokens (32,000 by default, LLaMA-2's size;
built by `distft.data.tokenizers`, no download) on `--rows` Alpaca rows (the shipped synthetic
tasks, every `--special-every`-th row with literal `<s>`, `</s>`, `<unk>` text in its input and
output), it counts:

- exact: samples whose ids equal `tokenizer(full formatted text)` + eos (text specials not parsed);
- piecewise: the same for the old way (prompt and response encoded apart), for comparison;
- special ids from data text: bos/eos/unk ids beyond the one bos and eos a sample has;
- multi-turn: held-out conversations (3 assistant turns, data.chat_template=headers) whose eval
  prompt ids equal the training ids before the last answer;
- over-long: rows dropped as over-long against the count from the real token counts.

It measures correctness, not time (the build and the pipeline times are printed for reference).

    python bench/token_exactness.py [--rows 20000] [--vocab 32000] [--max-seq-len 60] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.common import command_line, report  # noqa: E402

LITERAL = " <s> and </s> or <unk> "


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-seq-len", type=int, default=60, help="low enough that some rows are over-long")
    parser.add_argument("--special-every", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args(argv)

    from distft.config import DataConfig
    from distft.data import synthetic
    from distft.data.pipeline import prepare_data
    from distft.data.templates import alpaca_prompt, use_chat_template
    from distft.data.tokenizers import build_tokenizer
    from distft.model.build import IGNORE_INDEX

    started = time.perf_counter()
    tok = build_tokenizer("llama2", args.vocab)
    build_s = time.perf_counter() - started
    rows, seen = [], set()
    for row in synthetic.generate(args.rows * 2, seed=7):  # unique rows, so none is dropped as a duplicate
        key = (row["instruction"], row["input"], row["output"])
        if key not in seen and len(rows) < args.rows + 1:
            seen.add(key)
            rows.append(row)
    held_out, rows = rows[-1], rows[:-1]
    for i, row in enumerate(rows):
        if i % args.special_every == 0:
            row["input"] = (row["input"] or "x") + LITERAL
            row["output"] = row["output"] + LITERAL.rstrip()
    with tempfile.TemporaryDirectory() as tmp:
        path, eval_path = os.path.join(tmp, "rows.jsonl"), os.path.join(tmp, "eval.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(eval_path, "w") as f:
            f.write(json.dumps(held_out) + "\n")
        cfg = DataConfig(source="jsonl", path=path, eval_path=eval_path, template="alpaca",
                         max_seq_len=args.max_seq_len, packing=False)
        started = time.perf_counter()
        data = prepare_data(cfg, tok)
        prepare_s = time.perf_counter() - started

    bos, eos, specials = tok.bos_token_id, tok.eos_token_id, {0, 1, 2}
    exact = piecewise = data_specials = real_overlong = 0
    kept = iter(data.train)
    for row in rows:
        prompt = alpaca_prompt(row, "alpaca")
        full = [bos] + tok(prompt + row["output"], add_special_tokens=False, split_special_tokens=True).input_ids + [eos]
        old = [bos] + tok.encode(prompt, add_special_tokens=False) + tok.encode(row["output"], add_special_tokens=False) + [eos]
        if len(full) > args.max_seq_len:
            real_overlong += 1
            continue
        sample = next(kept)
        exact += sample["input_ids"] == full
        piecewise += old == full
        ids = sample["input_ids"]
        data_specials += sum(i in specials for i in ids) - 2
        assert sample["labels"][0] == IGNORE_INDEX
    n = len(data.train)
    assert next(kept, None) is None

    # Multi-turn conversations: eval prompt == the training prefix before the last answer.
    use_chat_template(tok, "headers")
    convs = []
    for i in range(0, min(len(rows), 600) - 2, 3):
        a, b, c = rows[i : i + 3]
        messages = []
        for r in (a, b, c):
            messages += [{"role": "user", "content": r["instruction"] + "\n" + (r["input"] or "")},
                         {"role": "assistant", "content": r["output"]}]
        convs.append({"messages": messages})
    with tempfile.TemporaryDirectory() as tmp:
        train_path, eval_path = os.path.join(tmp, "train.jsonl"), os.path.join(tmp, "eval.jsonl")
        with open(train_path, "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in convs[:20])
        with open(eval_path, "w") as f:
            f.writelines(json.dumps(c) + "\n" for c in convs[20:])
        chat = prepare_data(DataConfig(source="jsonl", path=train_path, eval_path=eval_path, max_seq_len=4096,
                                       chat_template="headers"), tok)
    same = sum(r["prompt_ids"] == s["input_ids"][: len(r["prompt_ids"])] and s["labels"][len(r["prompt_ids"])] != -100
               for r, s in zip(chat.eval_rows, chat.eval))

    table = "\n".join([
        "| check | result |", "|---|---:|",
        f"| samples equal to the full-text tokenization | {exact}/{n} ({exact / n:.1%}) |",
        f"| the old piecewise encoding, same rows | {piecewise}/{n} ({piecewise / n:.1%}) |",
        f"| special ids from data text | {data_specials} |",
        f"| multi-turn eval prompts equal to the training prefix | {same}/{len(chat.eval_rows)} |",
        f"| over-long rows dropped / counted from real token counts | {data.report.overlong}/{real_overlong} |",
    ])
    details = (f"llama2-style SentencePiece tokenizer, {len(tok)} tokens (built in {build_s:.1f} s); {args.rows} Alpaca "
               f"rows, every {args.special_every}th with literal <s>/</s>/<unk> text; template alpaca, max_seq_len "
               f"{args.max_seq_len}; prepare_data {prepare_s:.1f} s")
    summary = (f"{exact / n:.1%} exact (piecewise {piecewise / n:.1%}), {data_specials} special ids from data, "
               f"{same}/{len(chat.eval_rows)} multi-turn prompts equal, over-long {data.report.overlong}/{real_overlong}")
    report("token_exactness", command_line(), details, table, summary, keep=args.record)


if __name__ == "__main__":
    main()
