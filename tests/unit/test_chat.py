"""`python -m distft.chat`: a person probing a model by hand, driven here with piped input
(issue 19, item 6). A held-out prompt typed into the chat must get the answer the run's own
evaluation recorded, for the tuned model, its base, its export, and prompt tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.unit.test_train import compose

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from distft.train import train

    root = tmp_path_factory.mktemp("runs")
    common = [f"run.root={root}", "eval.num_samples=4", "eval.max_new_tokens=8", "tracking.progress_bar=false",
              "tracking.wandb.mode=disabled"]
    return {technique: train(compose(f"+experiment=tiny_{technique}", "train.max_steps=4", "train.lr=3e-3", *common))
            for technique in ("lora", "prompt")}


def held_out(run: dict) -> list[dict]:
    """The run's recorded predictions: (message typed for it, base answer, tuned answer)."""
    with open(os.path.join(run["run_dir"], "eval_report.predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # The plain template renders `instruction\ninput\n`: typed as two lines, the first continued.
    return [{"typed": r["prompt"].rstrip("\n").replace("\n", "\\\n"), **r["outputs"]} for r in records]


def chat(*args: str, typed: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.chat", *args], input=typed, capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def replies(proc) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return [line.removeprefix("model> ").split("  [cut at ")[0] for line in proc.stdout.splitlines()
            if line.startswith("model> ")]


@pytest.mark.parametrize("technique", ["lora", "prompt"])
def test_typed_held_out_prompts_get_the_evaluations_answers(runs, technique):
    rows = held_out(runs[technique])
    typed = "".join(r["typed"] + "\n" for r in rows) + "/exit\nnever read\n"
    proc = chat(runs[technique]["run_dir"], typed=typed)
    assert replies(proc) == [r["tuned"]["text"] for r in rows]
    assert "single instructions (template plain)" in proc.stderr
    cut = [r["tuned"]["truncated"] for r in rows]
    assert [("[cut at 8 tokens" in line) for line in proc.stdout.splitlines()] == cut
    if technique == "lora":
        base = chat(runs[technique]["run_dir"], "--base", typed=typed)
        assert replies(base) == [r["base"]["text"] for r in rows]
        assert replies(base) != replies(proc)


def test_an_export_chats_as_its_run(runs, tmp_path):
    from distft.checkpoint.export import export

    rows = held_out(runs["lora"])
    out = export(runs["lora"]["run_dir"], str(tmp_path / "merged"))
    fmt = json.load(open(os.path.join(out, "prompt_format.json")))
    assert fmt["template"] == "plain" and fmt["stop_token_ids"]
    proc = chat(out, "--max-new-tokens", "8", typed="".join(r["typed"] + "\n" for r in rows))
    assert replies(proc) == [r["tuned"]["text"] for r in rows]
    refused = chat(out, "--base", typed="")
    assert refused.returncode == 2 and "merged export, which holds no separate base" in refused.stderr


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
