"""One UserError base, one mapping from exceptions to exit codes, thin commands (issue 37 §3), in
process: every exception a user can cause is a UserError defined in distft/errors.py; `exit_code`
gives each kind the code launchers/local.py ORDERLY_EXITS and the documentation name; the
commands' shared `run_command` turns a UserError from the library into one line and exit 2; and
argument parsing, `main` and `__main__` blocks live in distft/commands/ only. The processes
(the console script, `python -m`) are tests/cli/test_commands.py's."""

from __future__ import annotations

import ast
import inspect
import os

import pytest

from distft import errors
from distft.commands import COMMANDS, run_command
from distft.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_STOPPED,
    EXIT_USER_ERROR,
    CheckpointError,
    DataError,
    ModelLoadError,
    NonFiniteError,
    OutputError,
    PlanInputError,
    Preempted,
    ReviewError,
    RunInUse,
    SaveInterrupted,
    SegmentTooShort,
    SubmissionError,
    TemplateError,
    UnsafePathError,
    UserError,
    exit_code,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Raised by distft but not caused by its user's input: a run that went wrong, a stop, Ctrl-C.
NOT_USER_ERRORS = {NonFiniteError, Preempted, SaveInterrupted}
# Where a parser, a main or a __main__ block may be: the commands, and the packages' entry points.
ENTRY_POINTS = {"distft/__main__.py", "distft/data/__main__.py", "distft/plan/__main__.py"}


def test_every_exception_a_user_can_cause_is_a_user_error():
    defined = {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, BaseException) and obj.__module__ == errors.__name__}
    assert {UserError, DataError, CheckpointError, OutputError, ModelLoadError, TemplateError, RunInUse,
            UnsafePathError, PlanInputError, ReviewError, SubmissionError, SegmentTooShort} | NOT_USER_ERRORS == defined
    for cls in defined - NOT_USER_ERRORS:
        assert issubclass(cls, UserError), cls
    for cls in NOT_USER_ERRORS:
        assert not issubclass(cls, UserError), cls
    assert issubclass(PlanInputError, ValueError)  # as it was in distft/plan/architecture.py


def test_the_moved_exceptions_are_the_same_classes_where_they_are_raised():
    from distft import preemption
    from distft.evaluation import review
    from distft.launchers import slurm
    from distft.plan import architecture

    assert architecture.PlanInputError is PlanInputError and review.ReviewError is ReviewError
    assert slurm.SubmissionError is SubmissionError and preemption.Preempted is Preempted
    assert (preemption.EXIT_STOPPED, preemption.EXIT_INTERRUPTED) == (4, 130)
    for module, name in ((architecture, "PlanInputError"), (review, "ReviewError"), (slurm, "SubmissionError"),
                         (preemption, "Preempted")):
        assert not any(isinstance(node, ast.ClassDef) and node.name == name
                       for node in ast.walk(ast.parse(inspect.getsource(module))))


@pytest.mark.parametrize("exc, code", [
    (DataError("x"), 2), (CheckpointError("x"), 2), (OutputError("x"), 2), (UnsafePathError("x"), 2),
    (ModelLoadError("x"), 2), (TemplateError("x"), 2), (RunInUse("x"), 2), (PlanInputError("x"), 2),
    (ReviewError("x"), 2), (SubmissionError("x"), 2), (SegmentTooShort("x"), 2), (UserError("x"), 2),
    (NonFiniteError("x"), 3),
    (Preempted("x", requeued=False), 4), (Preempted("x", requeued=True), 0),
    (Preempted("x", requeued=False, interrupted=True), 130),
    (KeyboardInterrupt(), 130), (SaveInterrupted("x"), 130),
    (SystemExit(), 0), (SystemExit(0), 0), (SystemExit(2), 2), (SystemExit("a message"), 1),
    (RuntimeError("a bug"), 1), (ValueError("a bug"), 1), (OSError("a bug"), 1),
])
def test_exit_code_maps_each_kind_as_documented(exc, code):
    assert exit_code(exc) == code
    assert (EXIT_FAILED, EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_STOPPED, EXIT_INTERRUPTED) == (1, 2, 3, 4, 130)


