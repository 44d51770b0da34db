"""Where flashsae keeps its files: ``$FLASHSAE_HOME`` (default ``~/.cache/flashsae``).

Bundled models go under ``models/`` and caches built without ``--out`` under ``caches/``.
"""

from __future__ import annotations

import os
from pathlib import Path


def flashsae_home() -> Path:
    """``$FLASHSAE_HOME``, or ``~/.cache/flashsae`` when it is unset."""
    return Path(os.environ.get("FLASHSAE_HOME", Path.home() / ".cache" / "flashsae"))
