"""Every command the docs show runs (issue 39, item 4): each `python -m distft...` or `distft ...`
line of README.md's fenced blocks (backslash continuations joined) and of every command's `--help`
(distft/commands COMMANDS, and `distft --help`), run as a user would paste it, cheaply:

- training commands with `--cfg job` appended, which runs the same checks as the run and refuses
  the same way (distft/commands/train.py main); a `-m` sweep, which Hydra does not print with
  `--cfg`, through `preflight()`, the checks its run starts with;
- planner commands as they are (a plan starts nothing);
- a command shown with its refusal (`$ ...` followed by the output) must give that output and its
  exit code (EXPECTED_CODE).

A command that cannot run here (a placeholder such as RUN or <hash>, a file of the user's own, the
output of an earlier step that trains for minutes) is listed in NOT_RUNNABLE with the reason; its
command's `--help` still runs. A documented command that is neither runnable nor listed fails the
test, and so does a listed one the docs no longer show, so nothing is skipped silently.

One process runs them all (this file, as a script: `main()` below), calling each command's
`main(argv)` as its entry point does, so torch, Hydra and the planner are imported once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
# `python -m distft`, `python -m distft.<command>` or the `distft` console script, then its arguments.
COMMAND = re.compile(r"(?:python -m distft(?:\.\S+)?|distft)(?:\s|$)")
# What a reader must replace before running: <angle brackets>, `...`, RUN, RUN_A, CHECKPOINT, DIR, NAME.
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\b(?:RUN\w*|CHECKPOINT|DIR|OVERRIDE|NAME|FILE)\b")

NOT_RUNNABLE = {
    # README.md
    "python -m distft +experiment=pretrained_lora model.name_or_path=~/models/mistral-7b.Q4_K_M.gguf data=jsonl "
    "data.path=train.jsonl":
        "the user's own GGUF file (~4 GB); composing the config converts it (tests/cli/test_pretrained.py converts a "
        "real one)",
    "python -m distft.plan +experiment=pretrained_lora model.name_or_path=... cluster=a100_80g_8x":
        "`...` stands for the user's model",
    "python -m distft ... launcher.wait=true": "`...` stands for the submission's overrides (the command above it)",
    "python -m distft.evaluate RUN": "RUN: a run directory of the user's",
    "python -m distft.compare RUN_A RUN_B": "RUN_A, RUN_B: run directories of the user's",
    "python -m distft.review RUN_OR_COMPARE_DIR": "RUN_OR_COMPARE_DIR: a run or compare directory of the user's",
    "python -m distft.chat RUN": "RUN: a run directory of the user's; chat reads the terminal",
    "python -m distft.export RUN --out merged": "RUN: a run directory of the user's",
    "python -m distft.export outputs/smollm2_lora/<hash> --out smol":
        "<hash>: the run directory of the SmolLM2 demo above it (minutes of training); tests/unit/test_gguf_export.py "
        "exports such a run",
    "python -m distft.export outputs/smollm2_lora/<hash> --out smol-gguf --format gguf --gguf-type q8_0":
        "<hash>: the run directory of the SmolLM2 demo above it; tests/unit/test_gguf_export.py runs this export",
    "python -m distft.compare outputs/short/<hash> outputs/tiny_lora/<hash> --out cmp":
        "<hash>: the run directories the two trainings above it write (minutes of training)",
    "python -m distft.review cmp": "cmp: what the compare above it writes; review serves a page until stopped",
    "python -m distft.chat outputs/tiny_lora/<hash>": "<hash>: the run directory of the training above it; chat "
                                                      "reads the terminal",
    # --help texts
    "python -m distft.export CHECKPOINT --out DIR": "CHECKPOINT, DIR: the usage in words (export's --help)",
    "python -m distft OVERRIDE ...": "OVERRIDE ...: the usage in words (data's and plan's --help)",
    "distft +experiment=NAME ...": "NAME ...: the usage in words (distft --help)",
    "distft train ...": "`...`: the usage in words (distft --help)",
    "python -m distft ...": "`...`: the usage in words (distft --help)",
    "python -m distft.<command> ...": "<command> ...: the usage in words (distft --help)",
}
# A command shown with its refusal: its exit code (README: 2 for a user error).
EXPECTED_CODE = {"python -m distft model=llama_8b train.lr=-1 train.global_batch_size=10": 2}
# Commands run as documented (cheap: they start nothing); the training commands get `--cfg job`.
RUN_AS_DOCUMENTED = ("plan",)
# Files the documented commands name as the user's data (data=jsonl data.path=...): a few Alpaca rows.
DATA_FILES = ("train.jsonl", "my.jsonl")


def normalize(line: str) -> str:
    """A command as its words, without a trailing `# comment`, one space apart."""
    return " ".join(shlex.split(line, comments=True))


def readme_commands() -> dict[str, list[str]]:
    """Every command of README.md's fenced blocks -> the output shown after it (`$ command`)."""
    with open(README) as f:
        text = f.read()
    found: dict[str, list[str]] = {}
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        shown: list[str] | None = None
        for line in block.replace("\\\n", " ").splitlines():
            stripped = line.strip()
            prompt = stripped.startswith("$ ")
            if prompt:
                stripped = stripped[2:]
            if COMMAND.match(stripped):
                shown = found.setdefault(normalize(stripped), [])
                shown = shown if prompt else None  # output lines follow a `$ ` command only
            elif shown is not None:
                shown.append(line)
    return found


