"""A short LoRA run of the real SmolLM2-135M-Instruct on conversations (issue 35, items 1 and 2):
rows with `messages` train in its ChatML template while data.template keeps its default
(`alpaca`). Everything downstream must prompt the model in the format the rows were rendered in
(recorded in the checkpoint), never data.template: the chat, the comparison of prompts, the
export's prompt_format.json; and the exported model, prompted the usual way (`tok(prompt)`,
`generate`), sees exactly its training context and stops at <|im_end|>."""

from __future__ import annotations

import json
import os

import pytest

from tests.unit.test_train import compose

QUESTIONS = [("What is the capital of France?", "Paris."), ("What is 2 + 3?", "5."), ("Name a primary colour.", "Red."),
             ("What do bees make?", "Honey."), ("How many legs has a spider?", "Eight."),
             ("What is the opposite of hot?", "Cold."), ("Which planet do we live on?", "Earth."),
             ("What is frozen water called?", "Ice.")]


def chat_run(smollm2: str, root, *overrides: str) -> dict:
    """A LoRA run of SmolLM2 on the QUESTIONS as conversations (48 rows, 64 tokens, 2 per step),
    in `root`; `overrides` after these defaults."""
    from distft.train import train

    rows = [{"messages": [{"role": "user", "content": f"{q} (#{i})"}, {"role": "assistant", "content": a}]}
            for i in range(6) for q, a in QUESTIONS]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return train(compose("technique=lora", f"model.name_or_path={smollm2}", "data=jsonl", f"data.path={data}",
                         "data.max_seq_len=64", "data.eval_size=4", "train.max_steps=1", "train.global_batch_size=2",
                         "train.micro_batch_size=2", "train.lr=1e-4", "eval.num_samples=2", "eval.max_new_tokens=8",
                         f"run.root={root}", "tracking.progress_bar=false", "tracking.wandb.mode=disabled", *overrides))


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory):
    return chat_run(smollm2, tmp_path_factory.mktemp("smollm2-chat"))


def test_the_checkpoint_records_the_chat_format_the_rows_were_rendered_in(run):
    from distft.checkpoint.export import checkpoint_config
    from distft.checkpoint.store import read_trainer_state
    from distft.checkpoint.verify import resolve_checkpoint
    from distft.data.templates import trained_format

    checkpoint = resolve_checkpoint(run["run_dir"])
    cfg = checkpoint_config(checkpoint)
    assert cfg.data.template == "alpaca"  # the default, which these rows never used
    assert read_trainer_state(checkpoint)["formats"] == [{"source": "jsonl", "format": "chat", "rows": 44}]
    assert trained_format(checkpoint, cfg) == "chat"
    with open(os.path.join(run["run_dir"], "summary.json")) as f:
        assert json.load(f)["data"]["formats"] == [{"source": "jsonl", "format": "chat", "rows": 44}]


def test_chat_prompts_in_chatml_and_takes_a_system_turn(run, smollm2_tokenizer):
    from distft.evaluation.chat import load

    chat = load(run["run_dir"], system="You answer in one word.")  # main: "--system needs a chat model"
    assert chat.template == "chat"
    messages = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "What do cows drink?"}]
    expected = smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.prompt_ids("What do cows drink?") == smollm2_tokenizer(expected)["input_ids"]


def test_compare_renders_plain_prompts_in_the_chat_template(run, tmp_path, smollm2_tokenizer):
    from distft.evaluation.compare import compare

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is the capital of Italy?", "reference": "Rome."}) + "\n")
    result = compare([run["run_dir"]], str(tmp_path / "cmp"), prompts=str(prompts), max_new_tokens=8)
    with open(result["predictions"]) as f:
        [sample] = [json.loads(line) for line in f]
    expected = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Italy?"}],
                                                     tokenize=False, add_generation_prompt=True)
    assert sample["prompt"] == expected


def test_the_export_says_chat_and_answers_tok_prompt_generate_as_trained(run, tmp_path, smollm2_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distft.checkpoint.export import checkpoint_config, export
    from distft.checkpoint.verify import resolve_checkpoint
    from distft.data.pipeline import encode

    out = export(run["run_dir"], str(tmp_path / "merged"))
    with open(os.path.join(out, "prompt_format.json")) as f:
        assert json.load(f)["template"] == "chat"
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    cfg = checkpoint_config(resolve_checkpoint(run["run_dir"]))
    trained, _ = encode({"messages": messages + [{"role": "assistant", "content": "Paris."}]}, "chat", cfg.data, tok)
    assert ids[0].tolist() == trained.input_ids[: trained.prompt_len]  # the context it was trained on
    out_ids = model.generate(ids, max_new_tokens=16, do_sample=False)[0][ids.shape[1]:].tolist()
    assert tok.eos_token_id in out_ids and tok.decode(out_ids).endswith("<|im_end|>")
