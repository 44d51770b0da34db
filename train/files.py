"""Writing run-directory and export outputs: never through a symbolic link, atomically.

A link planted at an output's name (``config.json``, ``train_state.pt.tmp``, ...) would send
the write outside the directory; ``open_output`` opens with ``O_NOFOLLOW`` and refuses. Only
the last path component is checked: the directory itself may be a link the user made.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from flashsae.cache.errors import UserError

_MODES = {"w": os.O_TRUNC, "a": os.O_APPEND}


def open_output(path: Path, mode: str = "wb") -> IO:
    """``path`` opened for writing (``mode`` "w", "wb", "a" or "ab": truncated or appended),
    created if missing; a UserError when it is a symbolic link or cannot be written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | _MODES[mode[0]]
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; refusing to write through it") from e
        raise UserError(f"cannot write {path}: {e.strerror}") from e
    return os.fdopen(fd, mode)


def write_output(path: Path, data: bytes | str | Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` with ``data`` (bytes, text, or a function writing to a binary file):
    written to ``<path>.tmp`` (``open_output``), fsynced, renamed over ``path``; a rename
    replaces a link at ``path`` itself, never its target. A UserError when it fails."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    f = open_output(tmp)
    try:
        with f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror}") from e
