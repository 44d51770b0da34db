"""TopK SAE (Gao et al. 2024).

    z = (x - b_dec) W_enc + b_enc,   f = ReLU(TopK_k(z)),   x̂ = f W_dec + b_dec

Loss = ||x - x̂||² / E||x - μ||² + α AuxK, where AuxK is the same normalized MSE of
reconstructing e = sg(x - x̂) from the top k_aux pre-activations of dead latents (α = 1/32,
k_aux = d/2). Decoder rows stay unit-norm. Init: W_enc = W_decᵀ, b_enc = 0.
"""

from __future__ import annotations

import torch
from torch import nn

from flashsae.kernels import encode_topk, sparse_decode

from .sae import SAE, SAEConfig, SAELensLayout, auxk_loss, fired_latents, normalized_mse, register


@register("topk")
class TopKSAE(SAE):
    saelens = SAELensLayout("topk", ("W_enc", "b_enc", "W_dec", "b_dec"), True)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latents per row: (values [B, k], int32 indices [B, k])."""
        vals, idx = encode_topk(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k)[:2]
        return vals, idx

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
        aux = auxk_loss(
            x - self.b_dec, (x - x_hat).detach(), self.W_enc, self.b_enc, self.W_dec,
            dead_mask, self.cfg.k_aux, self.dead_budget,
        )  # fmt: skip
        loss = mse + self.cfg.aux_alpha * aux
        parts = {"mse": mse.detach(), "aux": aux.detach(), "fvu": mse.detach()}
        return loss, parts, fired_latents(idx, vals, self.cfg.n_latents)
