"""Writing a file so that a reader, or a run started after a crash, sees the old content or the
new one, never half of it: a temporary file beside it, flushed to disk, then renamed over it.

The one writer of the small files a run keeps (summary.json, a checkpoint's manifest and
trainer state, `latest`, reports, the tracker's id and metrics after a resume). Large payloads
(weights, optimizer shards) are written by their libraries and made durable by the checkpoint's
own commit (distft.checkpoint)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text(path: str, text: str) -> None:
    """`text` into `path`, atomically and durably (temporary file, fsync, rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, data: Any) -> None:
    """`data` as indented JSON (values JSON cannot hold written as their str), atomically."""
    write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def fsync_dir(path: str) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
