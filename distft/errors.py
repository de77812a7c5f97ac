"""Exceptions a user can cause, with messages that say what is wrong and how to fix it.

Callers catch these to print one line instead of a traceback; bugs still raise their own types.
"""

from __future__ import annotations


class DataError(Exception):
    """A problem with the user's data or data config; the message says what and how to fix it."""


class CheckpointError(Exception):
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


class ModelLoadError(Exception):
    """A model or tokenizer that cannot be loaded from `model.name_or_path` / `model.tokenizer`."""


class NonFiniteError(Exception):
    """A non-finite step under `train.nonfinite=halt` (or too many skipped), or weights left
    non-finite: the message names the step, the ranks and what was (not) saved. The run went
    wrong, not its input: the command line exits 3."""


class TemplateError(Exception):
    """The tokenizer or template cannot render rows at all; data.py turns it into a DataError."""


class RunInUse(Exception):
    """The run directory is held by another live run (distft/runlock.py); the message names the
    holder (pid and host, SLURM job) and what to do."""


class UnsafePathError(OutputError):
    """A write refused because its path under a run directory, cache or review folder holds a
    symbolic link, a named pipe or a device where distft writes a file or a directory (planted by
    whoever could write there): nothing is written through it. The message names the path and
    what to do (remove it, or use another directory)."""
