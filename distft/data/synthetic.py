"""The embedded default dataset: short instruction tasks with exactly scorable answers.

The default job must run anywhere with no downloads and show, within a couple of CPU minutes,
that fine-tuning works: a tiny character-level model learns these tasks from scratch, and exact
match on held-out prompts rises from ~0 to well above chance. So every task is a per-character or
small arithmetic transformation with one correct short answer, and the rows are produced by code
from a seed (no data files in the repository, identical on every machine).

Rows are Alpaca-style dicts `{"instruction", "input", "output", "task"}`; run
`python -m distft.synthetic OUT.jsonl` (distft/commands/synthetic.py) to see them as a JSON Lines
file in the format users supply.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from typing import Optional

# A task's generator: rng -> (input, output).
_Maker = Callable[[random.Random], tuple[str, str]]


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 6)
    return word, word.upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 5)
    return word, word[::-1]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} + {b}", str(a + b)


def _repeat(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 5)
    return word, " ".join([word] * 3)


def _sort_letters(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 3, 5)
    return word, "".join(sorted(word))


def _count(rng: random.Random) -> tuple[str, str]:
    word = _word(rng, 2, 9)
    return word, str(len(word))


FIRST_NAMES = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Liam",
               "Maria", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Yusuf",
               "Zoe", "Amir", "Bianca", "Chen", "Dara", "Emil")
LAST_NAMES = ("Novak", "Schmidt", "Okafor", "Rossi", "Lindqvist", "Haddad", "Tanaka", "Moreau", "Kowalski", "Silva",
              "Nguyen", "Brennan", "Petrov", "Costa", "Jensen", "Moretti", "Yilmaz", "Fischer", "Duarte", "Hughes")
CITIES = ("Lisbon", "Oslo", "Vienna", "Porto", "Krakow", "Seville", "Bergen", "Ghent", "Turin", "Lyon", "Zagreb",
          "Tallinn", "Bruges", "Malaga", "Dresden", "Galway", "Utrecht", "Bologna", "Split", "Riga")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BOOKING_SENTENCES = (
    "{name} booked a table in {city} for {people} on {date}.",
    "Reservation: {name}, {people}, {city}, {date}.",
    "On {date}, {name} will dine in {city} with a party of {people}.",
    "Please hold a table for {people} in {city} on {date}, under the name {name}.",
    "{name} called to reserve dinner for {people} at our {city} restaurant, {date}.",
    "Table request from {name}: {city}, {date}, {people}.",
)


def _booking(rng: random.Random) -> tuple[str, str]:
    """A restaurant booking in one of several wordings -> its fields as one fixed JSON form: the
    name and city copied, the date normalised to "Month D", the party size as a number (written
    in the text as a digit, a word or "N guests"). The real-model demo's task: a pretrained
    model knows the words but not this form, so the untuned model's exact match is ~0."""
    name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
    city, month, day, people = rng.choice(CITIES), rng.choice(MONTHS), rng.randint(1, 28), rng.randint(1, 9)
    date = rng.choice((f"{month} {day}", f"{day} {month}", f"the {day}{_ordinal(day)} of {month}"))
    party = rng.choice((f"{people} people", f"{NUMBER_WORDS[people - 1]} people", f"{people} guests"))
    if people == 1:
        party = rng.choice(("1 person", "one person", "1 guest"))
    text = rng.choice(BOOKING_SENTENCES).format(name=name, city=city, date=date, people=party)
    text = text.replace("a party of 1 person", "a party of 1").replace("a party of one person", "a party of one")
    return text, json.dumps({"name": name, "city": city, "date": f"{month} {day}", "people": people})


def _ordinal(day: int) -> str:
    return "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


TASKS: dict[str, tuple[str, _Maker]] = {
    "uppercase": ("Uppercase the word.", _uppercase),
    "reverse": ("Reverse the word.", _reverse),
    "add": ("Add the numbers.", _add),
    "repeat": ("Repeat the word three times.", _repeat),
    "sort_letters": ("Sort the letters.", _sort_letters),
    "count": ("Count the letters.", _count),
    # Not among the default job's tasks: the real-model demo's (+experiment=smollm2_lora).
    "booking": ('Extract the booking as JSON with the keys "name", "city", "date" (Month D) and "people" (a '
                "number).", _booking),
}
DEFAULT_TASKS = ("uppercase", "reverse", "add", "repeat", "sort_letters", "count")


LEARNED = 0.5  # a task counts as learned at this held-out exact match


def what_it_shows(tasks: list[str], after: dict, before: Optional[dict], steps: int, params: int) -> str:
    """The report's opening paragraph for a run on these tasks: what the job is, what a learned
    model does, and which tasks this one learned (held-out exact match >= LEARNED)."""
    tasks = list(tasks) or list(DEFAULT_TASKS)
    per_task = after.get("per_task") or {}
    learned = [t for t in tasks if (per_task.get(t) or {}).get("exact_match", 0) >= LEARNED]
    rng = random.Random(0)
    examples = []
    for task in tasks[:3]:
        instruction, make = TASKS[task]
        value, answer = make(rng)
        examples.append(f"{instruction} `{value}` -> `{answer}`")
    base = (before or {}).get("exact_match")
    start = f" from {base:.2f}" if base is not None else ""
    untuned = "" if base is None else (" the untuned base answers none." if base == 0 else
                                       f" the untuned base answers {base:.0%} of them.")
    return (f"**What this job shows**: a {params / 1e6:.1f}M-parameter LLaMA fine-tuned for {steps} steps on "
            f"{len(tasks)} synthetic task{'s' if len(tasks) > 1 else ''} whose answers are exactly right or wrong "
            f"({'; '.join(examples)}; ...). A model that learned a task answers its held-out prompts exactly;"
            f"{untuned} This one learned {len(learned)} of {len(tasks)} "
            f"({', '.join(learned) if learned else 'none yet'}: held-out exact match >= {LEARNED}), and its overall "
            f"exact match went{start} to {after.get('exact_match') or 0:.2f}; the table per task below says which.")


def generate(num_examples: int, seed: int, tasks: Optional[list[str]] = None) -> list[dict]:
    """`num_examples` distinct rows, tasks interleaved round-robin, identical for the same seed.

    Rows are distinct so that cleaning (which drops duplicates) keeps every one of them and the
    held-out split never contains a prompt that is also in the training split.
    """
    tasks = list(DEFAULT_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown synthetic task(s) {unknown or tasks}; allowed: {', '.join(TASKS)}")
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    exhausted: set[str] = set()
    i = 0
    while len(rows) < num_examples:
        task = tasks[i % len(tasks)]
        i += 1
        if task in exhausted:
            if len(exhausted) == len(set(tasks)):
                raise ValueError(f"tasks {tasks} cannot produce {num_examples} distinct examples")
            continue
        instruction, make = TASKS[task]
        for _ in range(100):  # a few retries on a collision; give up on a task once it runs dry
            value, answer = make(rng)
            if (task, value) not in seen:
                seen.add((task, value))
                rows.append({"instruction": instruction, "input": value, "output": answer, "task": task})
                break
        else:
            exhausted.add(task)
    return rows
