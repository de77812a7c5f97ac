"""One end-to-end run per tokenizer family, as a user runs it (issue 14).

For each family (LLaMA-2-style SentencePiece, Llama-3-style byte-level BPE with its chat template,
and the built-in character-level tokenizer): `python -m distft` trains a tiny model with that
vocabulary on conversations, `python -m distft.evaluate RUN` writes its report, `python -m
distft.checkpoint.export RUN --out merged` writes a Hugging Face model, in that order; the checkpoint still
verifies; and the export, loaded with plain transformers, generates the answer and stops at the
family's end-of-turn token by its own generation_config. The llama2 tokenizer ships no chat
template: the run uses `data.chat_template=headers`, the fallback the preflight message advises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distft.data.tokenizers import save_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANSWER = "ok"
STOP = {"llama2": "</s>", "llama3": "<|eot_id|>", "char": "</s>"}


def conversations(n: int) -> list[dict]:
    words = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano"]
    return [{"messages": [{"role": "user", "content": f"Say ok to {words[i % 8]} {i}."},
                          {"role": "assistant", "content": ANSWER}]} for i in range(n)]


@pytest.mark.parametrize("family", ["llama2", "llama3", "char"])
def test_train_evaluate_export_and_generate_until_the_stop_token(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distft.checkpoint.verify import verify
    from distft.commands.evaluate import main as evaluate_main
    from distft.commands.export import main as export_main

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversations(96)))
    overrides = []
    if family != "char":
        tokenizer_dir = save_tokenizer(family, tmp_path / "tokenizer")
        overrides += [f"model.tokenizer={tokenizer_dir}", "model.vocab_size=1000"]
    if family == "llama2":
        # Without a chat template, preflight refuses chat data before anything starts, with advice...
        refused = subprocess.run([sys.executable, "-m", "distft", "+experiment=tiny_full", "data=jsonl",
                                  f"data.path={data}", f"run.root={tmp_path / 'refused'}", *overrides],
                                 capture_output=True, text=True, cwd=REPO, timeout=300)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert "has none; set data.chat_template=headers" in refused.stderr
        assert not (tmp_path / "refused").exists()
        overrides.append("data.chat_template=headers")  # ...that works
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "distft", "+experiment=tiny_full", "data=jsonl", f"data.path={data}",
               f"run.dir={run_dir}", "data.eval_size=8", "data.max_seq_len=64", "train.max_steps=40",
               "train.warmup_steps=2", "eval.num_samples=8", "eval.max_new_tokens=8", "tracking.progress_bar=false",
               "tracking.plot=false", *overrides]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_after"]["exact_match_strict"] == 1.0  # answers end at the stop token: exactly "ok"

    assert evaluate_main([str(run_dir), "--no-base"]) == 0
    report = (run_dir / "evals").glob("*/eval_report.md")
    assert "| exact_match_strict | 1.0000 |" in next(report).read_text()
    out = tmp_path / "merged"
    assert export_main([str(run_dir), "--out", str(out)]) == 0
    verify(summary["final_checkpoint"])  # neither wrote into the checkpoint

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    stop_id = tokenizer.convert_tokens_to_ids(STOP[family])
    eos = model.generation_config.eos_token_id
    assert stop_id in (eos if isinstance(eos, list) else [eos])
    assert model.generation_config.use_cache is True and model.config.use_cache is True  # trained without a cache
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say ok to piano 1000."}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if ids[0, 0] != tokenizer.bos_token_id:
        ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt").input_ids
    generated = model.generate(ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=20, do_sample=False)
    new = generated[0, ids.shape[1]:].tolist()
    assert new[-1] == stop_id and len(new) < 20  # stopped by the export's own generation_config
    assert tokenizer.decode(new[:-1]).strip() == ANSWER
