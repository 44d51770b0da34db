"""One writer per output directory: an exclusive ``fcntl.flock`` on ``<folder>/.lock``.

The lock file holds the holder's pid, so a second writer is refused with a message naming
it. The kernel drops the lock when its holder exits, however it exits (``kill -9``
included), so a stale lock file never blocks a rerun. The lock is advisory: it guards
against flashsae writers, not against other programs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def _locked(folder: Path, what: str) -> Iterator[None]:
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise UserError(f"cannot lock {what} {folder}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"cannot lock {what} {folder}: {e.strerror}") from e
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(
                f"{what} {folder} is being written by pid {holder}; "
                f"wait for it or choose another {what}"
            ) from None
        pid = f"{os.getpid()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, pid, 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def exclusive_lock(folder: Path, what: str) -> contextlib.AbstractContextManager:
    """Hold an exclusive lock on the existing directory ``folder`` for the ``with`` block.

    ``what`` names the directory in messages ("cache directory", "run directory"). A UserError
    "<what> <folder> is being written by pid N; wait for it or choose another <what>" when
    another process holds it; the lock file stays behind (holding the last holder's pid).
    """
    return _locked(folder, what)
