"""The ground-truth generator, MMCS, and a TopK SAE recovering a known dictionary."""

import math

import pytest
import torch

from flashsae.train.sae import SAEConfig
from flashsae.train.synthetic import (
    SyntheticActivations,
    SyntheticConfig,
    SyntheticStream,
    firing_probabilities,
    mmcs,
)
from flashsae.train.topk import TopKSAE
from flashsae.train.trainer import TrainConfig, train_sae
from flashsae.train.wandb_log import RunLogger


def unit_rows(m, d, seed):
    g = torch.randn(m, d, generator=torch.Generator().manual_seed(seed))
    return g / g.norm(dim=1, keepdim=True)


def test_mmcs_of_a_dictionary_with_itself_is_one():
    g = unit_rows(128, 64, 0)
    assert mmcs(g, g) == pytest.approx((1.0, 1.0), abs=1e-9)


def test_mmcs_against_a_random_dictionary_is_low():
    result = mmcs(unit_rows(128, 64, 0), unit_rows(256, 64, 1))
    # max of 256 cosines of std 1/8 is about 0.35
    assert 0.2 < result.truth_to_learned < 0.5
    assert 0.2 < result.learned_to_truth < 0.5


def test_mmcs_is_invariant_to_permutation_and_positive_scale_but_not_sign():
    g, d = unit_rows(64, 32, 0), unit_rows(96, 32, 1)
    d[:64] = g + 0.1 * d[:64]
    ref = mmcs(g, d)
    scale = torch.rand(96, 1, generator=torch.Generator().manual_seed(2)) * 10 + 0.1
    moved = (d * scale)[torch.randperm(96, generator=torch.Generator().manual_seed(3))]
    assert mmcs(g * 3.0, moved) == pytest.approx(ref, abs=1e-9)
    assert mmcs(d, g) == pytest.approx(tuple(reversed(ref)), abs=1e-9)
    assert mmcs(g, -d).truth_to_learned < ref.truth_to_learned - 0.5  # signed cosine


def test_mmcs_directions_differ_for_an_overcomplete_learned_dictionary():
    g = unit_rows(64, 32, 0)
    result = mmcs(g, torch.cat([g, unit_rows(64, 32, 1)]))
    assert result.truth_to_learned == pytest.approx(1.0)
    assert result.learned_to_truth < 0.8  # half the learned rows are junk


def test_firing_probabilities_sum_to_the_target_and_decay():
    p = firing_probabilities(512, 5.0, 0.5)
    assert p.sum().item() == pytest.approx(5.0, rel=1e-9)
    assert (p[1:] <= p[:-1]).all()
    assert (p[0] / p[99]).item() == pytest.approx(100**0.5)  # the power law (rank + 1)^-α
    capped = firing_probabilities(10, 9.5, 1.0)
    assert capped.max().item() == 1.0 and capped.sum().item() == pytest.approx(9.5)
    with pytest.raises(ValueError):
        firing_probabilities(10, 11.0, 1.0)


def test_generator_statistics_match_the_configuration():
    cfg = SyntheticConfig(d=32, n_features=96, mean_active=4.0, freq_exponent=1.0, seed=5)
    data = SyntheticActivations(cfg)
    x, codes = data.sample(40_000, torch.Generator().manual_seed(0))
    fires = codes > 0
    assert fires.sum(1).float().mean().item() == pytest.approx(4.0, abs=0.05)
    freq = fires.float().mean(0)
    assert (freq - data.probs).abs().max().item() < 0.015
    order = data.probs.argsort(descending=True)
    assert freq[order[:10]].mean() > 5 * freq[order[-10:]].mean()  # frequencies decay
    assert codes[fires].min() >= cfg.mag_min and codes.max() <= cfg.mag_max
    assert torch.allclose(data.dictionary.norm(dim=1), torch.ones(96))
    torch.testing.assert_close(x, codes @ data.dictionary)


def test_groups_co_fire_with_unchanged_marginals():
    base = dict(d=16, n_features=64, mean_active=6.0, freq_exponent=0.0, n_groups=4)
    independent = SyntheticActivations(SyntheticConfig(**base, rho=0.0))
    grouped = SyntheticActivations(SyntheticConfig(**base, rho=0.95))
    gen = torch.Generator().manual_seed(0)
    fires = (grouped.sample(40_000, gen)[1] > 0).float()
    fires0 = (independent.sample(40_000, gen)[1] > 0).float()
    corr = torch.corrcoef(fires.T).nan_to_num()
    same = grouped.group[:, None] == grouped.group[None, :]
    in_group = same & (grouped.group[:, None] >= 0) & ~torch.eye(64, dtype=torch.bool)
    assert corr[in_group].mean() > 0.5
    assert corr[~same].abs().mean() < 0.02
    assert (fires.mean(0) - fires0.mean(0)).abs().max() < 0.015  # same marginals p_i


def test_dictionary_is_seeded_and_the_stream_resumable():
    cfg = SyntheticConfig(d=16, n_features=32, mean_active=3.0)
    a, b = SyntheticActivations(cfg), SyntheticActivations(cfg)
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.probs, b.probs)
    other = SyntheticActivations(SyntheticConfig(d=16, n_features=32, mean_active=3.0, seed=1))
    assert not torch.equal(a.dictionary, other.dictionary)
    stream = SyntheticStream(a, batch_size=8, seed=3)
    first = [x for x, _ in zip(stream.batches(), range(5), strict=False)]
    assert torch.equal(next(stream.batches(start=3)), first[3])
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(next(SyntheticStream(a, 8, seed=4).batches()), first[0])


@pytest.mark.parametrize(
    "bad",
    [dict(n_groups=20, group_size=4), dict(rho=1.5), dict(mag_min=2.0, mag_max=1.0)],
)
def test_invalid_configurations_are_refused(bad):
    with pytest.raises(ValueError):
        SyntheticActivations(SyntheticConfig(d=8, n_features=64, **bad))


def test_topk_sae_recovers_the_dictionary(tmp_path, monkeypatch):
    """d = 64, 128 features, ~3 active; 256 latents with k = 4 on the CPU reference path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # fast torch reference kernels
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)
    data = SyntheticActivations(SyntheticConfig(d=64, n_features=128, mean_active=3.0))
    sample = data.sample(8192, torch.Generator().manual_seed(123))[0]
    scale = math.sqrt(64 / sample.square().sum(1).mean().item())  # E||x||² = d
    sae = TopKSAE(SAEConfig("topk", d=64, n_latents=256, k=4, k_aux=32, input_scale=scale))
    sae.init_b_dec(sample.mean(0) * scale)
    cfg = TrainConfig(tokens=50_000, batch_size=256, lr=1e-2, dead_window=5_000, log_every=50)
    logger = RunLogger(tmp_path, {}, "synthetic")
    train_sae(sae, SyntheticStream(data, cfg.batch_size, seed=1), cfg, logger)
    logger.finish()
    result = mmcs(data.dictionary, sae.W_dec.detach())
    assert result.truth_to_learned >= 0.95, result
