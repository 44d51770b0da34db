"""Synthetic activations with a known dictionary in superposition, and MMCS.

A ground-truth dictionary G [m, d] of m unit-norm random directions (m > d, so the
features are in superposition). Each sample is

    x = Σ_i s_i a_i G_i,   s_i ∈ {0, 1},   a_i ~ Uniform[mag_min, mag_max] (nonnegative)

Feature i fires with marginal probability p_i = c (r_i + 1)^(-α), where r_i is
the feature's frequency rank (a random permutation of 0..m-1) and c is chosen so
that E[Σ_i s_i] = Σ_i p_i = mean_active (p_i capped at 1). Correlations come from
a Gaussian copula: s_i = 1[u_i < Φ⁻¹(p_i)] with u_i = √ρ z_g + √(1-ρ) ε_i for the
features of co-firing group g (n_groups disjoint groups of group_size features)
and u_i = ε_i otherwise, z, ε ~ N(0, 1). Marginals stay exactly p_i for any ρ.

MMCS against the known dictionary G with learned decoder rows D:
mean over g in G of max over d in D of cos(g, d), and the reverse direction.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass
class SyntheticConfig:
    """m = n_features directions in d dimensions, mean_active of them firing per sample."""

    d: int = 256
    n_features: int = 512
    mean_active: float = 5.0
    freq_exponent: float = 0.5  # α in p_i ∝ (rank + 1)^(-α)
    mag_min: float = 0.5
    mag_max: float = 1.5
    n_groups: int = 0  # co-firing groups (Gaussian copula with correlation rho)
    group_size: int = 4
    rho: float = 0.9
    seed: int = 0  # seeds the dictionary, frequencies and groups (not the sample stream)


def firing_probabilities(n: int, mean_active: float, alpha: float) -> torch.Tensor:
    """p_r = min(1, c (r + 1)^(-α)) for ranks r = 0..n-1, with c set by bisection so Σ p = mean."""
    if not 0 < mean_active <= n:
        raise ValueError(f"mean_active must be in (0, {n}], got {mean_active}")
    base = torch.arange(1, n + 1, dtype=torch.float64).pow(-alpha)
    lo, hi = 0.0, mean_active / base.min().item()
    for _ in range(100):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if (c * base).clamp(max=1).sum() < mean_active else (lo, c)
    return (hi * base).clamp(max=1)


class SyntheticActivations:
    """The ground truth of one ``SyntheticConfig`` on ``device``: ``dictionary`` [m, d] (rows
    G_i), ``probs`` [m] (p_i), ``group`` [m] (group id, -1 for none); drawn on the CPU, so the
    same for every device."""

    def __init__(self, cfg: SyntheticConfig, device: str | torch.device = "cpu") -> None:
        m = cfg.n_features
        if cfg.n_groups * cfg.group_size > m:
            raise ValueError(f"{cfg.n_groups} groups of {cfg.group_size} exceed {m} features")
        if not 0 <= cfg.rho <= 1:
            raise ValueError(f"rho must be in [0, 1], got {cfg.rho}")
        if not 0 <= cfg.mag_min <= cfg.mag_max:
            raise ValueError("magnitudes need 0 <= mag_min <= mag_max")
        self.cfg, self.device = cfg, torch.device(device)
        gen = torch.Generator().manual_seed(cfg.seed)
        g = torch.randn(m, cfg.d, generator=gen, dtype=torch.float64)
        rank = torch.randperm(m, generator=gen)
        members = torch.randperm(m, generator=gen)[: cfg.n_groups * cfg.group_size]
        group = torch.full((m,), -1, dtype=torch.long)
        group[members] = torch.arange(members.numel()) // cfg.group_size
        self.dictionary = (g / g.norm(dim=1, keepdim=True)).float().to(self.device)
        self.probs = firing_probabilities(m, cfg.mean_active, cfg.freq_exponent)[rank].float()
        self.probs = self.probs.to(self.device)
        self.group = group.to(self.device)

    def sample(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [B, d], codes [B, m]) with codes_i = s_i a_i and x = codes @ dictionary; ``gen``
        is a generator on ``device``."""
        cfg, m, dev = self.cfg, self.cfg.n_features, self.device
        u = torch.randn(batch_size, m, generator=gen, device=dev)
        if cfg.n_groups:
            z = torch.randn(batch_size, cfg.n_groups, generator=gen, device=dev)
            shared = cfg.rho**0.5 * z[:, self.group.clamp(min=0)] + (1 - cfg.rho) ** 0.5 * u
            u = torch.where(self.group >= 0, shared, u)
        fires = u < torch.special.ndtri(self.probs)
        mags = torch.rand(batch_size, m, generator=gen, device=dev)
        codes = fires * (cfg.mag_min + (cfg.mag_max - cfg.mag_min) * mags)
        return codes @ self.dictionary, codes


class SyntheticStream:
    """An endless stream of batches [batch_size, d] on ``data.device``. Batch i is drawn with
    the generator seed (seed · 0x9E3779B1 + i) mod 2³² (torch's CPU generator keeps 32 bits),
    so it depends only on (seed, i) and ``batches(start)`` resumes mid-stream, as
    ``train_sae`` needs."""

    def __init__(self, data: SyntheticActivations, batch_size: int, seed: int) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        gen = torch.Generator(device=self.data.device)
        for i in itertools.count(start):
            gen.manual_seed((self.seed * 0x9E3779B1 + i) % 2**32)
            yield self.data.sample(self.batch_size, gen)[0]


def max_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row a_i of ``a`` [p, d]: max over rows b_j of ``b`` [q, d] of cos(a_i, b_j)."""
    a = a.double() / a.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b.double() / b.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).max(dim=1).values


class MMCS(NamedTuple):
    """Mean max cosine similarity in both directions."""

    truth_to_learned: float  # mean over g in G of max over d in D of cos(g, d)
    learned_to_truth: float  # mean over d in D of max over g in G of cos(d, g)


def mmcs(truth: torch.Tensor, learned: torch.Tensor) -> MMCS:
    """MMCS of a known dictionary ``truth`` [m, d] and learned decoder rows ``learned`` [n, d]."""
    return MMCS(
        max_cosines(truth, learned).mean().item(), max_cosines(learned, truth).mean().item()
    )
