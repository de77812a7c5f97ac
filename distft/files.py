"""Writing a file so that a reader, or a run started after a crash, sees the old content or the
new one, never half of it: a temporary file beside it, flushed to disk, then renamed over it.

The one writer of the small files a run keeps (summary.json, a checkpoint's manifest and
trainer state, `latest`, reports, the tracker's id and metrics after a resume). Large payloads
(weights, optimizer shards) are written by their libraries and made durable by the checkpoint's
own commit (distft.checkpoint).

Also what a failed write says (`output_error`): the file, the cause and, for a full disk or quota
(ENOSPC, EDQUOT, and EFBIG: a file-size limit), to free space and rerun the same command, which
resumes from the last checkpoint. Every writer here raises it (an OutputError: one line and exit 2
on the command line, not a traceback) and leaves no partial file behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from typing import Any

from distft.errors import OutputError

# Errors that mean "no room for these bytes". Libraries that write through their own I/O layer
# (safetensors, in Rust) report them as text, so the strerror strings are matched too.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = tuple(os.strerror(code) for code in DISK_FULL_ERRNOS) + ("StorageFull", "FileTooLarge")

DISK_FULL_ADVICE = ("the disk (or quota) holding it is full: free space there, or point run.root at another disk, "
                    "then rerun the same command: it resumes from the last checkpoint, nothing saved was lost")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or what it was raised from) says the disk, a quota or a file-size limit is full."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _DISK_FULL_TEXT):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def describe(err: BaseException, skip_path: str = "") -> str:
    """One line for an error: its type and first line; for an OSError its errno's name and the
    file (unless it is `skip_path`, which the message names already)."""
    text = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, OSError) and err.errno:
        name = errno.errorcode.get(err.errno, str(err.errno))
        text = f"{err.strerror or os.strerror(err.errno)} ({name})"
        if err.filename and err.filename != skip_path:
            text += f": {err.filename}"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def output_error(path: str, err: BaseException, what: str = "", advice: str = DISK_FULL_ADVICE) -> OutputError:
    """The one message for `path` that could not be written because of `err`: names the file
    (and `what` it is), the cause, and for a full disk `advice`."""
    message = f"cannot write {what + ' ' if what else ''}{path}: {describe(err, skip_path=getattr(err, 'filename', None) or '')}"
    if is_disk_full(err):
        message += f"; {advice}"
    return OutputError(message)


@contextlib.contextmanager
def writing(path: str, what: str = "", advice: str = DISK_FULL_ADVICE) -> Iterator[None]:
    """Turn an OSError of the block, which writes `path`, into `output_error`'s one message."""
    try:
        yield
    except OSError as err:
        raise output_error(path, err, what, advice) from err


def write_text(path: str, text: str, what: str = "") -> None:
    """`text` into `path`, atomically and durably (temporary file, fsync, rename). A failure
    removes the temporary file and raises `output_error`'s OutputError (`what`: the file's name
    for people, e.g. "the evaluation report")."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(err, OSError):
            raise output_error(path, err, what) from err
        raise


def write_json(path: str, data: Any, what: str = "") -> None:
    """`data` as indented JSON (values JSON cannot hold written as their str), atomically."""
    write_text(path, json.dumps(data, indent=1, default=str) + "\n", what)


def fsync_dir(path: str) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
