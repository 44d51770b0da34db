"""Build (or resume, or reuse) the activation cache of a subject model over a text source."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .hooks import build_cache
from .models.bytelm import flashsae_home
from .models.subjects import Subject


def cache_settings(
    subject: Subject,
    sites: list[str],
    text: str | None,
    tokens: int,
    seq_len: int,
    seed: int,
    dtype: str = "bfloat16",
    drop_tokens: tuple[int, ...] = (),
    text_field: str = "text",
) -> dict:
    """What identifies a cache: equal settings give identical contents. ``text_field`` is
    recorded only when it is not "text", so caches built before it existed still match."""
    field = {} if text_field == "text" else {"text_field": text_field}
    return {
        "model": subject.name,
        "model_key": subject.key,
        "sites": sites,
        "d": subject.d_model,
        "dtype": dtype,
        "seq_len": seq_len,
        "tokens": tokens,
        "seed": seed,
        "text": text,  # None: the Python standard library's train files
        "dataset": text or "python stdlib source, train split",
        "tokenizer": subject.name if subject.key.startswith("hf-") else "bytes + BOS",
        "bos": subject.bos,
        "drop_tokens": list(drop_tokens),
        **field,
    }


def default_cache_dir(settings: dict) -> Path:
    """``$FLASHSAE_HOME/caches/<model key>-<hash of the settings>``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return flashsae_home() / "caches" / f"{settings['model_key']}-{digest}"


def build(
    subject: Subject,
    model: object,
    settings: dict,
    out: Path,
    batch_size: int = 64,
    rows_per_shard: int = 65536,
) -> dict:
    """Capture ``settings["sites"]`` into ``out`` (resuming a partial cache); the manifest."""
    return build_cache(
        model,
        lambda: subject.sequences(
            "train",
            settings["tokens"],
            settings["seq_len"],
            settings["seed"],
            settings["text"],
            settings.get("text_field", "text"),
        ),
        settings["sites"],
        out,
        settings,
        batch_size=batch_size,
        rows_per_shard=rows_per_shard,
        drop_tokens=tuple(settings["drop_tokens"]),
    )