def test_the_orderly_exit_codes_are_the_ones_the_local_launcher_reads():
    from distft.launchers.local import ORDERLY_EXITS

    assert set(ORDERLY_EXITS) == {0, EXIT_USER_ERROR, EXIT_NONFINITE, EXIT_STOPPED, EXIT_INTERRUPTED}


def test_run_command_prints_a_user_error_as_one_line_and_returns_2(capsys):
    def library(argv):
        raise CheckpointError(f"{argv[0]} does not exist; pass a run directory")

    assert run_command(library, ["runs/x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "distft: runs/x does not exist; pass a run directory\n"
    assert run_command(library, ["y"], prefix="distft.plan") == 2
    assert capsys.readouterr().err == "distft.plan: y does not exist; pass a run directory\n"

    def stopped(argv):
        raise NonFiniteError("step 3: the loss is nan")

    assert run_command(stopped, []) == 3 and capsys.readouterr().err == "distft: step 3: the loss is nan\n"
    assert run_command(lambda argv: None, []) == 0 and run_command(lambda argv: 5, []) == 5


def test_run_command_leaves_bugs_usage_errors_and_ctrl_c_alone():
    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(bug, [])
    with pytest.raises(SystemExit):
        run_command(lambda argv: (_ for _ in ()).throw(SystemExit(2)), [])
    with pytest.raises(KeyboardInterrupt):
        run_command(lambda argv: (_ for _ in ()).throw(KeyboardInterrupt()), [])


def test_a_command_reports_a_user_error_from_the_library(monkeypatch, capsys):
    """A real command, its library call raising: `distft export` of a checkpoint that cannot be
    used is the one line, exit 2, no traceback."""
    import distft.checkpoint.export as library
    from distft.commands import export

    def refuse(checkpoint, out, **kwargs):
        raise CheckpointError(f"{checkpoint} has no committed checkpoint")

    monkeypatch.setattr(library, "export", refuse)
    assert export.main(["runs/x", "--out", "elsewhere"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "distft: runs/x has no committed checkpoint\n" and captured.out == ""


def test_export_command_offers_the_library_dtypes():
    from distft.checkpoint.export import DTYPES
    from distft.commands.export import DTYPE_CHOICES

    assert list(DTYPE_CHOICES) == sorted(DTYPES)


def test_every_command_module_has_a_main():
    import importlib

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def _library_modules():
    for directory, _, files in os.walk(os.path.join(REPO, "distft")):
        for name in files:
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, REPO)
            if name.endswith(".py") and not relative.startswith(os.path.join("distft", "commands") + os.sep):
                yield relative, path


def test_only_the_commands_parse_arguments_or_have_a_main():
    """No module under distft/ outside distft/commands/ defines `main`, has an
    `if __name__ == "__main__":` block or builds an argparse parser (distft/engines/deepspeed.py's
    `argparse.Namespace`, handed to DeepSpeed's converter, parses nothing), except the packages'
    `__main__` modules, which call a command."""
    found = []
    for relative, path in _library_modules():
        if relative in ENTRY_POINTS:
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
                found.append(f"{relative}:{node.lineno}: def main(")
            elif isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
                    and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__":
                found.append(f"{relative}:{node.lineno}: if __name__ == ...")
            elif (isinstance(node, ast.Attribute) and node.attr in ("ArgumentParser", "parse_args")) or \
                    (isinstance(node, ast.Name) and node.id == "ArgumentParser") or \
                    (isinstance(node, ast.ImportFrom) and node.module == "argparse"):
                found.append(f"{relative}:{node.lineno}: argparse parser")
            elif isinstance(node, ast.Attribute) and node.attr == "argv" and isinstance(node.value, ast.Name) \
                    and node.value.id == "sys":
                found.append(f"{relative}:{node.lineno}: sys.argv")
    assert found == []


def test_the_package_entry_points_only_call_a_command():
    for relative in ENTRY_POINTS:
        with open(os.path.join(REPO, relative)) as f:
            source = f.read()
        assert "from distft.commands." in source and "argparse" not in source, relative