def help_commands(text: str) -> list[str]:
    """The commands a --help text shows: its lines that are one (continuations joined), and
    commands quoted in `backticks` inside its sentences."""
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    found = [normalize(line) for line in lines if COMMAND.match(line)]
    found += [normalize(span) for span in re.findall(r"`([^`]*)`", text) if COMMAND.match(span.strip())]
    return list(dict.fromkeys(found))


# --- the worker: one process runs every command --------------------------------------------------


def _entry(words: list[str]):
    """(command name, a callable taking argv) for a documented command line, as its entry point
    dispatches it: distft/__main__.py calls commands.train.main, the `distft` script
    commands.main (both then leave through exit_now, which would end this process), and
    `python -m distft.<name>` runs that module as __main__."""
    from distft.commands import COMMANDS
    from distft.commands import main as console_main
    from distft.commands.train import main as train_main

    if words[:3] == ["python", "-m", "distft"]:
        return "train", train_main
    if words[:2] == ["python", "-m"] and words[2].startswith("distft."):
        module = words[2]

        def as_module(argv: list[str]):
            sys.argv = [module, *argv]
            runpy.run_module(module, run_name="__main__", alter_sys=True)

        return module.split(".", 1)[1], as_module
    rest = words[1:]
    name = rest[0] if rest and rest[0] in COMMANDS else "train"
    return name, console_main


def _args(words: list[str]) -> list[str]:
    return words[3:] if words[:2] == ["python", "-m"] else words[1:]


def _call(run, argv: list[str]) -> dict:
    """run(argv) in this process, as its process would: exit code, stdout, stderr, seconds."""
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run(argv) or 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            if done.code is not None and not isinstance(done.code, int):
                print(done.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - a traceback is what the user would see: exit 1
            traceback.print_exc()
            code = 1
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
            "seconds": round(time.monotonic() - started, 2), "argv": argv}


def run_documented(command: str, helps: dict[str, dict]) -> dict:
    """One documented command, run the cheap way its kind allows (the module docstring); `helps`:
    each command's --help result (`distft`: the console script's), for the listed ones."""
    from distft.commands import COMMANDS
    from distft.preflight import format_errors, preflight

    words = shlex.split(command, comments=True)
    name, run = _entry(words)
    argv = _args(words)
    if command in NOT_RUNNABLE:  # its command's help (`distft NAME --help` is `python -m distft.NAME --help`)
        return {**helps[name if name in COMMANDS else "distft"], "how": "--help only (listed in NOT_RUNNABLE)"}
    if name == "train":
        if {"-m", "--multirun"} & set(argv):  # Hydra refuses `--cfg` with -m: the run's own checks instead
            def check(argv: list[str]) -> int:
                _, errors = preflight(argv[1:] if argv[:1] == ["train"] else argv, command_line=True)
                if errors:
                    print(format_errors(errors), end="", file=sys.stderr)
                return 2 if errors else 0

            return {**_call(check, argv), "how": "preflight (a -m sweep)"}
        return {**_call(run, [*argv, "--cfg", "job"]), "how": "--cfg job"}
    if name in RUN_AS_DOCUMENTED:
        return {**_call(run, argv), "how": "as documented"}
    return {"code": None, "stdout": "", "stderr": f"{command}: no cheap way to run `{name}` here; run it, or list "
            "it in NOT_RUNNABLE with the reason", "seconds": 0, "argv": argv, "how": "not run"}


