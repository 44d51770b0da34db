"""Capture activations at named sites with forward hooks, and build a sharded cache from them.

A site is a module path in the model (``blocks.3.hook_resid_post`` in the bundled
model, where every TransformerLens site is an identity module), or a TransformerLens
name mapped onto a Hugging Face model's modules (``hf_layouts.py``). The forward pass
stops as soon as every requested site has fired, so later layers never run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from flashsae.kernels.capture_kernels import compact_rows

from .errors import UserError
from .hf_layouts import hf_layout
from .shards import ShardWriter
from .text import Packed

SITE_PATTERN = re.compile(r"blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)")


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass early."""


@dataclass
class SitePoint:
    """Where a site's tensor lives: the output of ``module``, or its first input."""

    module: nn.Module
    kind: str = "output"  # or "input"

    def hook(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
        """Call ``fn(h)`` on the site's tensor h; a returned tensor replaces h."""
        if self.kind == "output":

            def on_output(module: nn.Module, args: tuple, out: object) -> object:
                h = out[0] if isinstance(out, tuple) else out
                new = fn(h)
                if new is None:
                    return None
                return (new, *out[1:]) if isinstance(out, tuple) else new

            return self.module.register_forward_hook(on_output)

        def on_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return self.module.register_forward_pre_hook(on_input, with_kwargs=True)


def resolve_site(model: nn.Module, site: str) -> SitePoint:
    """Where ``site`` is in ``model``: a module path, or a TransformerLens name mapped through
    the model's Hugging Face layout; a UserError listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if site in modules:
        return SitePoint(modules[site])
    layout = hf_layout(model)
    match = SITE_PATTERN.fullmatch(site)
    if layout is not None and match:
        return layout.site_point(model, int(match.group(1)), match.group(2))
    n_layers = (
        layout.n_layers(model)
        if layout
        else sum(1 for name in modules if re.fullmatch(r"blocks\.\d+", name))
    )
    hint = (
        f"blocks.{{0..{n_layers - 1}}}.hook_{{resid_pre,resid_mid,resid_post,attn_out,mlp_out}}"
        " or a module path"
        if n_layers
        else "module paths from model.named_modules()"
    )
    raise UserError(f"unknown site {site!r}; this model's sites are {hint}")


@contextmanager
def splice(
    model: nn.Module, site: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, replace the tensor ``h`` at ``site`` with ``fn(h)``."""
    handle = resolve_site(model, site).hook(fn)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def capture(model: nn.Module, tokens: torch.Tensor, sites: list[str]) -> dict[str, torch.Tensor]:
    """Run ``model(tokens)`` until every site has fired; returns ``{site: [B, T, d]}``."""
    points = {site: resolve_site(model, site) for site in sites}
    out: dict[str, torch.Tensor] = {}

    def record(site: str) -> Callable[[torch.Tensor], None]:
        def fn(h: torch.Tensor) -> None:
            out[site] = h
            if len(out) == len(sites):
                raise _StopForward

        return fn

    handles = [point.hook(record(site)) for site, point in points.items()]
    try:
        model(tokens)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(sites) - set(out)
    if missing:
        raise UserError(f"sites {sorted(missing)} never ran in the forward pass")
    return out


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
