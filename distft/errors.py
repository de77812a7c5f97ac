"""Exceptions a user can cause, with messages that say what is wrong and how to fix it, and the
one mapping from an exception to the exit status of a command (`exit_code`).

Decided (issue 37): every exception a user can cause (a bad config, data, path or checkpoint, a
run directory in use, a model that does not load, planner input, a review file, a submission)
subclasses `UserError` and is defined here, so a command reports all of them alike: one line
`distft: <message>`, no traceback, exit 2 (distft/commands/__init__.py `run_command`); modules
import them from here. Bugs still raise their own types (exit 1, with the traceback). Exceptions
that never leave the module that raises them stay there (data.templates.RejectedConversation,
checkpoint.safe_load.UnsafePickleError, evaluation.evaluate.EvalInterrupted, files.NotAFile,
evaluation.sweep.PointFailed, a Hydra exception).

The exit codes (`exit_code`), which launchers/local.py ORDERLY_EXITS reads from every rank:

    0    success, or Preempted with the job requeued
    2    UserError (EXIT_USER_ERROR): nothing was wrong with the code, the input was
    3    NonFiniteError (EXIT_NONFINITE): the run itself went wrong (a non-finite loss)
    4    Preempted by the stop signal, checkpoint saved, not requeued (EXIT_STOPPED): rerun to resume
    130  KeyboardInterrupt (SaveInterrupted too), Preempted by Ctrl-C (EXIT_INTERRUPTED)
    1    anything else: a bug (SystemExit: its own code)
"""

from __future__ import annotations

EXIT_FAILED = 1  # a bug: the traceback says where
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_STOPPED = 4  # stopped by the signal, checkpoint saved, not requeued: rerun to resume
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as shells report it: checkpoint saved when training had started


class UserError(Exception):
    """Something the user can fix (config, data, paths, checkpoints, ...): the message says what
    and how. Commands print it as one line and exit 2 (`exit_code`)."""



class DataError(UserError):
    """A problem with the user's data or data config; the message says what and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used or written; the message says why and what to do instead."""


class OutputError(CheckpointError):
    """A file of the run (metrics, report, plot, summary, an export) could not be written: a full
    disk or quota, a read-only or vanished directory. The message names the file, the cause and
    what to do. A CheckpointError, so every command that reports those in one line (the training
    command, evaluate, export: exit 2) reports this one alike."""


class SaveInterrupted(KeyboardInterrupt):
    """Ctrl-C while a checkpoint was being written: still an interrupt (the command line exits
    130, as for any Ctrl-C), whose message says which step was not committed and that earlier
    checkpoints are untouched."""


class ModelLoadError(UserError):
    """A model or tokenizer that cannot be loaded from `model.name_or_path` / `model.tokenizer`."""


class NonFiniteError(Exception):
    """A non-finite step under `train.nonfinite=halt` (or too many skipped), or weights left
    non-finite: the message names the step, the ranks and what was (not) saved. The run went
    wrong, not its input: the command line exits 3."""


class TemplateError(UserError):
    """The tokenizer or template cannot render rows at all; data.py turns it into a DataError."""


class RunInUse(UserError):
    """The run directory is held by another live run (distft/runlock.py); the message names the
    holder (pid and host, SLURM job) and what to do."""


class UnsafePathError(OutputError):
    """A write refused because its path under a run directory, cache or review folder holds a
    symbolic link, a named pipe or a device where distft writes a file or a directory (planted by
    whoever could write there): nothing is written through it. The message names the path and
    what to do (remove it, or use another directory)."""



class PlanInputError(UserError, ValueError):
    """Something the plan reads besides the config is unusable (a model's config.json). A
    ValueError too, as it was before it moved here from distft/plan/architecture.py."""


class ReviewError(UserError):
    """A directory without predictions, a damaged or unsafe predictions or ratings file, a request
    the review page cannot answer (an unknown model, a pair already rated): distft/evaluation/review.py."""


class SubmissionError(UserError):
    """A SLURM job that cannot be submitted as configured; the message names the setting and the
    fix (launchers/slurm.py)."""


class SegmentTooShort(UserError):
    """A SLURM job segment the time limit's stop signal ended before it made any progress (no
    step trained, no prompt of the final evaluation answered): not requeued, since the next
    segment would stop the same way; the message names the cause and the setting to change
    (distft/preemption.py)."""


class Preempted(Exception):
    """Raised out of the training loop after the stop checkpoint (distft/preemption.py); `requeued`
    says whether SLURM will run the job again, `interrupted` that Ctrl-C stopped it (exit 130).
    Not a user error: the run stopped as asked, and says how to resume."""

    def __init__(self, message: str, requeued: bool, interrupted: bool = False):
        super().__init__(message)
        self.requeued = requeued
        self.interrupted = interrupted

    @property
    def exit_code(self) -> int:
        return 0 if self.requeued else EXIT_INTERRUPTED if self.interrupted else EXIT_STOPPED


def exit_code(exc: BaseException) -> int:
    """The exit status a command ends with when `exc` ends it (the table in the module docstring)."""
    if isinstance(exc, SystemExit):
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else EXIT_FAILED
    if isinstance(exc, Preempted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, NonFiniteError):
        return EXIT_NONFINITE
    if isinstance(exc, UserError):
        return EXIT_USER_ERROR
    return EXIT_FAILED
