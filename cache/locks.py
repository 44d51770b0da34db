"""One writer per output directory: an exclusive ``fcntl.flock`` on ``<folder>/.lock``.

The holder writes its pid and what it is doing into the lock file, so a refused writer can
name it. The lock belongs to the open file, so it is released when the holder exits, however
it exits (``kill -9`` included); a lock file left behind by a killed holder is locked by
nobody and is taken over. The holder deletes the file when it is done; a writer that locked a
file deleted meanwhile (no longer the file at the path) retries on the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".lock"


def _holder(fd: int) -> str:
    """ "pid N (what)" from the lock file ``fd``; "an unknown process" before the holder wrote."""
    pid, _, what = os.pread(fd, 4096, 0).decode(errors="replace").strip().partition(" ")
    return f"pid {pid} ({what})" if pid.isdigit() else "an unknown process"


def _lock(path: Path, what: str) -> int:
    """The descriptor of ``path``, exclusively locked; a UserError naming the holder if not."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserError(
                f"{path.parent} is being written by {holder}; wait for it to finish or choose "
                f"another directory for {what} (one writer at a time)"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder deleted it after we opened it: lock the new one


@contextlib.contextmanager
def exclusive_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    ``what`` names the work (e.g. "a training run"): it is recorded for, and shown to, other
    writers, which get a UserError naming this process's pid while it holds the lock.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock(path, what)
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror}") from e
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        except OSError as e:
            raise UserError(f"cannot write to {folder}: {e.strerror}") from e
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
