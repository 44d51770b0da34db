"""Build (or resume, or reuse) the activation cache of a subject model over a text source.

``cache_settings`` says what identifies a cache, ``default_cache_dir`` where it goes by
default, ``build_cache`` captures sites over packed sequences into shards, and ``build``
does that for a subject model's own token stream.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flashsae.kernels.capture_kernels import compact_rows

from .errors import UserError
from .hooks import capture
from .locks import LOCK_NAME, exclusive_lock
from .models.subjects import Subject
from .paths import flashsae_home
from .shards import META, ShardWriter, damaged_shards
from .text import HELD_OUT, STDLIB_HELD_OUT, Packed, source_digest


def keep_mask(
    tokens: torch.Tensor, drop_tokens: tuple[int, ...] = (), skip_first: int = 1
) -> torch.Tensor:
    """``[S, T]`` bool: the rows worth caching: not the first ``skip_first`` (the start token),
    not ``drop_tokens`` (separators, padding, ``--drop-tokens``)."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, :skip_first] = False
    if drop_tokens:
        keep &= ~torch.isin(
            tokens, torch.tensor(drop_tokens, dtype=tokens.dtype, device=tokens.device)
        )
    return keep


def check_sites(sites: list[str]) -> None:
    """A UserError unless ``sites`` is a non-empty list of distinct, non-empty names."""
    if not any(isinstance(s, str) and s.strip() for s in sites):
        raise UserError("--sites names no site; give one or more, comma-separated")
    if not all(isinstance(s, str) and s.strip() for s in sites):
        raise UserError(f"--sites {','.join(map(str, sites))} has an empty name (a stray comma)")
    repeated = sorted({s for s in sites if sites.count(s) > 1})
    if repeated:
        raise UserError(f"--sites names {', '.join(repeated)} more than once")