def main(result_path: str) -> None:
    """Collect every command's --help, then run every documented command; write the results."""
    from distft.commands import COMMANDS
    from distft.commands import main as console_main

    sys.stdin = io.StringIO("")
    helps = {"distft": _call(console_main, ["--help"])}
    helps.update({name: _call(console_main, [name, "--help"]) for name in COMMANDS})
    shown = {name: help_commands(result["stdout"]) for name, result in helps.items()}
    commands = list(dict.fromkeys([*readme_commands(), *(c for found in shown.values() for c in found)]))
    results = {command: run_documented(command, helps) for command in commands}
    with open(result_path, "w") as f:
        json.dump({"helps": helps, "shown": shown, "results": results}, f)


if __name__ == "__main__":
    main(sys.argv[1])


# --- the tests ------------------------------------------------------------------------------------

import pytest  # noqa: E402 - the worker above runs without pytest

README_COMMANDS = readme_commands()


@pytest.fixture(scope="module")
def documented(tmp_path_factory) -> dict:
    """Every documented command's result, from one process started in a fresh folder holding the
    data files the commands name (run directories and caches would go there too)."""
    work = tmp_path_factory.mktemp("documented")
    rows = [{"instruction": f"Reverse the word {w}.", "input": "", "output": w[::-1]} for w in ("river", "stone") * 10]
    for name in DATA_FILES:
        (work / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = work / "results.json"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(result)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and result.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(result.read_text())


def _problem(command: str, result: dict, shown: list[str] = ()) -> str | None:
    """Why a documented command's result is wrong, or None when it is what the docs promise."""
    expected = EXPECTED_CODE.get(command, 0)
    output = result["stdout"] + result["stderr"]
    if result["code"] != expected:
        return (f"{command}\n  ran as {result['how']} ({' '.join(result['argv'])}): exit {result['code']}, "
                f"documented {expected}\n{output[-3000:]}")
    missing = [line for line in shown if line.split("...")[0].rstrip() not in output]
    if missing:
        return f"{command}\n  the README shows {missing!r}; the command printed:\n{output[-3000:]}"
    return None


@pytest.mark.parametrize("command", list(README_COMMANDS))
def test_every_readme_command_runs(documented, command):
    """Each command of README.md's code blocks exits 0 (or with the code its shown refusal has, and
    prints the lines shown); a training command's --cfg job ran its checks (a refusal would be 2)."""
    result = documented["results"][command]
    problem = _problem(command, result, README_COMMANDS[command])
    assert problem is None, problem
    if command not in NOT_RUNNABLE and result["how"] == "--cfg job" and not EXPECTED_CODE.get(command):
        assert "\ntrain:\n" in "\n" + result["stdout"], result["stdout"][-2000:]  # the composed config, printed


@pytest.mark.parametrize("name", ["distft", "train", "data", "plan", "evaluate", "export", "compare", "chat",
                                  "review", "sweep", "pretrained", "synthetic"])
def test_every_command_in_each_help_text_runs(documented, name):
    """Each command a --help shows runs; the train and plan helps show examples that run."""
    assert documented["helps"][name]["code"] == 0, documented["helps"][name]
    shown = documented["shown"][name]
    problems = [p for p in (_problem(c, documented["results"][c]) for c in shown) if p]
    assert problems == [], "\n\n".join(problems)
    if name in ("train", "plan"):
        runnable = [c for c in shown if c not in NOT_RUNNABLE]
        assert len(runnable) >= 2 and all(documented["results"][c]["how"] != "not run" for c in runnable), shown


def test_every_command_shown_is_run_or_listed_with_a_reason(documented):
    """Nothing is skipped silently: each command with a placeholder is in NOT_RUNNABLE, each entry
    there is still shown somewhere (or it would hide the next command of that text), and the
    helps name every command of COMMANDS (the parametrization above covers them all)."""
    from distft.commands import COMMANDS

    assert set(documented["helps"]) == {"distft", *COMMANDS}
    shown = set(documented["results"])
    unlisted = sorted(c for c in shown if PLACEHOLDER.search(c) and c not in NOT_RUNNABLE)
    assert unlisted == [], "documented commands with a placeholder: run them or list them in NOT_RUNNABLE"
    assert sorted(set(NOT_RUNNABLE) - shown) == [], "NOT_RUNNABLE lists commands the docs no longer show"
    assert all(documented["results"][c]["code"] == 0 for c in NOT_RUNNABLE), "their command's --help must run"


def test_hydra_help_is_not_a_run_and_is_not_checked():
    """`python -m distft --hydra-help`: Hydra's own help, no config checks, exit 0, nothing on stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "distft", "--hydra-help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "" and "== Flags ==" in proc.stdout, proc.stderr[-2000:]
