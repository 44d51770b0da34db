"""Evaluate an SAE on held-out activations, and spliced back into its model at its site."""

from __future__ import annotations

from functools import partial

import torch
from tqdm.auto import tqdm

from flashsae.cache.capture import capture, splice

from .metrics import ReconstructionStats, SpliceStats
from .sae import TopKSAE


def _replace_after(skip_first: int, new: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h`` ``[B, T, d]`` with positions from ``skip_first`` on replaced by rows of ``new``."""
    h = h.clone()
    h[:, skip_first:] = new.reshape(h[:, skip_first:].shape).to(h.dtype)
    return h


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[B, T, V]`` from a bundled model or a Hugging Face model."""
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate(
    sae: TopKSAE,
    model: torch.nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 32,
    skip_first: int = 1,
) -> tuple[dict[str, float], torch.Tensor]:
    """All metrics of ``metrics.py`` over ``sequences`` ``[S, T]``; also returns firing frequencies.

    The first ``skip_first`` positions (BOS) are excluded everywhere and never spliced.
    """
    site, scale = sae.cfg.site, sae.cfg.input_scale
    device = sae.W_dec.device
    rec = ReconstructionStats(sae.cfg.d, sae.cfg.n_latents)
    lm = SpliceStats()
    for batch in tqdm(sequences.split(batch_size), desc="evaluating", unit="batch"):
        batch = batch.to(device)
        h = capture(model, batch, [site])[site]
        x = h[:, skip_first:].reshape(-1, h.shape[-1]).float() * scale
        f = sae.encode(x)
        x_hat = sae.decode(f)
        rec.update(x, x_hat, f)

        logits = {"clean": logits_of(model, batch)}
        for name, new in (("sae", x_hat / scale), ("zero", torch.zeros_like(x_hat))):
            with splice(model, site, partial(_replace_after, skip_first, new)):
                logits[name] = logits_of(model, batch)
        # logits at position t predict token t + 1; positions before skip_first don't count
        mask = torch.zeros(batch.shape[0], batch.shape[1] - 1, dtype=torch.bool, device=device)
        mask[:, skip_first:] = True
        lm.update(batch[:, 1:], {k: v[:, :-1] for k, v in logits.items()}, mask)
    return {**rec.result(), **lm.result()}, rec.firing_frequencies()
