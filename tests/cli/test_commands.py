"""The command line as a user starts it (issue 37 §3): the installed `distft` console script and
the `python -m distft.<command>` forms, as processes. `distft --help` names every command of
COMMANDS; each command's `--help` is the same text by either form (the `prog` of each stays
`python -m distft.<command>`); overrides without a command are the train command; an unknown
command is refused by name. The in-process checks of the same edge are tests/unit/test_errors.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from distft.commands import COMMANDS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
# The library imports torch; a command's --help must not (instant on a login node).
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed")


def console_script() -> str:
    """The `distft` script installed beside this interpreter (pip install -e . writes it)."""
    here = os.path.join(os.path.dirname(sys.executable), "distft")
    found = here if os.path.exists(here) else shutil.which("distft")
    if found is None:
        pytest.fail("no `distft` console script beside sys.executable nor on PATH: pip install -e . installs it")
    return found


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=REPO, env=ENV, timeout=timeout)


def test_distft_help_lists_every_command():
    proc = run(console_script(), "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()]
    assert listed[:len(COMMANDS)] == list(COMMANDS), proc.stdout


@pytest.mark.parametrize("command", [name for name in COMMANDS if name != "train"])
def test_each_command_help_is_the_same_by_either_form_and_imports_no_torch(command):
    script = run(console_script(), command, "--help")
    module = run(sys.executable, "-m", f"distft.{command}", "--help")
    assert script.returncode == 0 and module.returncode == 0, script.stderr[-2000:] + module.stderr[-2000:]
    assert script.stdout == module.stdout and script.stdout.startswith(f"usage: python -m distft.{command} ")
    assert script.stderr == module.stderr == ""
    for start in (f"from distft.commands import main\nmain(['{command}', '--help'])",  # distft CMD --help
                  f"import runpy, sys\nsys.argv = ['-m', '--help']\n"  # python -m distft.CMD --help
                  f"runpy.run_module('distft.{command}', run_name='__main__', alter_sys=True)"):
        probe = (f"import sys\ntry:\n    exec({start!r})\nexcept SystemExit:\n    pass\n"
                 f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n")
        heavy = run(sys.executable, "-c", probe)
        assert "HEAVY []" in heavy.stderr, (start, heavy.stderr[-2000:])


def test_the_train_command_help_by_either_form():
    script = run(console_script(), "train", "--help")
    module = run(sys.executable, "-m", "distft", "--help")
    assert script.returncode == module.returncode == 0, script.stderr[-2000:] + module.stderr[-2000:]
    assert script.stdout == module.stdout and "+experiment" in script.stdout


def test_overrides_without_a_command_are_the_train_command():
    """`distft +experiment=tiny_full --cfg job` is `python -m distft +experiment=tiny_full --cfg
    job`: Hydra prints the composed job config, nothing runs."""
    proc = run(console_script(), "+experiment=tiny_full", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    same = run(sys.executable, "-m", "distft", "+experiment=tiny_full", "--cfg", "job")
    assert proc.stdout == same.stdout and proc.stdout.startswith("model:\n"), proc.stdout[:500]
    assert "technique:\n  name: full" in proc.stdout


def test_an_unknown_command_exits_2_naming_it():
    proc = run(console_script(), "nosuch")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[0] == "distft: unknown command 'nosuch'"
    assert "commands:" in proc.stderr


def test_a_user_error_is_one_line_and_exit_2_by_either_form(tmp_path):
    """The shared mapping at work in a real process: a checkpoint that does not exist is one line
    `distft: ...` and exit 2 (no traceback), from the console script and from `python -m`."""
    missing = str(tmp_path / "no_such_run")
    for proc in (run(console_script(), "chat", missing), run(sys.executable, "-m", "distft.chat", missing)):
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            f"distft: {missing} does not exist; pass a run directory, a checkpoint or an export"], proc.stderr
