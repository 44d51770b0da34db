"""JumpReLU SAEs with a learned threshold per latent, in two recipes:

    z = x W_enc + b_enc,   f = z ⊙ H(z - θ),   x̂ = f W_dec + b_dec
    jumprelu:       Loss = ||x - x̂||² + λ Σ_i tanh(c f_i) + λ_p Σ_i ReLU(sg(θ_i) - z_i)
    jumprelu_step:  Loss = ||x - x̂||² + λ Σ_i H(z_i - θ_i)
    (mean over the batch, x normalized to E||x||² = d; decoder rows unit-norm; sg: no gradient)

``jumprelu_step`` is the JumpReLU paper's L0 penalty (Rajamanoharan et al. 2024b) with its
settings: bandwidth ε = 1e-3, θ initialised to 1e-3. ``jumprelu`` follows Anthropic's January
2025 update: a saturating penalty (c = 4; their ||W_dec,i|| factor is 1 here) and a
pre-activation loss (λ_p = 1e-3) that pushes z up towards θ wherever a latent does not fire, so
latents do not die; ε = 2, θ initialised to 0.1. In both, θ learns only through the
straight-through pseudo-derivatives of ``kernels.jumprelu`` (rectangle kernel of width ε), z
through the true gradients.

Why two: the step penalty's gradient reaches only θ, through the pseudo-derivative, so the SAE
gets sparser only as fast as Adam moves θ, and in short runs λ stops mattering: on bytelm-tiny
(n = 512, 384 steps) ``jumprelu_step`` at λ = 0.1 and 0.3 ends at the same L0 (34), which keeps
falling with more steps (5.4 and 2.2 at 3x the steps); the papers train for ~10⁵ steps.
tanh(c f) is differentiable in f, so the encoder itself learns to be sparse: the same runs of
``jumprelu`` at λ 0.01 / 0.03 / 0.1 / 0.3 give L0 41 / 27 / 15 / 6.6 with FVU 0.039 / 0.048 /
0.066 / 0.107, where ``jumprelu_step`` at L0 34 has FVU 0.092 (``bench/arch_sweep.py``; the
runs are in bench/results/arch_sweep.diagnostics.jsonl). Without the pre-activation loss 58-90%
of ``jumprelu``'s latents died there. ``jumprelu_step``'s θ = exp(16 p) lets log θ learn 16
times faster than the other parameters (a per-parameter learning rate through one optimizer),
as θ must climb from 1e-3 to O(1); ``jumprelu``'s θ = exp(p).

Shared: W_enc = (2d/n) W_decᵀ (so the initial reconstruction has about the input's norm, as for
the Gated SAE: ``gated.encoder_init_scale``), b_enc = -b_dec W_enc (so z = (x - b_dec) W_enc at
the start: the data mean does not push every latent on); Adam β = (0, 0.999) as in the paper;
λ warms up over the first 5% of steps. Default λ (``default_sparsity_coeff``, used when the
config's λ is 0): 0.1 for ``jumprelu`` (L0 61, FVU 0.021 on the bundled model at the CLI's
default budget), 0.2 for ``jumprelu_step``. Checkpoints hold ``threshold`` (as in SAELens); the
input scale folds into W_enc alone, since z, and so θ, is unchanged (b_dec is not subtracted
from x here).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flashsae.kernels import jumprelu

from .gated import encoder_init_scale
from .sae import SAE, SAEConfig, SAELensLayout, normalized_mse, register

TANH_SCALE = 4.0  # c in the penalty λ Σ tanh(c f_i)
PREACT_COEFF = 1e-3  # λ_p of jumprelu's pre-activation loss λ_p Σ_i ReLU(sg(θ_i) - z_i)


def _threshold_from_checkpoint(module: nn.Module, state: dict, prefix: str, *_args: object) -> None:
    """load_state_dict pre-hook: a checkpoint's ``threshold`` becomes ``theta_param``."""
    if prefix + "threshold" in state:
        theta = state.pop(prefix + "threshold")
        state[prefix + "theta_param"] = theta.log() / module.threshold_lr_scale


@register("jumprelu")
class JumpReLUSAE(SAE):
    saelens = SAELensLayout("jumprelu", ("W_enc", "b_enc", "threshold", "W_dec", "b_dec"), False)
    default_sparsity_coeff = 0.1
    adam_betas = (0.0, 0.999)
    step_penalty = False  # λ Σ H(z - θ) (jumprelu_step) instead of λ Σ tanh(c f)
    bandwidth: float = 2.0  # ε of the pseudo-derivatives (an instance may set another)
    threshold_init = 0.1
    threshold_lr_scale = 1.0  # c_θ in θ = exp(c_θ · theta_param)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        n = cfg.n_latents
        c = encoder_init_scale(cfg.d, n)
        self.W_enc = nn.Parameter((c * self.W_dec.detach().T).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n))
        log_theta = math.log(self.threshold_init) / self.threshold_lr_scale
        self.theta_param = nn.Parameter(torch.full((n,), log_theta))
        self.register_load_state_dict_pre_hook(_threshold_from_checkpoint)

    @torch.no_grad()
    def init_b_dec(self, mean: torch.Tensor) -> None:
        """b_dec = mean, and b_enc = -mean W_enc, so that z = (x - mean) W_enc at the start."""
        super().init_b_dec(mean)
        self.b_enc.copy_(-mean @ self.W_enc)

    @property
    def threshold(self) -> torch.Tensor:
        return torch.exp(self.threshold_lr_scale * self.theta_param)

    @torch.no_grad()
    def folded(self) -> dict[str, torch.Tensor]:
        """As ``SAE.folded``, with ``threshold`` = θ in place of ``theta_param`` (the state_dict
        keeps the parameter itself, so that resumed training is exact)."""
        out = super().folded()
        out["threshold"] = torch.exp(self.threshold_lr_scale * out.pop("theta_param"))
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return jumprelu(x @ self.W_enc, self.b_enc, self.threshold, self.bandwidth)[0]

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        pre, theta = x @ self.W_enc, self.threshold
        f, l0 = jumprelu(pre, self.b_enc, theta, self.bandwidth)
        x_hat = self.decode(f)
        mse = (x - x_hat).square().sum(1).mean()
        l0 = l0.mean()
        parts = {"mse": mse, "l0": l0, "fvu": normalized_mse(x, x_hat)}
        if self.step_penalty:
            loss = mse + self.sparsity_coeff_at(progress) * l0
        else:
            parts["sparsity"] = torch.tanh(TANH_SCALE * f.float()).sum(1).mean()
            parts["preact"] = torch.relu(theta.detach() - pre.float() - self.b_enc).sum(1).mean()
            loss = mse + self.sparsity_coeff_at(progress) * parts["sparsity"]
            loss = loss + PREACT_COEFF * parts["preact"]
        return loss, {k: v.detach() for k, v in parts.items()}, (f > 0).any(0)


@register("jumprelu_step")
class JumpReLUStepSAE(JumpReLUSAE):
    """The JumpReLU paper's recipe: L0 penalty through the step's pseudo-derivative only."""

    default_sparsity_coeff = 0.2
    step_penalty = True
    bandwidth = 1e-3
    threshold_init = 1e-3
    threshold_lr_scale = 16.0
