"""Writing a file so that a reader, or a run started after a crash, sees the old content or the
new one, never half of it: a temporary file beside it, flushed to disk, then renamed over it.

The one writer of the small files a run keeps (summary.json, a checkpoint's manifest and
trainer state, `latest`, reports, the tracker's id and metrics after a resume). Large payloads
(weights, optimizer shards) are written by their libraries and made durable by the checkpoint's
own commit (distft.checkpoint.store).

Also what a failed write says (`output_error`): the file, the cause and, for a full disk or quota
(ENOSPC, EDQUOT, and EFBIG: a file-size limit), to free space and rerun the same command, which
resumes from the last checkpoint. Every writer here raises it (an OutputError: one line and exit 2
on the command line, not a traceback) and leaves no partial file behind.

Untrusted directories (the README's threat model: whoever can write a run directory, a data
cache or a review folder may have planted links and pipes in it). Every writer here takes the
directory the file belongs to (`root`, trusted: the user named it) and reaches the file through
directory descriptors opened with O_NOFOLLOW, one component at a time: a component below `root`
that is a symbolic link is refused (UnsafePathError), never followed, and the file itself is
created as `tempfile` does (a random name, O_CREAT|O_EXCL|O_NOFOLLOW) and renamed over its name,
which replaces a planted link instead of writing through it. Readers (`open_regular`) open with
O_NONBLOCK and refuse anything that is not a regular file (a FIFO would block the reader, a link
to /dev/zero would never end) before a byte is read."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from typing import IO, Any, Optional

from distft.errors import OutputError, UnsafePathError

log = logging.getLogger("distft")

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


def write_text(path: str, text: str, what: str = "", root: Optional[str] = None) -> None:
    """`text` into `path`, atomically and durably (a temporary file beside it, fsync, rename),
    without following links: `path` lies in `root` (default: its own directory), and every
    directory between them is created if missing and refused if it is a link (`directory_fd`).
    A failure removes the temporary file and raises `output_error`'s OutputError (`what`: the
    file's name for people, e.g. "the evaluation report")."""
    write_bytes(path, text.encode("utf-8"), what, root)


def write_bytes(path: str, data: bytes, what: str = "", root: Optional[str] = None) -> None:
    """`write_text` for bytes."""
    try:
        with directory_fd(os.path.dirname(os.path.abspath(path)), root, what) as folder:
            name = os.path.basename(path)
            tmp, fd = _create_temporary(folder, name)
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=folder)
                raise
    except OSError as err:
        raise output_error(path, err, what) from err


def write_json(path: str, data: Any, what: str = "", root: Optional[str] = None) -> None:
    """`data` as indented JSON (values JSON cannot hold written as their str), atomically."""
    write_text(path, json.dumps(data, indent=1, default=str) + "\n", what, root)


def append_line(path: str, line: str, what: str = "", root: Optional[str] = None) -> None:
    """Append `line` and a newline to `path`, whole or not at all, under an exclusive lock (two
    writers' lines never interleave): when the write fails (a full disk, a file-size limit: a
    short write, then ENOSPC or EFBIG), the file is cut back to its size before, so it still ends
    with a whole line, and `output_error`'s message is raised. The file is opened without
    following a link and must be a regular file (a planted FIFO or device is refused);
    directories as for `write_text`."""
    data = (line + "\n").encode("utf-8")
    fd = None
    try:
        with directory_fd(os.path.dirname(os.path.abspath(path)), root, what) as folder:
            fd = os.open(os.path.basename(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o644, dir_fd=folder)
        _require_regular(fd, path, what)
        _lock_for_a_while(fd, path)
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
        except OSError:
            with contextlib.suppress(OSError):  # a device (/dev/full) cannot be truncated: nothing was kept
                os.ftruncate(fd, size)  # shrinking needs no space and is allowed under any size limit
            raise
    except UnsafePathError:
        raise
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a link as the file's own name
            raise _link_refused(path, what) from None
        if err.errno == errno.ENXIO:  # a FIFO without a reader, opened O_NONBLOCK for writing
            raise UnsafePathError(f"refusing to write {_what(what)}{path}: it is a named pipe (FIFO), not a regular "
                                  f"file; {_REMOVE_IT}") from None
        raise output_error(path, err, what) from err
    finally:
        if fd is not None:
            os.close(fd)


APPEND_LOCK_WAIT_S = 10.0


def _lock_for_a_while(fd: int, path: str) -> bool:
    """An exclusive flock on `fd`, waited for at most `wait_s`: anyone who can open the file (a
    second local user, read-only) can hold one forever, and a run must not hang on that. Past the
    wait the append goes ahead unlocked, with a warning: an O_APPEND write of one line is placed
    whole at the end by the kernel on a local file system; the lock only orders writers."""
    wait_s = APPEND_LOCK_WAIT_S
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                log.warning("%s has been locked by another process for %.0f s; appending without the lock", path,
                            wait_s)
                return False
            time.sleep(0.05)


def make_dirs(path: str, root: Optional[str] = None, what: str = "") -> str:
    """Create directory `path` and the missing ones between it and `root`, refusing links on the
    way (`directory_fd`); returns `path`."""
    with directory_fd(os.path.abspath(path), root, what):
        return path


def remove_tree(path: str) -> None:
    """Remove `path`, whatever it is, without following a link: a link or a file is unlinked, a
    directory removed with everything in it (shutil.rmtree, which does not follow the links it
    meets either); nothing there is fine."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


_REMOVE_IT = ("distft never writes through links or into special files under a run directory, cache or review "
              "folder (they may have been planted there); remove it and rerun, or use another directory")


def _what(what: str) -> str:
    return f"{what} " if what else ""


def _link_refused(path: str, what: str, link: str = "") -> UnsafePathError:
    link = link or path
    target = ""
    with contextlib.suppress(OSError):
        target = f" (to {os.readlink(link)})"
    return UnsafePathError(f"refusing to write {_what(what)}{path}: {link} is a symbolic link{target}; {_REMOVE_IT}")


@contextlib.contextmanager
def directory_fd(path: str, root: Optional[str] = None, what: str = "", create: bool = True) -> Iterator[int]:
    """A descriptor of directory `path`, reached from `root` (a directory the user chose, opened
    as it is, links included; default: `path` itself) one component at a time with O_NOFOLLOW:
    a component that is a symbolic link (or anything but a directory) is refused with an
    UnsafePathError naming it, one that is missing is created (mode 0755 less the umask) when
    `create`, and the directory reached is checked to lie inside `root` by its real path. `path`
    must be `root` or lie below it."""
    path = os.path.abspath(path)
    root = os.path.abspath(root) if root else path
    relative = os.path.relpath(path, root)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise UnsafePathError(f"refusing to write {_what(what)}under {path}: it lies outside {root}")
    parts = [] if relative == os.curdir else relative.split(os.sep)
    if create:
        os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walked = root
        for part in parts:
            walked = os.path.join(walked, part)
            child = _open_child_dir(fd, part, walked, path, what, create)
            os.close(fd)
            fd = child
        _check_inside(fd, root, path, what)
        yield fd
    finally:
        os.close(fd)


def _open_child_dir(fd: int, part: str, walked: str, path: str, what: str, create: bool) -> int:
    """Directory `part` of the directory open as `fd` (`walked`: its path), never through a link."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(part, flags, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
            raise _link_refused(path, what, walked) from None
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), walked) from None  # what makedirs says
    with contextlib.suppress(FileExistsError):  # made meanwhile by another writer: fine, if it is a directory
        os.mkdir(part, 0o755, dir_fd=fd)
    return _open_child_dir(fd, part, walked, path, what, create=False)


