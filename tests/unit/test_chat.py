"""`python -m distft.chat`: a person probing a model by hand, driven here with piped input
(issue 19, item 6). A held-out prompt typed into the chat must get the answer the run's own
evaluation recorded, for the tuned model, its base, its export, and prompt tuning.

Streaming, sampling and the context (issue 39, item 3): the text streamed is the answer returned;
temperature 0 is the evaluation's greedy answer; a seed repeats sampled answers, in every decoder;
a conversation that outgrows the model's context drops its oldest pairs, says so once, and a
message too long on its own is refused while the conversation goes on.

The tests that start a process: tests/cli/test_chat.py."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys

import pytest

from tests.unit.test_train import compose


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from distft.train import train

    root = tmp_path_factory.mktemp("runs")
    common = [f"run.root={root}", "eval.num_samples=4", "eval.max_new_tokens=8", "tracking.progress_bar=false",
              "tracking.wandb.mode=disabled"]
    return {technique: train(compose(f"+experiment=tiny_{technique}", "train.max_steps=4", "train.lr=3e-3", *common))
            for technique in ("lora", "prompt")}


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny preset's untrained model with a context of 160 positions (the preset's is 512), and
    the offline tokenizer with its chat template: a conversation outgrows it in four turns."""
    from distft.config import ModelConfig
    from distft.model.build import build_model, build_offline_tokenizer

    return build_model(ModelConfig(max_position_embeddings=160)).eval(), build_offline_tokenizer()


