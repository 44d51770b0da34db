"""The SAE base class, its config, the architecture registry and the factory every run uses.

Parameters are stored as in SAELens: encoder weights [d, n], W_dec [n, d] (row i is latent i's
decoder direction), b_dec [d]; every architecture decodes with x̂ = f W_dec + b_dec. An
architecture is one module that defines an ``SAE`` subclass decorated with ``@register``; the
class carries its name, its SAELens layout and its default λ, so the checkpoint registry, the
SAELens export, the command line's choices and the tests are all derived from the classes.

Inputs are scaled so that E||x||² = d (``make_sae`` computes the scale from the data's mean
squared norm), and the scale is folded into the weights on save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from flashsae.kernels import normalize_decoder_, remove_parallel_grad_, sparse_decode, topk

from . import distributed

SPARSITY_WARMUP = 0.05  # λ rises linearly from 0 over this first fraction of training


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


@dataclass(frozen=True)
class SAELensLayout:
    """How an architecture appears in SAELens' on-disk format (see ``export.py``)."""

    architecture: str
    tensors: tuple[str, ...]
    apply_b_dec_to_input: bool
    scalar_threshold: bool = False  # one θ for all latents, broadcast to [n] on export


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - mean(x)||² over the batch.

    Under data parallelism the batch is the global one, the rows of all N ranks: the
    denominator pools them (``distributed.pooled_sq_dev``) and each rank returns its share,
    N·Σ_{its t} ||x_t - x̂_t||² / denominator, whose mean over the ranks is the global batch's
    value, and whose gradient, averaged over the ranks, is that value's gradient."""
    err = (x - x_hat).square().sum()
    ranks = distributed.world_size()
    if ranks == 1:
        return err / (x - x.mean(0)).square().sum().clamp_min(1e-12)
    return ranks * err / distributed.pooled_sq_dev(x).clamp_min(1e-12)