def _capture_batch(
    model: nn.Module, tokens: torch.Tensor, sites: list[str], d: int
) -> dict[str, torch.Tensor]:
    """``{site: [B * T, d]}`` for one batch of sequences; a UserError for a site of another
    width than the cache's d (d_model)."""
    device = next(model.parameters()).device
    acts = capture(model, tokens.to(device), sites)
    for site, a in acts.items():
        if a.shape[-1] != d:
            raise UserError(
                f"site {site} is {a.shape[-1]} wide, not d_model={d}; "
                "cache a residual-stream-wide site (blocks.L.hook_*)"
            )
    return {site: a.reshape(-1, a.shape[-1]) for site, a in acts.items()}


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def build_cache(
    model: nn.Module,
    sequences: Packed | Callable[[], Packed],
    sites: list[str],
    out: Path,
    settings: dict,
    batch_size: int = 64,
    rows_per_shard: int = 65536,
    drop_tokens: tuple[int, ...] = (),
    verify: bool = False,
    packing: dict | None = None,
) -> dict:
    """Capture ``sites`` over the packed sequences into the cache ``out``; returns its manifest.

    ``sequences`` may be a function making them, called only when the cache is unfinished
    or damaged. ``packing`` (how they were made) is recorded in a new manifest.

    Rows at the start token (``settings["bos"]``, when it is not None) and at ``drop_tokens``
    are dropped; each kept row is stored with its
    token id, document index, position and sequence index. Rows are written in sequence
    order and the manifest records where the last complete shard ended, so a rerun
    continues exactly there. A rerun first checks the listed shards (layout and size; also
    checksums and finiteness with ``verify``) and rebuilds any missing or bad one in place.
    Resuming and rebuilding run the model on the batch grid the cache was started with
    (its recorded batch size), so the result equals an uninterrupted build's.

    ``out`` is locked while it is written (``locks.exclusive_lock``); a build that fails
    before its first shard removes the directories it created.
    """
    check_sites(sites)
    out = Path(out)
    created = _missing_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache directory {out}: {e.strerror}") from e
    try:
        with exclusive_lock(out, "a cache build"):
            return _build_locked(
                model, sequences, sites, out, settings, batch_size, rows_per_shard,
                drop_tokens, verify, packing,
            )  # fmt: skip
    finally:
        if created and not (out / "manifest.json").exists():
            (out / LOCK_NAME).unlink(missing_ok=True)
            for folder in created:  # only what this build made, and only if left empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _build_locked(
    model: nn.Module,
    sequences: Packed | Callable[[], Packed],
    sites: list[str],
    out: Path,
    settings: dict,
    batch_size: int,
    rows_per_shard: int,
    drop_tokens: tuple[int, ...],
    verify: bool,
    packing: dict | None,
) -> dict:
    writer = ShardWriter(out, {**settings, "sites": sites}, rows_per_shard)
    if packing is not None:
        writer.manifest.setdefault("packing", packing)
    bad = damaged_shards(out, writer.manifest, verify)
    if writer.complete and not bad:
        return writer.manifest
    for reason in bad.values():
        print(f"rebuilding a damaged shard: {reason}", file=sys.stderr)
    grid = writer.manifest.setdefault("batch_size", batch_size)
    if grid != batch_size:
        print(f"{out} was started with --batch-size {grid}; continuing on that grid")
    packed = sequences() if callable(sequences) else sequences
    tokens, n_seqs, seq_len = packed.tokens, *packed.tokens.shape
    keep = keep_mask(tokens, drop_tokens, skip_first=int(settings.get("bos", 0) is not None))
    d = writer.d
    if bad:
        kept = keep.reshape(-1).nonzero()[:, 0]  # flat position of each cached row, in order
        starts = [0, *itertools.accumulate(e["rows"] for e in writer.manifest["shards"])]
        for i in bad:
            flat = kept[starts[i] : starts[i + 1]]
            first, last = flat[0].item() // seq_len, flat[-1].item() // seq_len
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in [*sites, *META]}
            for start in range(first - first % grid, last + 1, grid):
                acts = _capture_batch(model, tokens[start : start + grid], sites, d)
                lo, hi = start * seq_len, min(start + grid, n_seqs) * seq_len
                mask = torch.zeros(hi - lo, dtype=torch.bool)
                mask[flat[(flat >= lo) & (flat < hi)] - lo] = True
                for site, h in acts.items():
                    parts[site].append(compact_rows(h, mask.to(h.device), writer.dtype)[0].cpu())
            meta = {
                "tokens": tokens.reshape(-1)[flat],
                "doc": packed.doc.reshape(-1)[flat],
                "pos": flat % seq_len,
                "seq": flat // seq_len,
            }
            for name, column in meta.items():
                parts[name].append(column.to(torch.int32))
            writer.replace_shard(i, parts)
        if writer.complete:
            return writer.manifest
    first_seq, written = writer.cursor
    keep[:first_seq] = False  # on disk already, and so are the first `written` rows of first_seq
    keep[first_seq, keep[first_seq].nonzero()[:written, 0]] = False
    positions = torch.arange(seq_len, dtype=torch.int32).expand(n_seqs, seq_len)
    seq_ids = torch.arange(n_seqs, dtype=torch.int32)[:, None].expand(n_seqs, seq_len)
    bar = tqdm(
        total=n_seqs * seq_len,
        initial=(first_seq - first_seq % grid) * seq_len,
        desc=f"capturing {', '.join(sites)}",
        unit="tok",
        unit_scale=True,
    )
    # batches on the same grid as an uninterrupted build: identical arithmetic, identical cache
    for start in range(first_seq - first_seq % grid, n_seqs, grid):
        rows = slice(start, start + grid)
        flat = _capture_batch(model, tokens[rows], sites, d)
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
    recorded only when it is not "text", ``separator`` (the token after each document) only
    when the tokenizer has one and ``held_out`` (the held-out documents left out) only for a
    ``text`` source, so caches whose packing has not changed (the bundled models' on the
    stdlib) keep their keys.

    ``model_key`` is the subject's key (bundled: its recipe; Hub: id and revision; local
    folder: a digest of its weight files) and ``text_digest`` a digest of a local text
    source's files (``text.source_digest``: contents, or sizes and modification times past
    a size limit), so an edited corpus or checkpoint gets a new default cache directory and
    an existing ``--out`` built from the old one is refused.
    """
    field = {} if text_field == "text" else {"text_field": text_field}
    digest = source_digest(text)
    if digest is not None:
        field["text_digest"] = digest
    if subject.separator is not None:
        field["separator"] = subject.separator
    if text is not None:
        field["held_out"] = HELD_OUT
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
    verify: bool = False,
) -> dict:
    """Capture ``settings["sites"]`` into ``out`` (resuming a partial cache, rebuilding damaged
    shards: ``build_cache``); the manifest."""
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
        drop_tokens=(*settings["drop_tokens"], *subject.special_tokens),
        verify=verify,
        packing={**subject.packing(), "held_out": settings.get("held_out", STDLIB_HELD_OUT)},
    )
