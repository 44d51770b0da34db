"""ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic, April 2024 update).

    f = ReLU(x W_enc + b_enc),   x̂ = f W_dec + b_dec
    Loss = ||x - x̂||² + λ Σ_i f_i ||W_dec[i]||   (mean over the batch, x normalized to E||x||² = d)

No unit-norm constraint: the penalty weights each latent by its decoder norm instead. W_dec rows
start with norm 0.1, W_enc = W_decᵀ, b_enc = 0; λ warms up linearly over the first 5% of steps,
the learning rate decays linearly over the last 20%, gradients are clipped at norm 1.
Default λ = 2 (``default_sparsity_coeff``, used when the config's λ is 0): L0 ≈ 40 on the bundled
model's default site (n = 2048, 1M tokens in batches of 1024, lr 1e-3; bench/results/arch_sweep.md).
"""

from __future__ import annotations

import torch
from torch import nn

from .sae import SAE, SAEConfig, SAELensLayout, l0_of, normalized_mse, register


@register("relu")
class ReLUSAE(SAE):
    saelens = SAELensLayout("standard", ("W_enc", "b_enc", "W_dec", "b_dec"), False)
    default_sparsity_coeff = 2.0
    grad_clip = 1.0
    unit_norm_decoder = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        with torch.no_grad():
            self.W_dec.mul_(0.1)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, x, self.W_enc).relu()

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        f = self.encode(x)
        x_hat = self.decode(f)
        mse = (x - x_hat).square().sum(1).mean()
        l1 = (f @ self.W_dec.norm(dim=1)).mean()
        loss = mse + self.sparsity_coeff_at(progress) * l1
        parts = {"mse": mse, "l1": l1, "fvu": normalized_mse(x, x_hat), "l0": l0_of(f)}
        return loss, {k: v.detach() for k, v in parts.items()}, (f > 0).any(0)
