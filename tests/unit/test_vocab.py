"""A tokenizer longer than the model's embedding (tokens added to a published tokenizer): full
fine-tuning of a path model resizes the embeddings (and every rebuild of the base does the same);
adapters, virtual tokens and from-scratch presets are refused in one line, by the preflight and
by the trainer, before anything loads. A shorter tokenizer (LLaMA's padded vocabularies) is fine.

The model is a real tiny LLaMA saved with `save_pretrained` next to a LLaMA-2-family tokenizer of
1000 tokens plus ChatML's two special tokens (1002), so the chat-formatted data itself holds ids
1000 and 1001: without the resize the first eval loss raises `IndexError: index out of range`.

The tests that start a process: tests/cli/test_vocab.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

from distft.config import ModelConfig
from distft.preflight import preflight

ADDED = ["<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ROWS = 1000  # the saved model's embedding rows
TOKENS = ROWS + len(ADDED)


def added_token_tokenizer(family: str = "llama2"):
    from distft.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(family)
    assert len(tokenizer) == ROWS
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def path_model(tmp_path_factory) -> str:
    """A directory with a tiny LLaMA of 1000 embedding rows and a tokenizer of 1002 tokens."""
    from distft.model.build import build_model

    directory = tmp_path_factory.mktemp("added_tokens") / "model"
    build_model(ModelConfig(vocab_size=ROWS)).save_pretrained(directory)
    added_token_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> str:
    words = ["cat", "dog", "sun", "map", "red", "box", "pen", "cup", "hat", "key"]
    path = tmp_path_factory.mktemp("chat") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            word = f"{words[i % 10]}{words[(i * 3 + 1) % 10]}{i}"
            f.write(json.dumps({"messages": [{"role": "user", "content": f"upper-case: {word}"},
                                             {"role": "assistant", "content": word.upper()}]}) + "\n")
    return str(path)


def configured(*overrides: str):
    """The composed config and the vocabulary problems preflight found (others are not ours)."""
    cfg, errors = preflight(list(overrides))
    return cfg, [e for e in errors if "embedding rows" in e]


def test_full_fine_tuning_resizes_the_embeddings_and_trains_the_new_tokens(path_model, chat_data, tmp_path, capsys):
    from safetensors import safe_open

    from distft.checkpoint.export import load_base, load_model
    from distft.data.pipeline import prepare_data
    from distft.model.build import load_tokenizer, token_loss
    from distft.techniques.build import build_meta_model
    from distft.train import train

    cfg, problems = configured(
        "+experiment=tiny_full", f"model.name_or_path={path_model}", "data=jsonl", f"data.path={chat_data}",
        "data.template=chat", "data.eval_size=4", "data.max_seq_len=64", f"run.root={tmp_path}",
        "train.max_steps=2", "train.warmup_steps=0", "train.global_batch_size=4", "train.micro_batch_size=4",
        "eval.num_samples=2", "eval.max_new_tokens=2", "eval.report_samples=1", "tracking.progress_bar=false",
    )
    assert problems == []  # full fine-tuning of a path model can resize: nothing to refuse
    tokenizer = load_tokenizer(cfg.model)
    assert len(tokenizer) == TOKENS
    # The precondition of the issue: the held-out batches themselves hold the new ids.
    held_out_ids = {i for row in prepare_data(cfg.data, tokenizer, seed=cfg.data.seed).eval for i in row["input_ids"]}
    assert {ROWS, ROWS + 1} <= held_out_ids

    summary = train(cfg)

    (line,) = [line for line in capsys.readouterr().out.splitlines() if "resized the input embeddings" in line]
    assert line.startswith("[rank0] ") and line.endswith(
        f" INFO model.name_or_path={path_model!r} has {ROWS} embedding rows and the tokenizer of "
        f"model.name_or_path={path_model!r} has {TOKENS} tokens: resized the input embeddings and the output head "
        f"to {TOKENS} rows (technique=full trains them); the 2 new rows start at the mean of the existing rows")
    for key in ("eval_before", "eval_after"):
        assert torch.isfinite(torch.tensor(summary[key]["loss"]))
    checkpoint = summary["final_checkpoint"]
    with open(os.path.join(checkpoint, "model", "config.json")) as f:
        assert json.load(f)["vocab_size"] == TOKENS
    with safe_open(os.path.join(checkpoint, "model", "model.safetensors"), "pt") as f:
        trained_embedding = f.get_tensor("model.embed_tokens.weight")
        assert list(trained_embedding.shape) == [TOKENS, 128]
        assert list(f.get_slice("lm_head.weight").get_shape()) == [TOKENS, 128]

    # The base, rebuilt as evaluation rebuilds it: resized the same way, the new rows at the mean
    # of the old ones; and the two training steps moved those rows (they were trained).
    base = load_base(cfg)
    embedding = base.get_input_embeddings().weight
    assert embedding.shape[0] == TOKENS and base.lm_head.weight.shape[0] == TOKENS
    assert torch.allclose(embedding[ROWS:], embedding[:ROWS].mean(0).expand(len(ADDED), -1))
    assert torch.allclose(base.lm_head.weight[ROWS:], base.lm_head.weight[:ROWS].mean(0).expand(len(ADDED), -1))
    assert torch.equal(embedding[:ROWS], load_base(cfg).get_input_embeddings().weight[:ROWS])
    assert not torch.allclose(trained_embedding[ROWS:], embedding[ROWS:])
    # FSDP's meta-device build has the resized shapes too (rank 0's real model fills it).
    meta = build_meta_model(cfg, torch.float32, tokenizer)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}

    # A batch with the new ids runs through the tuned model.
    _, tuned, saved_tokenizer = load_model(checkpoint)
    ids = saved_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
    ids = torch.tensor([ids])
    assert (ids >= ROWS).sum() >= 2
    with torch.no_grad():
        logits = tuned(input_ids=ids).logits
    loss_sum, targets = token_loss(logits, ids)
    assert logits.shape[-1] == TOKENS and torch.isfinite(loss_sum) and targets == ids.shape[1] - 1


@pytest.mark.parametrize("technique", ["lora", "qlora", "dora", "prefix", "prompt"])
def test_preflight_refuses_adapters_and_virtual_tokens_on_a_shorter_embedding(path_model, technique):
    _, problems = configured(f"+experiment=tiny_{technique}", f"model.name_or_path={path_model}")
    assert problems == [
        f"the tokenizer of model.name_or_path={path_model!r} has {TOKENS} tokens, more than the {ROWS} embedding rows "
        f"of model.name_or_path={path_model!r}; technique={technique} keeps the embeddings frozen, so the 2 token(s) "
        f"past them would index out of range and could never be learned: use technique=full (which resizes the "
        f"embeddings to {TOKENS} rows), or a tokenizer without the added tokens (model.tokenizer=<directory>)"
    ]


def test_preflight_refuses_a_from_scratch_preset_smaller_than_its_tokenizer(path_model):
    _, problems = configured("+experiment=tiny_full", f"model.tokenizer={path_model}")
    assert problems == [
        f"the tokenizer model.tokenizer={path_model!r} has {TOKENS} tokens, more than the model.vocab_size=128 "
        f"embedding rows of model=tiny (built from scratch): token ids 128..{TOKENS - 1} would index past the "
        f"embedding; set model.vocab_size={TOKENS} (or more)"
    ]
    assert configured("+experiment=tiny_lora", f"model.tokenizer={path_model}", f"model.vocab_size={TOKENS}")[1] == []


def test_the_trainer_refuses_before_the_data_and_the_model_load(path_model, tmp_path):
    """What the preflight cannot count (a hub tokenizer, a SentencePiece-only one) the trainer
    checks right after loading the tokenizer: a missing data file is never reached."""
    from distft.errors import ModelLoadError
    from distft.train import train

    cfg, problems = configured("+experiment=tiny_lora", f"model.name_or_path={path_model}", f"run.root={tmp_path}")
    assert len(problems) == 1  # bypassed here, as a tokenizer preflight cannot read would be
    cfg.data.source, cfg.data.path = "jsonl", str(tmp_path / "missing.jsonl")
    with pytest.raises(ModelLoadError) as refused:
        train(cfg)
    assert str(refused.value) == problems[0]


def test_building_the_base_refuses_where_it_cannot_resize(path_model):
    from distft.errors import ModelLoadError
    from distft.techniques.build import build_trainable_model

    tokenizer = added_token_tokenizer()
    scratch, _ = configured("+experiment=tiny_full")
    with pytest.raises(ModelLoadError, match=f"set model.vocab_size={TOKENS} \\(or more\\)$"):
        build_trainable_model(scratch, torch.float32, tokenizer)
    lora, _ = configured("+experiment=tiny_lora", f"model.name_or_path={path_model}")
    with pytest.raises(ModelLoadError, match="technique=lora keeps the embeddings frozen"):
        build_trainable_model(lora, torch.float32, tokenizer)


def test_a_shorter_tokenizer_changes_nothing_and_tied_embeddings_stay_tied(path_model):
    from distft.model.build import build_model, build_offline_tokenizer
    from distft.model.vocab import fit_embeddings, vocab_problem
    from distft.techniques.build import build_base

    full, _ = configured("+experiment=tiny_full", f"model.name_or_path={path_model}")
    offline = build_offline_tokenizer()  # 101 tokens: LLaMA-style padded embeddings are normal
    assert build_base(full, torch.float32, offline).get_input_embeddings().weight.shape[0] == ROWS
    for technique in ("full", "lora", "prefix"):
        cfg, _ = configured(f"+experiment=tiny_{technique}", f"model.name_or_path={path_model}")
        assert vocab_problem(cfg, len(offline), ROWS) is None and vocab_problem(cfg, ROWS, ROWS) is None

    tied = build_model(ModelConfig(vocab_size=ROWS, tie_word_embeddings=True))
    state = torch.random.get_rng_state()
    fit_embeddings(tied, full, added_token_tokenizer())
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn from the caller's generator
    weight = tied.get_input_embeddings().weight
    assert weight.shape[0] == TOKENS and tied.lm_head.weight is weight
    assert torch.allclose(weight[ROWS:], weight[:ROWS].mean(0).expand(len(ADDED), -1))


@pytest.mark.parametrize("family", ["llama2", "llama3"])
def test_the_preflight_count_is_the_tokenizers_length(tmp_path, family):
    from transformers import AutoTokenizer

    from distft.model.vocab import local_tokenizer_len

    tokenizer = added_token_tokenizer(family)
    tokenizer.add_tokens(["<tool>", "overfitting"])  # ordinary added tokens count too
    tokenizer.save_pretrained(tmp_path)
    loaded = len(AutoTokenizer.from_pretrained(tmp_path))
    assert loaded == TOKENS + 2
    assert local_tokenizer_len(ModelConfig(tokenizer=str(tmp_path))) == loaded
    assert local_tokenizer_len(ModelConfig(name_or_path=str(tmp_path))) == loaded
    assert local_tokenizer_len(ModelConfig(tokenizer="meta-llama/Llama-2-7b-hf")) is None  # not counted here
