"""Where flashsae keeps its files: ``$FLASHSAE_HOME`` (default ``~/.cache/flashsae``).

Bundled models go under ``models/`` and caches built without ``--out`` under ``caches/``.
Also: telling a local path from a Hub id, and digests of local files for cache keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def flashsae_home() -> Path:
    """``$FLASHSAE_HOME``, or ``~/.cache/flashsae`` when it is unset."""
    return Path(os.environ.get("FLASHSAE_HOME", Path.home() / ".cache" / "flashsae"))


FILE_SUFFIXES = frozenset(
    ".txt .text .md .rst .py .json .jsonl .csv .tsv .parquet .arrow .gz .zst .xz .bz2 .zip"
    " .safetensors .bin .pt .pth .gguf".split()
)
HASH_LIMIT = 256 * 2**20  # bytes hashed in full; beyond it, sizes and modification times


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hugging Face Hub id (``name`` or
    ``owner/name``): it starts with ``.``, ``/`` or ``~``, has more than one separator or a
    backslash, or ends in a file suffix."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in FILE_SUFFIXES
    )


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set (to anything but 0/false)."""
    return any(
        os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def files_digest(files: list[Path], root: Path) -> str:
    """A sha256 over ``files`` (names relative to ``root``): of their contents when they hold
    at most HASH_LIMIT bytes together, else of their sizes and modification times (hashing
    gigabytes of weights on every run is too slow; an edit still changes the mtime)."""
    digest = hashlib.sha256()
    stats = [f.stat() for f in files]
    by_content = sum(s.st_size for s in stats) <= HASH_LIMIT
    digest.update(b"content" if by_content else b"stat")
    for f, st in zip(files, stats, strict=True):
        digest.update(f"\0{f.relative_to(root).as_posix()}\0{st.st_size}\0".encode())
        if not by_content:
            digest.update(str(st.st_mtime_ns).encode())
            continue
        with open(f, "rb") as fh:
            while block := fh.read(2**24):
                digest.update(block)
    return digest.hexdigest()
