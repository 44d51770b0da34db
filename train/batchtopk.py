"""BatchTopK SAE (Bussmann et al. 2024) and Matryoshka BatchTopK SAE (Bussmann et al. 2025).

    z = (x - b_dec) W_enc + b_enc
    training:  f = BatchTopK_k(z), the B·k largest entries of the batch, ReLU'd
    inference: f = z ⊙ 1[z > θ], θ = EMA of the smallest kept positive activation in training

Loss, parameters, init and AuxK as for TopK (normalized MSE + α AuxK, the k_aux largest
pre-activations of dead latents per row; unit-norm decoder rows). θ is a buffer saved with the
checkpoint as ``threshold``, its whole state: it starts at 0 (unset), the first step sets it to
that step's minimum, later steps move it by an EMA with decay ``THRESHOLD_DECAY``. θ acts on z,
so folding the input scale into W_enc and b_dec leaves it unchanged.

Matryoshka: the latents are split into nested prefixes of sizes n/16, n/8, n/4, n/2 and n (group
sizes n/16, n/16, n/8, n/4, n/2: each group doubles the dictionary), and the reconstruction loss
is the mean over prefixes of the normalized MSE of x̂_m = f[:, :m] W_dec[:m] + b_dec, so early
latents must reconstruct on their own. One BatchTopK selection over all latents serves every
prefix; AuxK uses the full reconstruction.
"""

from __future__ import annotations

import torch
from torch import nn

from flashsae.kernels import batch_topk

from .sae import SAE, SAEConfig, SAELensLayout, auxk_loss, normalized_mse, register

THRESHOLD_DECAY = 0.99
MATRYOSHKA_FRACTIONS = (16, 8, 4, 2, 1)  # prefix m = n // fraction


@torch.no_grad()
def ema_threshold_(theta: torch.Tensor, min_kept: torch.Tensor) -> None:
    """EMA step of θ (in place) towards ``min_kept``; θ = 0 means unset, and takes ``min_kept``
    as is. A batch without a positive kept value (min_kept = 0) leaves θ unchanged."""
    m = min_kept.float()
    new = torch.where(theta > 0, theta + (1 - THRESHOLD_DECAY) * (m - theta), m)
    theta.copy_(torch.where(m > 0, new, theta))


@register("batchtopk")
class BatchTopKSAE(SAE):
    saelens = SAELensLayout(
        "jumprelu", ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"), True, scalar_threshold=True
    )

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.register_buffer("threshold", torch.zeros(()))

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference latents: z where z > θ, else 0 (θ >= 0: f = ReLU(z) until θ is set)."""
        z = self.preactivations(x)
        return torch.where(z > self.threshold, z, 0)

    def reconstruction_loss(
        self, x: torch.Tensor, f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, x̂, extra logged parts): the normalized MSE."""
        x_hat = self.decode(f)
        mse = normalized_mse(x, x_hat)
        return mse, x_hat, {}

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        z = self.preactivations(x)
        f, min_kept = batch_topk(z, self.cfg.k)
        ema_threshold_(self.threshold, min_kept)
        rec, x_hat, extra = self.reconstruction_loss(x, f)
        aux = auxk_loss(
            x - self.b_dec, (x - x_hat).detach(), self.W_enc, self.b_enc, self.W_dec,
            dead_mask, self.cfg.k_aux, self.dead_budget, preacts=z,
        )  # fmt: skip
        loss = rec + self.cfg.aux_alpha * aux
        fvu = normalized_mse(x, x_hat).detach()
        parts = {"mse": fvu, "aux": aux.detach(), "fvu": fvu, **extra}
        return loss, parts, (f > 0).any(0)


def matryoshka_prefixes(n: int) -> list[int]:
    """Nested prefix sizes n/16, n/8, n/4, n/2, n (distinct and nonzero)."""
    return sorted({n // q for q in MATRYOSHKA_FRACTIONS if n // q > 0})


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    def reconstruction_loss(
        self, x: torch.Tensor, f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Mean over the nested prefixes of the normalized MSE of their reconstructions."""
        x_hat = self.b_dec.expand_as(x)
        losses, start = [], 0
        for end in matryoshka_prefixes(self.cfg.n_latents):
            x_hat = x_hat + f[:, start:end] @ self.W_dec[start:end]
            losses.append(normalized_mse(x, x_hat))
            start = end
        loss = torch.stack(losses).mean()
        return loss, x_hat, {"prefix_mse": loss.detach()}