def _check_inside(fd: int, root: str, path: str, what: str) -> None:
    """The directory open as `fd` lies inside `root` by its real path (Linux's /proc names it;
    elsewhere the O_NOFOLLOW walk alone vouches for it)."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return
    top = os.path.realpath(root)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"refusing to write {_what(what)}under {path}: it resolves to {real}, outside {top}; "
                              f"{_REMOVE_IT}")


def _create_temporary(folder: int, name: str) -> tuple[str, int]:
    """A new file beside `name` in directory `folder`, as `tempfile.mkstemp` makes one (a random
    name, O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file or a planted link)."""
    for _ in range(100):
        tmp = f"{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                                dir_fd=folder)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", name)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ---------------------------------------------------------------------------------- reading


class NotAFile(OSError):
    """A path that should be a regular file is a pipe, a device, a socket, a directory or (where
    links are refused) a link, or is larger than its reader allows; the message says which. An
    OSError, so every reader that reports an unreadable file reports this one alike."""


def file_kind(mode: int) -> str:
    """What a file of this st_mode is, for messages: "a named pipe (FIFO)", "a directory", ..."""
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISLNK, "a symbolic link"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _require_regular(fd: int, path: str, what: str = "") -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePathError(f"refusing to write {_what(what)}{path}: it is {file_kind(info.st_mode)}, not a regular "
                              f"file; {_REMOVE_IT}")
    return info


def open_regular(path: str, mode: str = "rb", follow_links: bool = False, size: Optional[int] = None,
                 max_bytes: Optional[int] = None) -> IO:
    """`path` opened for reading, only if it is a regular file: opened with O_NONBLOCK (a FIFO
    does not wait for a writer) and, unless `follow_links`, O_NOFOLLOW, then checked with fstat
    before a byte is read. `size`: the size it must have (a manifest's); `max_bytes`: the most a
    small file may hold. Raises NotAFile (an OSError) naming what it is instead."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow_links and os.path.islink(path):
            raise NotAFile(f"{path} is a symbolic link (to {os.readlink(path)}), not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAFile(f"{path} is {file_kind(info.st_mode)}, not a regular file")
        if size is not None and info.st_size != size:
            raise NotAFile(f"{path} is {info.st_size} bytes, its manifest says {size}")
        if max_bytes is not None and info.st_size > max_bytes:
            raise NotAFile(f"{path} is {info.st_size} bytes, more than the {max_bytes} such a file may hold")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: str, follow_links: bool = False, max_bytes: int = 64 << 20) -> Any:
    """The JSON document in `path` (a regular file: `open_regular`). A document nested too deep
    for the parser is a ValueError, like any other malformed one."""
    with open_regular(path, "r", follow_links=follow_links, max_bytes=max_bytes) as f:
        text = f.read()
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None


def read_text(path: str, follow_links: bool = False, max_bytes: int = 64 << 20) -> str:
    """The text of a small regular file (`open_regular`)."""
    with open_regular(path, "r", follow_links=follow_links, max_bytes=max_bytes) as f:
        return f.read()


def fsync_dir(path: str) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_lines(path: str, follow_links: bool = False) -> list[dict]:
    """The JSON objects of a JSON Lines file, one a line (none when the file does not exist). A
    line that is not a JSON object is skipped with a warning naming the file and line: the last
    line torn by a crash mid-append, or damage in the middle (said so: no writer of distft leaves
    it). The file must be a regular file (`open_regular`)."""
    try:
        with open_regular(path, "rb", follow_links=follow_links) as f:
            lines = f.read().decode("utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return []
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records = []
    for number, line in numbered:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
            continue
        last = number == numbered[-1][0]
        log.warning("%s: line %d is %s; skipped", path, number,
                    "torn (cut short by a crash or a full disk while it was written)" if last
                    else "not a JSON record (the file was damaged or edited)")
    return records
