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
from .models.hf_layouts import hf_layout

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
        return SitePoint(*layout.locate(model, int(match.group(1)), match.group(2)))
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
