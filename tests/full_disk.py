"""A real full disk for the tests of failed writes: a forked child whose files may grow to a
limit (RLIMIT_FSIZE with SIGXFSZ ignored, as Python does): a short write, then EFBIG, as a full
disk gives (ENOSPC: /dev/full). The child's result comes back through a pipe."""

from __future__ import annotations

import json
import os
import resource
import signal
from collections.abc import Callable
from typing import Optional


def in_child_with_file_limit(limit: Optional[int], work: Callable[[], dict]) -> dict:
    """`work()`'s dict, computed in a forked child (so that the limit stays the child's) whose
    files may grow to `limit` bytes (None: no limit)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            result = work()
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(result))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)
