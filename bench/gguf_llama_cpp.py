"""The GGUF export read by llama.cpp itself (not only by transformers): tokenizer and greedy answers.

    python bench/gguf_llama_cpp.py --llama-python /path/to/venv/bin/python [--work DIR]

A short LoRA run of the tests' SmolLM2 on conversations (tests/unit/test_real_model_chat.py
chat_run), exported three ways (safetensors fp16, GGUF f16, GGUF q8_0); llama.cpp, through
llama-cpp-python in the interpreter `--llama-python` names, tokenizes the held-out prompts of
tests/unit/test_gguf_export.py and answers them greedily (32 tokens, no repeat penalty), and
transformers does the same on the safetensors export. Prints how many token sequences and answers
are identical. Not in `make test`: llama-cpp-python has no wheel here and builds from source in
about 8 minutes on 2 cores (`pip install llama-cpp-python`, cmake and a C++ compiler).
Results: bench/RESULTS.md ("GGUF in llama.cpp").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA_SIDE = r"""
import json, sys
from llama_cpp import Llama
prompts, files, out = json.load(open(sys.argv[1])), json.loads(sys.argv[2]), sys.argv[3]
result = {}
for kind, path in files.items():
    llm = Llama(model_path=path, n_ctx=512, verbose=False, seed=0)
    rows = []
    for text in prompts:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        answer = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            if token == llm.token_eos() or len(answer) >= 32:
                break
            answer.append(token)
        rows.append({"ids": ids, "answer": answer})
    result[kind] = {"rows": rows, "eos": llm.token_eos(), "pre": llm.metadata.get("tokenizer.ggml.pre")}
json.dump(result, open(out, "w"))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", required=True, help="a Python that imports llama_cpp")
    parser.add_argument("--work", default=None, help="folder for the run and the exports (default: a new temporary one)")
    args = parser.parse_args()
    import pathlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distft.commands.export import main as export
    from distft.model.pretrained import smollm2_dir
    from tests.unit.test_gguf_export import HELD_OUT
    from tests.unit.test_real_model_chat import chat_run

    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="gguf-llama-cpp-"))
    work.mkdir(parents=True, exist_ok=True)
    run = chat_run(smollm2_dir(), work, "train.max_steps=2", "train.lr=1e-3", "eval.num_samples=1",
                   "eval.max_new_tokens=1", "eval.compare_base=false", "tracking.plot=false")
    for name, extra in (("hf", ["--dtype", "float16"]), ("f16", ["--format", "gguf"]),
                        ("q8_0", ["--format", "gguf", "--gguf-type", "q8_0"])):
        assert export([run["run_dir"], "--out", str(work / name), *extra]) == 0
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in HELD_OUT]
    (work / "prompts.json").write_text(json.dumps(texts))
    files = {kind: str(work / kind / f"model-{kind}.gguf") for kind in ("f16", "q8_0")}
    subprocess.run([args.llama_python, "-c", LLAMA_SIDE, str(work / "prompts.json"), json.dumps(files),
                    str(work / "llama.json")], check=True)
    llama = json.loads((work / "llama.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            answers.append(model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist())
    for kind in files:
        eos, rows = llama[kind]["eos"], llama[kind]["rows"]
        same_ids = sum(r["ids"] == tokenizer(t)["input_ids"] for r, t in zip(rows, texts))
        same = sum(r["answer"] == (a[:a.index(eos)] if eos in a else a) for r, a in zip(rows, answers))
        print(f"{kind}: llama.cpp pre-tokenizer {llama[kind]['pre']}; prompts tokenized as transformers does: "
              f"{same_ids} of {len(texts)}; greedy answers identical to transformers on the fp16 export: "
              f"{same} of {len(texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
