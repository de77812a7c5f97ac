"""The embedded dataset: deterministic, distinct rows, and every answer is right."""

from __future__ import annotations

import json

import pytest

from distft.commands.synthetic import main
from distft.data.synthetic import DEFAULT_TASKS, TASKS, generate


def _answer(task: str, value: str) -> str:
    """The answer recomputed independently of synthetic.py."""
    if task == "uppercase":
        return value.upper()
    if task == "reverse":
        return value[::-1]
    if task == "add":
        a, b = value.split(" + ")
        return str(int(a) + int(b))
    if task == "repeat":
        return f"{value} {value} {value}"
    if task == "sort_letters":
        return "".join(sorted(value))
    if task == "count":
        return str(len(value))
    raise AssertionError(task)


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate(120, seed=7) == generate(120, seed=7)
    assert generate(120, seed=7) != generate(120, seed=8)


def test_every_answer_is_correct_and_inputs_in_range():
    rows = generate(600, seed=3)
    assert len(rows) == 600
    assert {r["task"] for r in rows} == set(DEFAULT_TASKS)  # the default job's; "booking" is the real-model demo's
    assert len({(r["task"], r["input"]) for r in rows}) == 600  # distinct
    for row in rows:
        assert set(row) == {"instruction", "input", "output", "task"}
        assert row["output"] == _answer(row["task"], row["input"]), row
        assert row["instruction"] == TASKS[row["task"]][0] and len(row["instruction"]) < 40
        if row["task"] == "add":
            assert all(0 <= int(x) <= 99 for x in row["input"].split(" + "))
        elif row["task"] == "uppercase":
            assert 3 <= len(row["input"]) <= 6 and row["input"].islower()
        elif row["task"] in ("reverse", "sort_letters"):
            assert 3 <= len(row["input"]) <= 5 and row["input"].isalpha()


def test_task_subset_round_robin_and_unknown_task():
    rows = generate(10, seed=0, tasks=["add", "count"])
    assert [r["task"] for r in rows] == ["add", "count"] * 5
    with pytest.raises(ValueError, match="allowed: uppercase, reverse, add, repeat, sort_letters, count"):
        generate(10, seed=0, tasks=["add", "multiply"])


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "syn.jsonl"
    assert main([str(out), "--num", "12", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == generate(12, seed=5)


def test_the_report_opens_with_what_the_job_shows():
    """Issue 20: the default job's report says first what the job is, what a learned model does,
    and which tasks this run learned (held-out exact match >= 0.5)."""
    from distft.data.synthetic import DEFAULT_TASKS, what_it_shows

    after = {"exact_match": 0.55, "per_task": {"count": {"exact_match": 1.0}, "reverse": {"exact_match": 0.5},
                                               "add": {"exact_match": 0.49}}}
    text = what_it_shows([], after, {"exact_match": 0.0}, 700, 2_500_000)
    assert text.startswith("**What this job shows**: a 2.5M-parameter LLaMA fine-tuned for 700 steps on 6 synthetic "
                           "tasks whose answers are exactly right or wrong (Uppercase the word. `")
    assert "the untuned base answers none. This one learned 2 of 6 (reverse, count: held-out exact match >= 0.5)" in text
    assert "overall exact match went from 0.00 to 0.55" in text
    assert len(DEFAULT_TASKS) == 6
    only = what_it_shows(["add", "count"], after, None, 10, 10**6)
    assert "on 2 synthetic tasks" in only and "learned 1 of 2 (count:" in only and "untuned" not in only


def test_booking_rows_hold_the_fields_of_their_sentence():
    """The real-model demo's task (+experiment=smollm2_lora): every answer is the one JSON form of
    its sentence: name and city copied, the date as "Month D", the party size as a number."""
    import json
    import re

    from distft.data.synthetic import MONTHS, NUMBER_WORDS

    rows = generate(300, seed=5, tasks=["booking"])
    assert len({r["input"] for r in rows}) == 300
    wordings = set()
    for row in rows:
        fields = json.loads(row["output"])
        assert list(fields) == ["name", "city", "date", "people"]
        assert row["output"] == json.dumps(fields)  # one spelling of the form
        text = row["input"]
        assert fields["name"] in text and fields["city"] in text
        month, day = fields["date"].split(" ")
        assert month in MONTHS and re.search(rf"\b{day}(st|nd|rd|th)? (of )?{month}\b|\b{month} {day}\b", text), row
        people = fields["people"]
        assert re.search(rf"\b({people}|{NUMBER_WORDS[people - 1]}) (people|guests?|person)\b|party of ({people}|"
                         rf"{NUMBER_WORDS[people - 1]})\b", text), row
        wordings.add(re.sub(r"[A-Z][a-z]+ [A-Z][a-z]+", "NAME", text)[:12])
    assert len(wordings) >= 6
