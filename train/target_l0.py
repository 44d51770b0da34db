"""``--target-l0 N``: λ steered during training so that the run ends at L0 ≈ N.

A proportional-integral controller on log λ against a running L0. On every step after λ's
warm-up (``sae.SPARSITY_WARMUP``), with the batch's L0 ℓ (the ``l0`` part of the
architecture's loss):

    r ← r + β (ℓ - r)                   running L0 (β = 1 / ``WINDOW``; r starts at ℓ)
    e = clip(log r - log N, ±1)
    I ← I + K_i e
    log λ = log λ₀ + I + K_p e          (K_p = ``PROPORTIONAL``, K_i = ``INTEGRAL``)

L0 falls as λ rises, about as a power of λ, so in log-log space the correction is linear; the
integral term's only fixed point is r = N, and the proportional term answers at once when L0
moves (the SAE's weights follow λ with a lag of tens of steps, which a purely integral
controller overshoots). The clip bounds λ's change while L0 is far from N. λ₀ is the run's
``--sparsity-coeff`` (or the architecture's default). r, I and log λ are 0-dim tensors on the
SAE's device: updating them never waits for the device; the trainer reads them on its logging
steps only.
"""

from __future__ import annotations

import math

import torch

WINDOW = 5  # steps: the running L0's time constant
PROPORTIONAL = 1.0  # K_p, on log λ per unit of log(L0 / N)
INTEGRAL = 0.03  # K_i, per step
SETTLE = 25  # steps: L0 closing the gap at least this fast holds the integral


class L0Controller:
    """λ (``coeff``) adjusted each step from the running L0 towards ``target``."""

    def __init__(self, target: float, coeff: float, device: torch.device) -> None:
        if target <= 0 or coeff <= 0:
            raise ValueError(f"target L0 and λ must be positive, got {target} and {coeff}")
        self.target = target
        self.log_coeff0 = math.log(coeff)
        self.integral = torch.zeros((), device=device)
        self.error = torch.zeros((), device=device)
        self.running_l0 = torch.tensor(-1.0, device=device)  # < 0: no step seen yet

    def coeff(self) -> torch.Tensor:
        """λ now (0-dim, on the device)."""
        return (self.log_coeff0 + self.integral + PROPORTIONAL * self.error).exp()

    @torch.no_grad()
    def update(self, l0: torch.Tensor) -> None:
        """One step's correction from the batch's L0 ``l0`` (0-dim, on the device)."""
        l0 = l0.float()
        r = self.running_l0
        self.running_l0 = r = torch.where(r < 0, l0, r + (l0 - r) / WINDOW)
        error = (r.clamp_min(1e-3).log() - math.log(self.target)).clamp(-1.0, 1.0)
        # anti-windup: while L0 already closes the gap fast enough, λ's integral waits for it
        closing = (self.error - error) * error.sign() >= error.abs() / SETTLE
        self.integral = torch.where(closing, self.integral, self.integral + INTEGRAL * error)
        self.error = error

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"integral": self.integral, "error": self.error, "running_l0": self.running_l0}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device = self.integral.device
        self.integral = state["integral"].to(device)
        self.error = state["error"].to(device)
        self.running_l0 = state["running_l0"].to(device)
