"""Build (or resume, or reuse) the activation cache of a subject model over a text source.

``cache_settings`` says what identifies a cache, ``default_cache_dir`` where it goes by
default, ``build_cache`` captures sites over packed sequences into shards, and ``build``
does that for a subject model's own token stream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flashsae.kernels.capture_kernels import compact_rows

from .errors import UserError
from .hooks import capture
from .models.subjects import Subject
from .paths import flashsae_home
from .shards import ShardWriter
from .text import Packed


def keep_mask(
    tokens: torch.Tensor, drop_tokens: tuple[int, ...] = (), skip_first: int = 1
) -> torch.Tensor:
    """``[S, T]`` bool: the rows worth caching (not BOS, not padding or other listed tokens)."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, :skip_first] = False
    if drop_tokens:
        keep &= ~torch.isin(tokens, torch.tensor(drop_tokens, dtype=tokens.dtype))
    return keep


def build_cache(
    model: nn.Module,
    sequences: Packed | Callable[[], Packed],
    sites: list[str],
    out: Path,
    settings: dict,
    batch_size: int = 64,
    rows_per_shard: int = 65536,
    drop_tokens: tuple[int, ...] = (),
) -> dict:
    """Capture ``sites`` over the packed sequences into the cache ``out``; returns its manifest.

    ``sequences`` may be a function making them, called only when the cache is unfinished.

    Rows at BOS and at ``drop_tokens`` are dropped; each kept row is stored with its
    token id, document index, position and sequence index. Rows are written in sequence
    order and the manifest records where the last complete shard ended, so a rerun
    continues exactly there.
    """
    device = next(model.parameters()).device
    writer = ShardWriter(out, {**settings, "sites": sites}, rows_per_shard)
    if writer.complete:
        return writer.manifest
    packed = sequences() if callable(sequences) else sequences
    tokens, n_seqs, seq_len = packed.tokens, *packed.tokens.shape
    keep = keep_mask(tokens, drop_tokens)
    first_seq, written = writer.cursor
    keep[:first_seq] = False  # on disk already, and so are the first `written` rows of first_seq
    keep[first_seq, keep[first_seq].nonzero()[:written, 0]] = False
    positions = torch.arange(seq_len, dtype=torch.int32).expand(n_seqs, seq_len)
    seq_ids = torch.arange(n_seqs, dtype=torch.int32)[:, None].expand(n_seqs, seq_len)
    bar = tqdm(
        total=n_seqs * seq_len,
        initial=(first_seq - first_seq % batch_size) * seq_len,
        desc=f"capturing {', '.join(sites)}",
        unit="tok",
        unit_scale=True,
    )
    # batches on the same grid as an uninterrupted build: identical arithmetic, identical cache
    for start in range(first_seq - first_seq % batch_size, n_seqs, batch_size):
        rows = slice(start, start + batch_size)
        acts = capture(model, tokens[rows].to(device), sites)
        flat = {site: a.reshape(-1, a.shape[-1]) for site, a in acts.items()}
        kept = keep[rows].reshape(-1).nonzero()[:, 0]
        meta = {
            "tokens": tokens[rows].reshape(-1),
            "doc": packed.doc[rows].reshape(-1),
            "pos": positions[rows].reshape(-1),
            "seq": seq_ids[rows].reshape(-1),
        }
        while len(kept):  # shard by shard, so the kernel's statistics split at the boundary
            part, kept = kept[: writer.room], kept[writer.room :]
            mask = torch.zeros(len(meta["seq"]), dtype=torch.bool)
            mask[part] = True
            compacted, stats = {}, {}
            for site, h in flat.items():
                compacted[site], total, sq = compact_rows(h, mask.to(h.device), writer.dtype)
                if not (torch.isfinite(total).all() and torch.isfinite(sq)):
                    raise UserError(
                        f"non-finite activations (NaN/inf) at {site}; check the model and dtype"
                    )
                stats[site] = (total, sq)
            writer.add(compacted, {k: v[part] for k, v in meta.items()}, stats)
        bar.update(tokens[rows].numel())
    bar.close()
    return writer.finish()


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
