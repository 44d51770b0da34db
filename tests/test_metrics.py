"""Metrics against hand-computed values and trivial SAEs' known answers."""

import math

import pytest
import torch

from flashsae.train.metrics import ReconstructionStats, SpliceStats


def stats_of(batches, n=4):
    s = ReconstructionStats(batches[0][0].shape[1], n)
    for x, x_hat, f in batches:
        s.update(x, x_hat, f)
    return s.result()


def test_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 1.0], [2.0, 2.0]])
    f = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0.5, 0], [0.3, 0, 0, 0]])
    # split in two batches: results must be pooled, not averaged per batch
    r = stats_of([(x[:1], x_hat[:1], f[:1]), (x[1:], x_hat[1:], f[1:])])
    mu = x.mean(0)
    err = 1 + 1 + 1
    assert r["fvu"] == pytest.approx(err / (x - mu).square().sum().item())
    assert r["mse"] == pytest.approx(err / 6)
    assert r["l0"] == pytest.approx(4 / 3)
    assert r["gamma"] == pytest.approx((2 + 1 + 8) / (1 + 2 + 10))
    cos = [1 / math.sqrt(2), 1.0, 10 / (math.sqrt(13) * math.sqrt(8))]
    assert r["cosine"] == pytest.approx(sum(cos) / 3)
    assert r["l2_ratio"] == pytest.approx((math.sqrt(2) + 0.5 + math.sqrt(8 / 13)) / 3)
    assert r["dead_frac"] == pytest.approx(0.25)  # latent 3 never fires
    assert r["dense_frac"] == pytest.approx(0.75)  # latents 0-2 fire on > 10% of tokens


def test_trivial_saes():
    x = torch.randn(500, 16) + 3
    f = torch.rand(500, 4)
    exact = stats_of([(x, x, f)])
    assert exact["fvu"] == pytest.approx(0, abs=1e-12) and exact["gamma"] == pytest.approx(1)
    half = stats_of([(x, 0.5 * x, f)])
    assert half["gamma"] == pytest.approx(0.5) and half["l2_ratio"] == pytest.approx(0.5)
    mean_only = stats_of([(x, x.mean(0).expand_as(x), f)])
    assert mean_only["fvu"] == pytest.approx(1)


def test_splice_stats():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, 0] = False
    s = SpliceStats()
    s.update(targets, {"clean": logits, "sae": logits, "zero": torch.zeros_like(logits)}, mask)
    r = s.result()
    assert r["ce_loss_recovered"] == pytest.approx(1) and r["kl"] == pytest.approx(0, abs=1e-12)
    assert r["ce_zero"] == pytest.approx(math.log(7))
    ce = torch.nn.functional.cross_entropy(logits[:, 1:].reshape(-1, 7), targets[:, 1:].reshape(-1))
    assert r["ce_clean"] == pytest.approx(ce.item(), rel=1e-6)
