"""JumpReLU SAE (Rajamanoharan et al. 2024b) with a learned threshold per latent.

    z = x W_enc + b_enc,   f = z ⊙ H(z - θ),   x̂ = f W_dec + b_dec
    Loss = ||x - x̂||² + λ Σ_i H(z_i - θ_i)   (mean over the batch, x normalized to E||x||² = d)

θ learns only through the straight-through pseudo-derivatives of ``kernels.jumprelu``
(rectangle kernel, bandwidth ε = 1e-3), z through the true gradients. Init: θ = 1e-3,
W_enc = (2d/n) W_decᵀ (so the initial reconstruction has about the input's norm, as for the
Gated SAE: ``gated.encoder_init_scale``), b_enc = -b_dec W_enc (so z = (x - b_dec) W_enc at
the start: the data mean does not push every latent on); decoder rows unit-norm; Adam
β = (0, 0.999) as in the paper; λ warms up over the first 5% of steps. Default λ = 0.2
(``default_sparsity_coeff``, used when the config's λ is 0).

θ = exp(c · theta_param) with c = ``THRESHOLD_LR_SCALE``: positive, and, since Adam moves a
parameter by about lr per step whatever its gradient's scale, log θ learns c times faster than
the other parameters (a per-parameter learning rate through one optimizer). θ must climb from
1e-3 to O(1) (Δ log θ ≈ 7): the papers train for ~10⁵ steps, but in 10³ steps at lr 1e-3 plain
log θ moves by at most ~1, and the SAE stays dense (a pilot on the bundled model with plain log θ,
256 steps, λ = 0.2: L0 ≈ 260, 46% of latents dense; with c = 16 and 1024 steps: L0 ≈ 47).
Checkpoints hold ``threshold`` (as in SAELens); the input scale folds into W_enc alone, since
z, and so θ, is unchanged (b_dec is not subtracted from x here).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flashsae.kernels import BANDWIDTH, jumprelu

from .gated import encoder_init_scale
from .sae import SAE, SAEConfig, SAELensLayout, normalized_mse, register

THRESHOLD_INIT = 1e-3
THRESHOLD_LR_SCALE = 16.0  # c in θ = exp(c · theta_param)


def _threshold_from_checkpoint(module: nn.Module, state: dict, prefix: str, *_args: object) -> None:
    """load_state_dict pre-hook: a checkpoint's ``threshold`` becomes ``theta_param``."""
    if prefix + "threshold" in state:
        state[prefix + "theta_param"] = state.pop(prefix + "threshold").log() / THRESHOLD_LR_SCALE


@register("jumprelu")
class JumpReLUSAE(SAE):
    saelens = SAELensLayout("jumprelu", ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"), False)
    default_sparsity_coeff = 0.2
    adam_betas = (0.0, 0.999)
    bandwidth: float = BANDWIDTH  # ε of the pseudo-derivatives (an instance may set another)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        n = cfg.n_latents
        c = encoder_init_scale(cfg.d, n)
        self.W_enc = nn.Parameter((c * self.W_dec.detach().T).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n))
        log_theta = math.log(THRESHOLD_INIT) / THRESHOLD_LR_SCALE
        self.theta_param = nn.Parameter(torch.full((n,), log_theta))
        self.register_load_state_dict_pre_hook(_threshold_from_checkpoint)

    @torch.no_grad()
    def init_b_dec(self, mean: torch.Tensor) -> None:
        """b_dec = mean, and b_enc = -mean W_enc, so that z = (x - mean) W_enc at the start."""
        super().init_b_dec(mean)
        self.b_enc.copy_(-mean @ self.W_enc)

    @property
    def threshold(self) -> torch.Tensor:
        return torch.exp(THRESHOLD_LR_SCALE * self.theta_param)

    @torch.no_grad()
    def folded(self) -> dict[str, torch.Tensor]:
        """As ``SAE.folded``, with ``threshold`` = θ in place of ``theta_param`` (the state_dict
        keeps the parameter itself, so that resumed training is exact)."""
        out = super().folded()
        out["threshold"] = torch.exp(THRESHOLD_LR_SCALE * out.pop("theta_param"))
        return out

    def encode_l0(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f [B, n], L0 count per row [B])."""
        return jumprelu(x @ self.W_enc, self.b_enc, self.threshold, self.bandwidth)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_l0(x)[0]

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        f, l0 = self.encode_l0(x)
        x_hat = self.decode(f)
        mse = (x - x_hat).square().sum(1).mean()
        l0 = l0.mean()
        loss = mse + self.sparsity_coeff_at(progress) * l0
        parts = {"mse": mse, "l0": l0, "fvu": normalized_mse(x, x_hat)}
        return loss, {k: v.detach() for k, v in parts.items()}, (f > 0).any(0)