def held_out(run: dict, model: str) -> list[tuple[str, str]]:
    """(the message typed for each held-out prompt, `model`'s recorded answer: "base" or "tuned")."""
    with open(os.path.join(run["run_dir"], "eval_report.predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["prompt"].rstrip("\n"), r["outputs"][model]["text"]) for r in records]


class Written(io.StringIO):
    """A text stream that also keeps each write apart: an answer streamed comes in pieces."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


# lora's base decodes with model.generate, prompt tuning with evaluate's own cached decoder; the
# lora run's tuned answers are all empty at 4 steps (eos first), its base's are not.
DECODERS = [("lora", "base"), ("prompt", "tuned")]


def test_a_chat_model_keeps_the_conversation_and_reset_forgets_it(runs, tmp_path):
    """template=chat: each turn is rendered after the earlier ones (the prompt grows), /reset
    starts over (the first answer comes again)."""
    from distft.checkpoint.export import load_model
    from distft.data.templates import stop_token_ids, use_chat_template
    from distft.evaluation.chat import Chat

    cfg, model, tokenizer = load_model(runs["lora"]["run_dir"])
    use_chat_template(tokenizer, "headers")
    session = Chat(model.eval(), tokenizer, "chat", stop_token_ids(tokenizer), 6)
    first = session.prompt_ids("hello")
    answer, _ = session.reply("hello")
    second = session.prompt_ids("again")
    assert second[: len(first)] == first and len(second) > len(first) + len(tokenizer("again")["input_ids"])
    assert tokenizer.decode(second).count("### user:") == 2 and answer in tokenizer.decode(second)
    session.history.clear()
    assert session.prompt_ids("hello") == first


@pytest.mark.parametrize(("technique", "model"), DECODERS)
def test_greedy_answers_stream_as_decoded_and_are_the_evaluations(runs, technique, model):
    """Temperature 0 (the default) is the evaluation's greedy answer, streamed: the text written
    while the tokens come is the answer returned, in pieces (not all at the end), without the prompt."""
    from distft.evaluation.chat import load

    chat = load(runs[technique]["run_dir"], base=model == "base", temperature=0.0)
    assert chat.sampling is None
    for message, recorded in held_out(runs[technique], model):
        out = Written()
        answer, _ = chat.reply(message, stream=out)
        assert answer == recorded and out.getvalue() == answer
        assert message.partition("\n")[2] not in out.getvalue()
        if len(answer) > 1:  # every character but the newest is written while decoding goes on
            assert len(out.pieces) > 1 and out.pieces[0] == answer[0]


@pytest.mark.parametrize(("technique", "model"), DECODERS)
def test_a_seed_repeats_sampled_answers_and_a_tiny_top_p_is_greedy(runs, technique, model):
    """temperature > 0 samples: the same seed gives the same answers (reply k draws from seed + k,
    the process's own generator untouched), another seed and greedy other ones; top_p so small
    that it keeps only the likeliest token gives the greedy answers whatever the seed."""
    import torch

    from distft.evaluation.chat import load

    greedy = load(runs[technique]["run_dir"], base=model == "base")
    messages, recorded = zip(*held_out(runs[technique], model))

    def session(**sampling) -> list[str]:
        chat = dataclasses.replace(greedy, history=[], **sampling)
        return [chat.reply(message)[0] for message in messages]

    rng = torch.get_rng_state()
    sampled = session(temperature=1.5, seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    assert session(temperature=1.5, seed=7) == sampled
    assert sampled != list(recorded) and session(temperature=1.5, seed=8) != sampled
    assert session(temperature=1.5, top_p=1e-6, seed=8) == list(recorded)
    twice = dataclasses.replace(greedy, history=[], temperature=1.5, seed=7)
    assert [twice.reply(messages[0])[0] for _ in range(3)] != [sampled[0]] * 3  # a new draw each reply


def test_every_decoder_samples_as_model_generate_does(runs, tiny_model):
    """evaluate.Sampling draws the same tokens from the same seed in model.generate and in the
    decoders distft runs itself: the full forward, and the prompt-tuned model's cached decoder."""
    import torch

    from distft.checkpoint.export import load_model
    from distft.evaluation.evaluate import Sampling, _generate_cached, _generate_full_forward, _generate_virtual_cached

    def draws(decode, model, sampling) -> list[list[int]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return decode(model, [[1, 40, 41, 42], [1, 50]], 12, [2], 3, "cpu", sampling=sampling)

    model, _ = tiny_model
    for sampling in (Sampling(1.3), Sampling(0.9, top_p=0.8)):
        generated = draws(_generate_cached, model, sampling)
        assert draws(_generate_full_forward, model, sampling) == generated
        assert generated != draws(_generate_cached, model, None)
    _, prompt_model, _ = load_model(runs["prompt"]["run_dir"])
    prompt_model.eval()
    with torch.no_grad():
        cached = draws(_generate_virtual_cached, prompt_model, Sampling(1.3))
        assert draws(_generate_full_forward, prompt_model, Sampling(1.3)) == cached
        assert cached != draws(_generate_virtual_cached, prompt_model, None)


def test_a_long_conversation_drops_its_oldest_pairs_and_a_message_too_long_is_refused(tiny_model):
    """Context 160 positions, 8 kept for the answer: the fourth turn no longer fits after the
    three before it, so the oldest pair goes (only it, the system turn stays); a message longer
    than the context on its own is refused, the conversation kept, and the next one answered."""
    from distft.data.templates import stop_token_ids
    from distft.errors import DataError
    from distft.evaluation.chat import Chat

    model, tokenizer = tiny_model
    chat = Chat(model, tokenizer, "chat", stop_token_ids(tokenizer), 8, system="Be brief.")
    assert chat.context == 160
    users = lambda: [turn["content"] for turn in chat.history if turn["role"] == "user"]  # noqa: E731
    for message in ("first question", "second question", "third question"):
        assert chat.fit(message).dropped == 0
        chat.reply(message)
    assert not chat.trimmed and len(chat.prompt_ids("fourth question")) + 8 > 160
    turn = chat.fit("fourth question")
    assert turn.dropped == 2 and len(turn.prompt_ids) + 8 <= 160
    assert turn.prompt_ids == chat.prompt_ids("fourth question", chat.history[2:])
    prompt = tokenizer.decode(turn.prompt_ids)
    assert prompt.startswith("<s>### system:\nBe brief.\n### user:\nsecond question\n")
    assert users() == ["first question", "second question", "third question"]  # changed when answered
    chat.answer(turn)
    assert users() == ["second question", "third question", "fourth question"] and chat.trimmed
    with pytest.raises(DataError, match=r"this message is 1\d\d tokens as prompted with the system turn, and its "
                                        r"answer may take 8 \(--max-new-tokens\): more than the model's context of "
                                        r"160 tokens; shorten the message or lower --max-new-tokens"):
        chat.fit("x" * 150)
    assert users() == ["second question", "third question", "fourth question"]
    chat.reply("fifth")
    assert users()[-1] == "fifth" and len(chat.history) <= 6
    chat.reset()
    assert chat.history == [] and not chat.trimmed


def test_the_command_streams_and_says_once_that_turns_were_dropped(tiny_model, tmp_path, monkeypatch, capsys):
    """`distft chat` on a Hugging Face folder with a small context: each answer is written after
    `model> ` as it comes (the answer the library returns), the first drop of turns is said once
    (not again at the next), a message too long is refused and the conversation goes on."""
    from distft.commands.chat import main
    from distft.data.templates import stop_token_ids
    from distft.evaluation.chat import Chat

    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    messages = ["first question", "second question", "third question", "fourth question", "x" * 150, "fifth one"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(m + "\n" for m in messages) + "/exit\n"))
    assert main([str(tmp_path / "model"), "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "a conversation: every turn is kept while it fits the model's context" in err
    assert "greedy answers, as the evaluation gives them" in err
    assert err.count("earlier turns dropped") == 1 and "context of 160 tokens, 8 of them kept for the answer" in err
    assert "distft: this message is" in err
    same = Chat(model, tokenizer, "chat", stop_token_ids(tokenizer), 8)
    expected = [same.reply(m) for m in messages if m != "x" * 150]
    assert out == "".join(f"model> {answer}" + ("  [cut at 8 tokens: --max-new-tokens]" if cut else "") + "\n"
                          for answer, cut in expected)
    assert same.trimmed


def test_the_command_names_the_seed_it_samples_with_and_repeats_with_it(tiny_model, tmp_path, monkeypatch, capsys):
    """--temperature without --seed picks a seed and names it; --seed with that number gives the
    same answers again."""
    import re

    from distft.commands.chat import main

    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    typed = "first question\nsecond question\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    assert main([str(tmp_path / "model"), "--temperature", "1.2", "--top-p", "0.9", "--max-new-tokens", "8"]) == 0
    first, err = capsys.readouterr()
    seed = re.search(r"answers sampled at temperature 1.2, top-p 0.9, seed (\d+) \(--seed \1 gives them again\)", err)
    assert seed, err
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    assert main([str(tmp_path / "model"), "--temperature", "1.2", "--top-p", "0.9", "--max-new-tokens", "8",
                 "--seed", seed.group(1)]) == 0
    again, _ = capsys.readouterr()
    assert again == first and first.count("model> ") == 2


def test_a_real_model_streams_its_answer_as_decoded(smollm2, smollm2_tokenizer):
    """SmolLM2 (byte-level BPE, ChatML): the streamed text is the greedy answer generate_outputs
    gives for the same prompt, written in several pieces, holding no special token nor the prompt;
    a character of two bytes (the é of "Café") comes whole, never as a replacement character."""
    import torch
    from transformers import AutoModelForCausalLM

    from distft.data.templates import stop_token_ids
    from distft.evaluation.chat import Chat
    from distft.evaluation.evaluate import generate_outputs

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    chat = Chat(model, smollm2_tokenizer, "chat", stop_token_ids(smollm2_tokenizer), 24)
    message = "Write the French word for coffee, then the euro sign."
    [(expected, _)] = generate_outputs(model, smollm2_tokenizer, [chat.prompt_ids(message)], 24, 1, "cpu",
                                       stop_ids=chat.stop_ids)
    out = Written()
    answer, _ = chat.reply(message, stream=out)
    assert answer == expected and out.getvalue() == answer and len(out.pieces) > 3 and "é" in answer
    assert "<|im" not in out.getvalue() and message not in out.getvalue() and "\ufffd" not in out.getvalue()
