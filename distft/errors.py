"""Exceptions a user can cause, with messages that say what is wrong and how to fix it.

Callers catch these to print one line instead of a traceback; bugs still raise their own types.
"""

from __future__ import annotations


class DataError(Exception):
    """A problem with the user's data or data config; the message says what and how to fix it."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used or written; the message says why and what to do instead."""
