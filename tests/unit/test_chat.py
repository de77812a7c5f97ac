"""`python -m distft.chat`: a person probing a model by hand, driven here with piped input
(issue 19, item 6). A held-out prompt typed into the chat must get the answer the run's own
evaluation recorded, for the tuned model, its base, its export, and prompt tuning.

The tests that start a process: tests/cli/test_chat.py."""

from __future__ import annotations

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
