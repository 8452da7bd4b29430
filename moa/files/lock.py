"""One writer per output: an exclusive, non-blocking `fcntl.flock` on `<output>.lock`, held for the
whole run, with the holder's pid inside. A second run on the same output stops at once with
"another run (pid N) is writing PATH". The lock file is removed when the holder releases it; an
acquirer checks that the file it locked is still the one at the path (a holder may have just
removed it), so two runs never both hold a lock.

Pure Python (no torch).
"""
from __future__ import annotations

import fcntl
import os
from types import TracebackType
from typing import Optional


class OutputLocked(ValueError):
    """Another live process holds the lock of this output (a user mistake: one line, no traceback)."""


def lock_path(output: str | os.PathLike) -> str:
    """The lock file of `output`: `<output>.lock` beside it."""
    return f"{os.fspath(output)}.lock"


def _holder_pid(fd: int) -> str:
    """The pid written in a lock file (or "?" while its holder has not written it yet)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return text if text.isdigit() else "?"


def _still_linked(fd: int, path: str) -> bool:
    """True when `path` still names the file open as `fd` (not removed or replaced meanwhile)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class OutputLock:
    """`with OutputLock(path):` holds the exclusive lock of `path` (the output a run writes)."""

    def __init__(self, output: str | os.PathLike, path: Optional[str | os.PathLike] = None) -> None:
        """`path`: the lock file, default `<output>.lock` (a folder's lock lives inside it)."""
        self.output = os.fspath(output)
        self.path = os.fspath(path) if path is not None else lock_path(output)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock, or raise OutputLocked naming the holder's pid and the output."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder_pid(fd)
                os.close(fd)
                raise OutputLocked(f"another run (pid {pid}) is writing {self.output}") from None
            if not _still_linked(fd, self.path):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            self.fd = fd

    def release(self) -> None:
        """Remove the lock file and let go of the lock (nothing when not held)."""
        if self.fd is None:
            return
        if _still_linked(self.fd, self.path):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, kind: Optional[type], value: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.release()