def fired_latents(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """``[n]`` bool: latents with a positive value in the batch's sparse codes (no host sync)."""
    counts = torch.zeros(n, dtype=torch.int32, device=indices.device)
    return counts.index_add_(0, indices.reshape(-1).long(), (values > 0).reshape(-1).int()) > 0


def warmed_up(coeff: float | torch.Tensor, progress: float) -> float | torch.Tensor:
    """λ at ``progress`` (fraction of training done): linear from 0 over ``SPARSITY_WARMUP``."""
    return coeff * min(1.0, progress / SPARSITY_WARMUP)


def l0_of(f: torch.Tensor) -> torch.Tensor:
    """L0 of dense latents ``f`` [B, n]: the mean over rows of #{i : f_i > 0}."""
    return (f > 0).sum(1).float().mean()


def dead_columns(dead_mask: torch.Tensor, budget: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols [M] int64, dead [M] bool): latents to gather for AuxK, and which of them are dead.

    ``budget`` None: exactly the dead latents (``nonzero``, a host sync). Otherwise M =
    min(budget, n) columns, the dead ones first, with no host sync: the trainer sets the budget
    from the dead count it reads on its logging steps, so the set is exact up to latents that
    died or revived since then."""
    if budget is None:
        cols = dead_mask.nonzero().squeeze(1)
        return cols, torch.ones_like(cols, dtype=torch.bool)
    cols = torch.topk(dead_mask.float(), min(budget, dead_mask.numel()), sorted=False).indices
    return cols, dead_mask[cols]


def auxk_loss(
    xc: torch.Tensor,
    e: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    dead_mask: torch.Tensor,
    k_aux: int,
    budget: int | None,
    preacts: torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): normalized MSE of reconstructing the detached residual ``e``
    from the top-k_aux pre-activations among dead latents, ê = TopK(z_dead) W_dec[dead].

    z_dead = xc W_enc[:, dead] + b_enc[dead] is one dense GEMM on the gathered dead columns
    (or a gather from ``preacts`` [B, n] when the caller has them), so its backward is dense too,
    and only real dead latents get slots: k_live = min(k_aux, M). 0 when no latent is dead."""
    cols, dead = dead_columns(dead_mask, budget)
    k_live = min(k_aux, cols.numel())
    if k_live == 0:
        return torch.zeros((), device=xc.device)
    if preacts is None:
        z = torch.addmm(b_enc[cols], xc, W_enc[:, cols])
    else:
        z = preacts[:, cols]
    z = torch.where(dead, z, -torch.inf).contiguous()
    vals, slots = topk(z, k_live)
    e_hat = sparse_decode(vals, cols[slots.long()].int(), W_dec, torch.zeros_like(W_dec[0]))
    return normalized_mse(e, e_hat) * dead.any()


class SAE(nn.Module):
    """Base class: a unit-norm decoder shared by all architectures; subclasses add the encoder
    (``encode``) and the loss (``training_loss``), and may override the optimizer defaults.

    Class attributes an architecture sets: ``arch`` (its name, set by ``@register``),
    ``saelens`` (its SAELens layout), ``default_sparsity_coeff`` (λ used when the config's λ is
    0; None for architectures without a λ)."""

    arch: str = ""
    saelens: SAELensLayout | None  # None: SAELens cannot represent it (export refuses)
    default_sparsity_coeff: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    lr_decay_frac: float = 0.2  # the learning rate decays linearly to 0 over this last fraction
    unit_norm_decoder: bool = True
    dead_budget: int | None = None  # AuxK columns to gather (``dead_columns``); set by the trainer
    # λ as a 0-dim device tensor, set by the trainer's L0 controller (``--target-l0``) in place
    # of cfg.sparsity_coeff
    controlled_coeff: torch.Tensor | None = None

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if self.default_sparsity_coeff is not None and not cfg.sparsity_coeff:
            cfg = replace(cfg, sparsity_coeff=self.default_sparsity_coeff)  # recorded in cfg.json
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
        is the fraction of training done (for warm-ups). The built-in architectures' parts
        include ``fvu``, the batch's Σ||x - x̂||² / Σ||x - mean(x)||², and those with a λ
        ``l0``, the batch's L0 (which ``--target-l0`` steers)."""
        raise NotImplementedError

    def sparsity_coeff_at(self, progress: float) -> float | torch.Tensor:
        """The λ of the loss at ``progress``: ``controlled_coeff`` when the trainer sets one,
        else ``cfg.sparsity_coeff``, warmed up (``warmed_up``)."""
        lam = self.cfg.sparsity_coeff if self.controlled_coeff is None else self.controlled_coeff
        return warmed_up(lam, progress)

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

        With x' = s·x: W_enc ← s·W_enc, W_dec ← W_dec / s, b_dec ← b_dec / s, and f unchanged,
        so thresholds and biases of the latents stay as they are.
        """
        s = self.cfg.input_scale
        out = {k: v.detach().clone() for k, v in self.state_dict().items()}
        out["W_enc"] *= s
        out["W_dec"] /= s
        out["b_dec"] /= s
        return out


SAE_CLASSES: dict[str, type[SAE]] = {}


def register(arch: str):  # noqa: ANN201 - a class decorator
    """Class decorator: make an ``SAE`` subclass available as ``arch`` to the command line,
    checkpoints (``load_sae``) and the SAELens export."""

    def add(cls: type[SAE]) -> type[SAE]:
        if arch in SAE_CLASSES and SAE_CLASSES[arch] is not cls:
            raise ValueError(f"SAE architecture {arch!r} is registered twice")
        cls.arch = arch
        SAE_CLASSES[arch] = cls
        return cls

    return add


def input_scale(d: int, mean_sq_norm: float) -> float:
    """s = sqrt(d / E||x||²): the factor that makes E||s·x||² = d."""
    return math.sqrt(d / mean_sq_norm)


def make_sae(
    arch: str,
    n_latents: int,
    mean: torch.Tensor,
    mean_sq_norm: float,
    **cfg: object,
) -> SAE:
    """A new ``arch`` SAE for data with per-dimension ``mean`` [d] and E||x||² = ``mean_sq_norm``
    (raw units): input scale s = sqrt(d / E||x||²), k_aux = d/2, b_dec = s · mean. ``cfg`` holds
    the other ``SAEConfig`` fields (k, sparsity_coeff, site, model, ...). Weights are drawn from
    torch's global RNG; the SAE is on the CPU."""
    if arch not in SAE_CLASSES:
        raise ValueError(f"unknown SAE architecture {arch!r}; known: {sorted(SAE_CLASSES)}")
    d = mean.shape[0]
    scale = input_scale(d, mean_sq_norm)
    config = SAEConfig(
        arch=arch, d=d, n_latents=n_latents, **{"k_aux": d // 2, **cfg, "input_scale": scale}
    )
    sae = SAE_CLASSES[arch](config)
    sae.init_b_dec(mean.float() * scale)
    return sae
