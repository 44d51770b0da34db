"""Sparse autoencoder modules, their checkpoints, and ``load_sae``.

Parameters are stored as in SAELens: encoder weights [d, n], W_dec [n, d] (row i
is latent i's decoder direction), b_dec [d]; every architecture decodes with
x̂ = f W_dec + b_dec. Architectures register in ``checkpoint.SAE_CLASSES``.

TopK SAE (Gao et al. 2024):

    z = (x - b_dec) W_enc + b_enc,   f = ReLU(TopK_k(z))

Loss = ||x - x̂||² / E||x - μ||² + α AuxK, where AuxK is the same normalized MSE
of reconstructing e = sg(x - x̂) from the top k_aux pre-activations of dead
latents (α = 1/32, k_aux = d/2). Decoder rows stay unit-norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flashsae.kernels import (
    encode_topk,
    normalize_decoder_,
    remove_parallel_grad_,
    sparse_decode,
    topk,
)


@dataclass
class SAEConfig:
    """What a checkpoint's ``cfg.json`` holds (plus the flashsae version)."""

    arch: str
    d: int
    n_latents: int
    k: int = 0  # active latents per token (TopK family)
    k_aux: int = 0  # AuxK latents (TopK family)
    aux_alpha: float = 1 / 32
    sparsity_coeff: float = 0.0  # λ of the L1 / L0 penalties
    site: str = ""
    model: str = ""
    input_scale: float = 1.0  # multiply raw activations by this before the SAE (1 once folded)


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - mean(x)||² over the batch."""
    return (x - x_hat).square().sum() / (x - x.mean(0)).square().sum().clamp_min(1e-12)


def fired_latents(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` bool: latents with a positive value in the batch's sparse codes."""
    fired = torch.zeros(n, dtype=torch.bool, device=indices.device)
    return fired.index_fill_(0, indices[values > 0].long(), True)


class SAE(nn.Module):
    """Base class: a unit-norm decoder shared by all architectures; subclasses add the encoder
    (``encode``) and the loss (``training_loss``), and may override the optimizer defaults."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    lr_warmup_frac: float = 0.0  # lr rises linearly over this first fraction of steps
    lr_decay_frac: float = 0.2  # and decays linearly to 0 over this last fraction
    unit_norm_decoder: bool = True
    scaled_inputs: tuple[str, ...] = ("W_enc",)  # weights multiplied by the input scale on save

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w_dec = torch.randn(cfg.n_latents, cfg.d)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents f [B, n]."""
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(loss, its detached parts, [n] bool of latents that fired) for a batch; ``progress``
        is the fraction of training done (for warm-ups)."""
        raise NotImplementedError

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the decoder gradient component parallel to each (unit) row."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            remove_parallel_grad_(self.W_dec, self.W_dec.grad)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.unit_norm_decoder:
            normalize_decoder_(self.W_dec)

    @torch.no_grad()
    def init_b_dec(self, mean: torch.Tensor) -> None:
        self.b_dec.copy_(mean)

    @torch.no_grad()
    def folded(self) -> dict[str, torch.Tensor]:
        """Weights acting on raw activations, with the input scale s folded in.

        With x' = s·x: encoder weights ← s·W, W_dec ← W_dec / s, b_dec ← b_dec / s, and
        f unchanged, so thresholds and biases of the latents stay as they are.
        """
        s = self.cfg.input_scale
        out = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for name in self.scaled_inputs:
            out[name] *= s
        out["W_dec"] /= s
        out["b_dec"] /= s
        return out


class TopKSAE(SAE):
    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latents per row: (values [B, k], int32 indices [B, k])."""
        return encode_topk(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        f = torch.zeros(x.shape[0], self.cfg.n_latents, device=x.device, dtype=vals.dtype)
        return f.scatter(1, idx.long(), vals)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        return sparse_decode(vals, idx, self.W_dec, self.b_dec)

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        vals, idx = self.encode_sparse(x)
        x_hat = sparse_decode(vals, idx, self.W_dec, self.b_dec)
        mse = normalized_mse(x, x_hat)
        dead = dead_mask.nonzero().squeeze(1)
        k_live = min(self.cfg.k_aux, dead.numel())
        if k_live:  # AuxK over the dead columns only
            z_dead = (x - self.b_dec) @ self.W_enc[:, dead] + self.b_enc[dead]
            aux_vals, slots = topk(z_dead.contiguous(), k_live)
            e = (x - x_hat).detach()
            e_hat = sparse_decode(
                aux_vals, dead.int()[slots.long()], self.W_dec, torch.zeros_like(self.b_dec)
            )
            aux = normalized_mse(e, e_hat)
        else:
            aux = torch.zeros((), device=x.device)
        loss = mse + self.cfg.aux_alpha * aux
        parts = {"mse": mse.detach(), "aux": aux.detach()}
        return loss, parts, fired_latents(idx, vals, self.cfg.n_latents)
