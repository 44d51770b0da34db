"""Evaluation metrics, accumulated as pooled sums.

x is the SAE input after the run's normalization, x̂ its reconstruction, f the
latent activations, μ the per-dimension mean of x over the whole evaluation set.

- L0 = mean over tokens of #{i : f_i > 0}
- FVU = Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - μ||²  (pooled; explained variance = 1 - FVU)
- MSE = mean over tokens and dimensions of (x - x̂)²
- cosine = mean_t cos(x_t, x̂_t); L2 ratio = mean_t ||x̂_t|| / ||x_t||
- γ = E||x̂||² / E[x·x̂] (relative reconstruction bias; γ < 1 means shrinkage)
- dead / dense fraction = latents firing on 0 / more than 10% of evaluation tokens
- CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean); Δ-LM loss =
  CE_sae - CE_clean; KL = mean_t KL(p_clean || p_sae)

CE loss recovered is a ratio with CE_zero - CE_clean below it: when zero-ablating the site
costs the model less than ``CE_GAP_MIN`` = 0.1 nats (an untrained model, a site the output
barely depends on) the ratio is noise (a random model gives 2.12). It is still reported, with
a warning from ``metric_warnings``; it is None when the gap is exactly 0.

A model without a causal-LM head (an encoder checkpoint, loaded as its base model) has no
next-token metrics: CE, KL and Δ-LM are None, and ``metric_warnings`` gives the reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DENSE_THRESHOLD = 0.1
CE_GAP_MIN = 0.1  # nats of CE_zero - CE_clean below which CE loss recovered gets a warning
METRIC_KEYS = (
    "l0 fvu explained_variance mse cosine l2_ratio gamma dead_frac dense_frac "
    "ce_loss_recovered delta_lm_loss kl"
).split()  # the keys of metrics.json and eval.json
# what SpliceStats.result gives; all None (with a reason) for a model without a causal-LM head
LM_KEYS = ("ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "delta_lm_loss", "kl")


class ReconstructionStats:
    """Pooled float64 sums over evaluation batches of (x, x̂, f)."""

    def __init__(self, d: int, n: int) -> None:
        self.tokens = 0
        self.sum_x = torch.zeros(d, dtype=torch.float64)
        self.sum_sq_x = 0.0
        self.sum_sq_err = 0.0
        self.sum_sq_xhat = 0.0
        self.sum_dot = 0.0
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0
        self.active = 0
        self.fired = torch.zeros(n, dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        """Add a batch: ``x``, ``x_hat`` are ``[B, d]``, ``f`` is ``[B, n]`` (dense latents)."""
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        fired = (f > 0).cpu()
        norm_x, norm_xhat = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.tokens += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_sq_x += x.square().sum().item()
        self.sum_sq_err += (x - x_hat).square().sum().item()
        self.sum_sq_xhat += x_hat.square().sum().item()
        self.sum_dot += (x * x_hat).sum().item()
        self.sum_cos += F.cosine_similarity(x, x_hat, dim=-1).sum().item()
        self.sum_l2_ratio += (norm_xhat / norm_x.clamp_min(1e-12)).sum().item()
        self.active += fired.sum().item()
        self.fired += fired.sum(0).double()

    def result(self) -> dict[str, float]:
        t, d = self.tokens, self.sum_x.numel()
        mu = self.sum_x / t
        total_var = self.sum_sq_x - t * mu.square().sum().item()  # Σ_t ||x_t - μ||²
        fvu = self.sum_sq_err / total_var
        freq = self.fired / t
        return {
            "l0": self.active / t,
            "fvu": fvu,
            "explained_variance": 1 - fvu,
            "mse": self.sum_sq_err / (t * d),
            "cosine": self.sum_cos / t,
            "l2_ratio": self.sum_l2_ratio / t,
            "gamma": self.sum_sq_xhat / self.sum_dot,
            "dead_frac": (freq == 0).double().mean().item(),
            "dense_frac": (freq > DENSE_THRESHOLD).double().mean().item(),
        }

    def firing_frequencies(self) -> torch.Tensor:
        return self.fired / self.tokens


class SpliceStats:
    """Pooled next-token cross-entropies and KL: clean, SAE spliced in, and zero-ablated."""

    def __init__(self) -> None:
        self.tokens = 0
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = 0.0

    @torch.no_grad()
    def update(
        self, targets: torch.Tensor, logits: dict[str, torch.Tensor], mask: torch.Tensor
    ) -> None:
        """``logits[name]`` are ``[B, T, V]`` predictions of ``targets`` ``[B, T]``; ``mask``
        selects the positions that count (BOS and padding excluded)."""
        mask = mask.reshape(-1)
        flat = {k: v.reshape(-1, v.shape[-1])[mask].double() for k, v in logits.items()}
        tgt = targets.reshape(-1)[mask]
        self.tokens += tgt.numel()
        for name, lg in flat.items():
            self.ce[name] += F.cross_entropy(lg, tgt, reduction="sum").item()
        logp_clean = flat["clean"].log_softmax(-1)
        logp_sae = flat["sae"].log_softmax(-1)
        self.kl += (logp_clean.exp() * (logp_clean - logp_sae)).sum().item()

    def result(self) -> dict[str, float]:
        ce = {k: v / self.tokens for k, v in self.ce.items()}
        gap = ce["zero"] - ce["clean"]
        return {
            "ce_clean": ce["clean"],
            "ce_sae": ce["sae"],
            "ce_zero": ce["zero"],
            "ce_loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap != 0 else None,
            "delta_lm_loss": ce["sae"] - ce["clean"],
            "kl": self.kl / self.tokens,
        }


def metric_warnings(results: dict) -> list[str]:
    """Why some of ``results`` (``SpliceStats.result`` keys) are missing or should not be
    trusted: the next-token metrics are None (``lm_metrics_skipped`` says why), or CE loss
    recovered has CE_zero - CE_clean < ``CE_GAP_MIN``."""
    if results.get("lm_metrics_skipped"):
        return [f"CE loss recovered, Δ-LM loss and KL are null: {results['lm_metrics_skipped']}"]
    gap = results["ce_zero"] - results["ce_clean"]
    if gap >= CE_GAP_MIN:
        return []
    value = results["ce_loss_recovered"]
    shown = "undefined" if value is None else f"{value:.4g}"
    return [
        f"CE loss recovered ({shown}) is unreliable: zero-ablating the site raises the loss by "
        f"only {gap:.4g} nats (CE_zero - CE_clean < {CE_GAP_MIN})"
    ]
