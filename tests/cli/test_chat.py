"""`python -m distft.chat` run as the person runs it, with piped input (issue 19, item 6): a held-out
prompt typed into the chat gets the answer the run's own evaluation recorded, for the tuned model,
its base, its export, and prompt tuning (their answers now streamed: the line is the same); a bad
--temperature, --top-p or --max-new-tokens is one line and exit 2 (issue 39, item 3).

The in-process tests: tests/unit/test_chat.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.unit import test_chat as unit

runs = unit.runs  # tests/unit/test_chat.py's module-scoped fixture, set up again for this module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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



@pytest.mark.parametrize(("flags", "problem"), [
    (["--temperature", "-0.5"], "argument --temperature: must be a number >= 0 (0: greedy), not '-0.5'"),
    (["--top-p", "0"], "argument --top-p: must be a number above 0 and at most 1 (1: every token), not '0'"),
    (["--top-p", "1.5"], "argument --top-p: must be a number above 0 and at most 1 (1: every token), not '1.5'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a whole number above 0, not '0'"),
    (["--seed", "-1"], "argument --seed: must be a whole number from 0 to 2**63 - 1, not '-1'"),
])
def test_a_bad_flag_value_is_one_message_and_exit_2(flags, problem, tmp_path):
    """Refused before anything loads (the model path is not even looked at): the usage, then the
    one line naming the flag, what it must be and what was given."""
    proc = chat(str(tmp_path / "no-such-run"), *flags, typed="")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == f"python -m distft.chat: error: {problem}"
