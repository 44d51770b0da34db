"""One shard file in the safetensors format: streamed atomic writes and memory-mapped reads.

Layout (the safetensors format): an 8-byte little-endian header length ``N``, ``N``
bytes of JSON mapping each name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(padded with spaces to a multiple of 8), then the tensors' bytes back to back.

``write_shard`` streams each tensor's parts straight to the file while a second thread
hashes the same bytes (hashlib releases the GIL), so a shard costs one write, not a
concatenation, a serialized copy and a separate hashing pass. ``map_shard`` maps the
file and returns tensors that view the map: rows are copied only when gathered.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int32: "I32",
}
TORCH_DTYPES = {name: dtype for dtype, name in ST_DTYPES.items()}
MAX_HEADER = 100 * 2**20


def _header(tensors: dict[str, list[torch.Tensor]]) -> tuple[bytes, list[str]]:
    """The length-prefixed JSON header, and the names in file order (widest dtype first,
    so every tensor starts aligned to its item size)."""
    names = sorted(tensors, key=lambda k: -tensors[k][0].element_size())
    entries, offset = {}, 0
    for name in names:
        parts = tensors[name]
        rows = sum(len(p) for p in parts)
        shape = [rows, *parts[0].shape[1:]]
        size = sum(p.numel() for p in parts) * parts[0].element_size()
        entries[name] = {
            "dtype": ST_DTYPES[parts[0].dtype],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, names


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunk: memoryview | bytes) -> int:
    """Write all of ``chunk`` to ``fd``, resuming after short writes; a write that makes no
    progress is an ENOSPC error. Returns the byte count."""
    view = memoryview(chunk).cast("B")
    done = 0
    while done < len(view):
        n = os.write(fd, view[done:])
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done += n
    return done


def write_atomic(path: Path, chunks: list[memoryview | bytes]) -> None:
    """Write ``chunks`` to ``path`` via a temporary file, fsync and rename (then fsync the
    directory).

    The temporary file is created afresh (``O_CREAT | O_EXCL | O_NOFOLLOW``, after removing a
    stale one), so a planted symlink is never followed, and the bytes on disk are counted
    against the bytes meant: a short write is an error and the file is never renamed in.
    """
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    created = False
    try:
        tmp.unlink(missing_ok=True)  # a stale one from a killed run (or a planted link)
        fd = os.open(tmp, flags, 0o644)
        created = True
        try:
            expected = sum(_write_all(fd, chunk) for chunk in chunks)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != expected:
            raise OSError(errno.EIO, f"short write: {size} of {expected} bytes on disk")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if e.errno == errno.ENOSPC:
            raise UserError(
                f"disk full while writing {path}; free space and rerun to resume"
            ) from e
        raise UserError(f"cannot write {path}: {e.strerror}") from e


def write_shard(path: Path, tensors: dict[str, list[torch.Tensor]]) -> str:
    """Write the concatenation of each name's parts (same dtype and trailing shape) as a
    safetensors file at ``path``, atomically; returns the file's sha256, computed by a
    second thread while the bytes are written."""
    header, names = _header(tensors)
    chunks = [memoryview(header)]
    for name in names:
        for p in tensors[name]:
            if p.numel():
                chunks.append(memoryview(p.contiguous().reshape(-1).view(torch.uint8).numpy()))
    digest = hashlib.sha256()
    hasher = threading.Thread(target=lambda: [digest.update(c) for c in chunks])
    hasher.start()
    try:
        write_atomic(path, chunks)
    finally:
        hasher.join()
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def map_shard(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, as views of a private memory map.

    The header is checked against the file size first, so a truncated file is a UserError
    naming it rather than a crash when a missing page is touched.
    """

    def bad(why: str) -> UserError:
        return UserError(f"{path} is unreadable or truncated ({why}); rebuild the cache")

    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise bad(f"{size} bytes")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(MAX_HEADER, size - 8):
                raise bad(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad("header is not JSON") from e
    try:
        header.pop("__metadata__", None)
        layout, end = [], 0
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, stop = info["data_offsets"]
            dtype = TORCH_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            if begin != end or stop - begin != int(np.prod(shape)) * dtype.itemsize:
                raise bad(f"{name} has offsets {begin}..{stop} for shape {shape}")
            layout.append((name, dtype, shape, begin, stop))
            end = stop
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise bad(f"malformed header: {e!r}") from e
    if 8 + n + end != size:
        raise bad(f"{size} bytes where the header describes {8 + n + end}")
    out = {}
    for name, dtype, shape, begin, stop in layout:
        flat = np.frombuffer(buf, dtype=np.uint8, count=stop - begin, offset=8 + n + begin)
        out[name] = torch.from_numpy(flat).view(dtype).view(shape)
    return out
