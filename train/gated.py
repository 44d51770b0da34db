"""Gated SAE (Rajamanoharan et al. 2024) with r_mag weight tying, and the rescale & shift baseline.

    x_c = x - b_dec,   π_gate = x_c W_enc + b_gate,   π_mag = exp(r_mag) ⊙ (x_c W_enc) + b_mag
    f = 1[π_gate > 0] ⊙ ReLU(π_mag),   x̂ = f W_dec + b_dec
    Loss = ||x - x̂||² + λ ||ReLU(π_gate)||₁ + ||x - (ReLU(π_gate) sg(W_dec) + sg(b_dec))||²

(means over the batch, x normalized to E||x||² = d). W_enc is W_gate (the SAELens name); one GEMM
serves both paths and ``kernels.gated`` is its epilogue. The auxiliary term reaches W_enc,
b_gate and, through x_c, b_dec, but never the decoder. Decoder rows stay unit-norm; Adam
β = (0, 0.999); λ warms up over the first 5% of steps. Init: W_enc = (2d/n) W_decᵀ,
b_gate = r_mag = b_mag = 0. The factor 2d/n (``encoder_init_scale``) makes the initial
reconstruction about the input's size: with unit decoder rows and W_enc = c W_decᵀ, about half
the latents fire on any x_c and the component of f W_dec along x_c is ≈ c n/(2d) x_c, so
W_enc = W_decᵀ (c = 1) started 8x too large at n = 16d. Default λ = 2 (``default_sparsity_coeff``,
used when the config's λ is 0). Folding the input scale s into saved weights scales W_enc only:
π_gate and π_mag are unchanged.

Ablations (registered architectures, training-time changes only):

- ``gated_noaux``: the same SAE without the auxiliary term. The gate path then gets gradients
  only from the L1 term (b_gate) and, through the shared W_enc, from the magnitude path.
- ``gated_sigmoid``: the Heaviside replaced by a sigmoid, f = σ(π_gate) ⊙ ReLU(π_mag), so the
  reconstruction reaches the gate directly and the L1 term applies to f itself:
  Loss = ||x - x̂||² + λ ||f||₁ (no auxiliary term; it existed only to give the gate a gradient).
  SAELens has no sigmoid gate, so this one is not exportable (``saelens = None``).

Rescale & shift (``rescale_shift``): a trained ReLU SAE rewritten exactly as a Gated SAE whose
magnitude path equals its gate path, with everything frozen except r_mag and b_mag.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from flashsae.kernels import gated

from .relu import ReLUSAE
from .sae import SAE, SAEConfig, SAELensLayout, l0_of, normalized_mse, register


def encoder_init_scale(d: int, n: int) -> float:
    """c = 2d/n in W_enc = c W_decᵀ: with unit decoder rows and about half of n latents firing,
    the initial reconstruction then has about the input's norm (see the module docstring)."""
    return 2 * d / n


@register("gated")
class GatedSAE(SAE):
    saelens = SAELensLayout("gated", ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"), True)
    default_sparsity_coeff = 2.0
    adam_betas = (0.0, 0.999)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        n = cfg.n_latents
        c = encoder_init_scale(cfg.d, n)
        self.W_enc = nn.Parameter((c * self.W_dec.detach().T).contiguous())
        self.b_gate = nn.Parameter(torch.zeros(n))
        self.r_mag = nn.Parameter(torch.zeros(n))
        self.b_mag = nn.Parameter(torch.zeros(n))

    def encode_paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, ReLU(π_gate)), both [B, n]."""
        return gated((x - self.b_dec) @ self.W_enc, self.b_gate, self.r_mag, self.b_mag)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_paths(x)[0]

    use_aux: bool = True  # the frozen-decoder auxiliary term (``gated_noaux``: False)

    def loss_terms(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({mse, l1, aux, fvu}, each a differentiable batch mean but the batch's FVU; f)."""
        f, gate = self.encode_paths(x)
        x_hat = self.decode(f)
        mse = (x - x_hat).square().sum(1).mean()
        l1 = gate.sum(1).mean()
        via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x - via_gate).square().sum(1).mean()
        return {"mse": mse, "l1": l1, "aux": aux, "fvu": normalized_mse(x, x_hat)}, f

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        terms, f = self.loss_terms(x)
        lam = self.sparsity_coeff_at(progress)
        loss = terms["mse"] + lam * terms["l1"] + (terms["aux"] if self.use_aux else 0)
        parts = {k: v.detach() for k, v in terms.items()}
        parts["l0"] = l0_of(f).detach()
        return loss, parts, (f > 0).any(0)


@register("gated_noaux")
class GatedNoAuxSAE(GatedSAE):
    """Ablation: the Gated SAE trained without the auxiliary term (the ``aux`` part is still
    computed and logged, but not optimized). Inference and export are the Gated SAE's."""

    use_aux = False


@register("gated_sigmoid")
class GatedSigmoidSAE(GatedSAE):
    """Ablation: f = σ(π_gate) ⊙ ReLU(π_mag); Loss = ||x - x̂||² + λ ||f||₁ (no auxiliary term).

    L0 counts f_i > 0, i.e. π_mag > 0: the smooth gate scales magnitudes, it shuts nothing."""

    saelens = None  # SAELens has no sigmoid gate: not exportable
    use_aux = False

    def encode_paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, f): the L1 term applies to f itself."""
        pre = (x - self.b_dec) @ self.W_enc
        gate = torch.sigmoid(pre + self.b_gate)
        f = gate * torch.relu(self.r_mag.exp() * pre + self.b_mag)
        return f, f


@torch.no_grad()
def rescale_shift(relu: ReLUSAE) -> GatedSAE:
    """The rescale & shift baseline of a trained ReLU SAE: a Gated SAE computing the same x̂,
    with only r_mag and b_mag trainable (requires_grad), so training it learns a per-latent
    rescale and shift of the frozen ReLU encoder's magnitudes.

    With norms c_i = ||W_dec[i]||: W_enc ← W_enc c, b_gate ← (b_enc + b_dec W_enc) c,
    W_dec ← W_dec / c (unit rows), r_mag = 0, b_mag = b_gate; then f_gated = c ⊙ f_relu.
    """
    norms = relu.W_dec.norm(dim=1).clamp_min(1e-12)
    sae = GatedSAE(replace(relu.cfg, arch="gated")).to(relu.W_dec.device)
    sae.W_enc.copy_(relu.W_enc * norms)
    sae.b_gate.copy_((relu.b_enc + relu.b_dec @ relu.W_enc) * norms)
    sae.b_mag.copy_(sae.b_gate)
    sae.W_dec.copy_(relu.W_dec / norms[:, None])
    sae.b_dec.copy_(relu.b_dec)
    for p in (sae.W_enc, sae.b_gate, sae.W_dec, sae.b_dec):
        p.requires_grad_(False)
    sae.unit_norm_decoder = False  # frozen unit rows: renormalizing would only add rounding
    return sae
