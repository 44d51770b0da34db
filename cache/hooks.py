"""Forward hooks at named sites: read activations (``capture``) or replace them (``splice``).

A site is a module path in the model (``blocks.3.hook_resid_post`` in the bundled
model, where every TransformerLens site is an identity module), or a TransformerLens
name mapped onto a Hugging Face model's modules (``models/hf_layouts.py``). ``capture``
stops the forward pass as soon as every requested site has fired, so later layers never run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import UserError
from .models.hf_layouts import HOOKS, hf_layout

SITE_PATTERN = re.compile(rf"blocks\.(\d+)\.hook_({'|'.join(HOOKS)})")


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass early."""


class _Handles:
    """Several hook handles removed together."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class SitePoint:
    """Where a site's tensor lives: the output of ``module``, or its first input. When
    ``rows_of`` is set, ``module`` sees the tokens flattened to ``[B*T, d]`` rows (OPT's MLP),
    and ``fn`` gets (and returns) them as ``[B, T, d]``, the shape of ``rows_of``'s input."""

    module: nn.Module
    kind: str = "output"  # or "input"
    rows_of: nn.Module | None = None

    def hook(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> _Handles:
        """Call ``fn(h)`` on the site's tensor h; a returned tensor replaces h."""
        extra = []
        if self.rows_of is not None:
            shape: list[torch.Size] = []

            def on_block(module: nn.Module, args: tuple, kwargs: dict) -> None:
                h = args[0] if args else kwargs["hidden_states"]
                shape[:] = [h.shape]

            def unflat(h: torch.Tensor, inner: Callable = fn) -> torch.Tensor | None:
                new = inner(h.view(shape[0]))
                return None if new is None else new.reshape(h.shape)

            extra.append(self.rows_of.register_forward_pre_hook(on_block, with_kwargs=True))
            fn = unflat
        if self.kind == "output":

            def on_output(module: nn.Module, args: tuple, out: object) -> object:
                h = out[0] if isinstance(out, tuple) else out
                new = fn(h)
                if new is None:
                    return None
                return (new, *out[1:]) if isinstance(out, tuple) else new

            return _Handles(*extra, self.module.register_forward_hook(on_output))

        def on_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            new = fn(args[0] if args else kwargs["hidden_states"])
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return _Handles(*extra, self.module.register_forward_pre_hook(on_input, with_kwargs=True))


def block_lists(model: nn.Module) -> list[tuple[str, int]]:
    """``(path, length)`` of each ModuleList in ``model`` whose entries are all of one class
    (the transformer blocks, among others), outermost first."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1:
                found.append((name, len(module)))
    return found


def enclosing_block(model: nn.Module, module: nn.Module) -> tuple[nn.ModuleList, int] | None:
    """``(blocks, i)``: the outermost ModuleList of ``block_lists`` whose block ``i`` is
    ``module`` or holds it; None when no block does (an embedding, the final norm)."""
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    for path, _n in block_lists(model):
        for i, block in enumerate(lists[path]):
            if any(m is module for m in block.modules()):
                return lists[path], i
    return None


def _module_candidates(model: nn.Module, site: str) -> list[str]:
    """``site`` as a module path, with or without the base model's prefix (``bert.``), so a
    path works whether the checkpoint was loaded with its head or as the bare base model."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, "base_model", model) is model:
        return [site, site.removeprefix(f"{prefix}.")] if prefix else [site]
    return [site, f"{prefix}.{site}"]


def resolve_site(model: nn.Module, site: str) -> SitePoint:
    """Where ``site`` is in ``model``: a module path, or a TransformerLens name mapped through
    the model's Hugging Face layout; a UserError listing the valid names and the model's block
    modules otherwise."""
    modules = dict(model.named_modules())
    for path in _module_candidates(model, site):
        if path in modules:
            return SitePoint(modules[path])
    layout = hf_layout(model)
    match = SITE_PATTERN.fullmatch(site)
    if layout is not None and match:
        return SitePoint(*layout.locate(model, int(match.group(1)), match.group(2)))
    hints = []
    if layout is not None:
        hooks = ",".join(layout.hooks())
        hints.append(f"blocks.{{0..{layout.n_layers(model) - 1}}}.hook_{{{hooks}}}")
    elif "blocks.0.hook_resid_post" in modules:  # the bundled model: every site is a module
        n_layers = sum(1 for name in modules if re.fullmatch(r"blocks\.\d+", name))
        hints.append(
            f"blocks.{{0..{n_layers - 1}}}.hook_{{resid_pre,resid_mid,resid_post,attn_out,mlp_out}}"
        )
    lists = [f"{path}.{{0..{n - 1}}}" for path, n in block_lists(model) if path]
    if lists:
        hints.append("module paths such as " + ", ".join(lists[:4]))
    hints.append("any name from model.named_modules()")
    raise UserError(f"unknown site {site!r}; this model's sites are " + "; ".join(hints))


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
