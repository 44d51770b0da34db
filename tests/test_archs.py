"""Every registered SAE architecture: shapes, training, checkpoints with folded normalization, and
each architecture's defining property. Training runs the torch path (TRITON_INTERPRET removed);
``test_kernel_path_matches_torch_path`` runs the Triton kernels under the interpreter."""

import pytest
import torch
from safetensors.torch import load_file

from flashsae.train.batchtopk import THRESHOLD_DECAY, matryoshka_prefixes
from flashsae.train.checkpoint import load_sae, save_sae
from flashsae.train.gated import GatedNoAuxSAE, GatedSAE, GatedSigmoidSAE, rescale_shift
from flashsae.train.jumprelu import PREACT_COEFF, TANH_SCALE, JumpReLUSAE, JumpReLUStepSAE
from flashsae.train.relu import ReLUSAE
from flashsae.train.sae import SAE_CLASSES, SPARSITY_WARMUP, make_sae, normalized_mse
from flashsae.train.synthetic import SyntheticActivations, SyntheticConfig
from flashsae.train.trainer import TrainConfig, train_sae
from flashsae.train.wandb_log import NullLogger

ARCHS = sorted(SAE_CLASSES)
D, N, B = 16, 64, 128
RAW_GAIN, RAW_SHIFT = 7.0, 3.0  # raw activations: not normalized, nonzero mean
COEFF = {
    "relu": 0.3,
    "gated": 0.3,
    "gated_noaux": 0.3,
    "gated_sigmoid": 0.3,
    "jumprelu": 0.003,
    "jumprelu_step": 0.03,
}  # λ for these tiny SAEs (d = 16)
KEYS = {
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "relu": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "gated": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
    "gated_noaux": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
    "gated_sigmoid": {"W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"},
    "jumprelu_step": {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"},
    "batchtopk": {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"},
    "matryoshka": {"W_enc", "b_enc", "threshold", "W_dec", "b_dec"},
}


@pytest.fixture(autouse=True)
def _torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


class _Stream:
    """Raw activations from a synthetic dictionary, batch i fixed by i (``train_sae``'s loader)."""

    def __init__(self, seed=0):
        self.data = SyntheticActivations(SyntheticConfig(d=D, n_features=48, mean_active=3))
        self.seed = seed

    def batch(self, i, size=B):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + i)
        return RAW_GAIN * self.data.sample(size, gen)[0] + RAW_SHIFT

    def batches(self, start=0):
        i = start
        while True:
            yield self.batch(i)
            i += 1


def _build(arch, stream, **cfg):
    raw = stream.batch(-1, 2048)
    cfg = {"sparsity_coeff": COEFF.get(arch, 0.0), "k": 4, **cfg}
    return make_sae(arch, N, raw.mean(0), raw.square().sum(1).mean().item(), **cfg)


def _train(sae, stream, steps, lr=3e-3):
    cfg = TrainConfig(tokens=steps * B, batch_size=B, lr=lr, dead_window=4 * B, log_every=10**6)
    train_sae(sae, stream, cfg, NullLogger())
    return sae


def _trained(arch, steps=30):
    torch.manual_seed(0)
    stream = _Stream()
    return _train(_build(arch, stream), stream, steps), stream


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_dtypes(arch):
    sae = _build(arch, _Stream())
    x = torch.randn(5, D)
    f = sae.encode(x)
    assert f.shape == (5, N) and (f >= 0).all()
    assert sae(x).shape == (5, D)
    loss, parts, fired = sae.training_loss(x, torch.zeros(N, dtype=torch.bool), 0.5)
    assert loss.shape == () and fired.shape == (N,) and fired.dtype == torch.bool
    assert all(v.shape == () and not v.requires_grad for v in parts.values())


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_decreases(arch):
    torch.manual_seed(0)
    stream = _Stream()
    sae = _build(arch, stream)
    x = stream.batch(10**6) * sae.cfg.input_scale
    no_dead = torch.zeros(N, dtype=torch.bool)
    before = sae.training_loss(x, no_dead, 1.0)[0].item()
    _train(sae, stream, 60)
    after = sae.training_loss(x, no_dead, 1.0)[0].item()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_folds_the_normalization(arch, tmp_path):
    """load_sae(saved)(x_raw) = sae(x_raw · s) / s, with the same latents; SAELens key names."""
    sae, stream = _trained(arch)
    sae.eval()
    s = sae.cfg.input_scale
    assert s != pytest.approx(1.0)
    save_sae(sae, tmp_path)
    assert set(load_file(tmp_path / "sae.safetensors")) == KEYS[arch]
    loaded = load_sae(tmp_path)
    assert type(loaded) is type(sae) and loaded.cfg.input_scale == 1.0
    x_raw = stream.batch(10**6)
    with torch.no_grad():
        f, f_loaded = sae.encode(x_raw * s), loaded.encode(x_raw)
        assert (f > 0).sum() > 0
        torch.testing.assert_close(f_loaded, f, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x_raw), sae(x_raw * s) / s, rtol=1e-4, atol=1e-4)
    save_sae(loaded, tmp_path / "again")  # a folded checkpoint round-trips unchanged
    again = load_file(tmp_path / "again" / "sae.safetensors")
    for name, t in load_file(tmp_path / "sae.safetensors").items():
        torch.testing.assert_close(again[name], t, rtol=1e-6, atol=0)


@pytest.mark.parametrize("arch", ["gated", "jumprelu", "jumprelu_step"])
def test_kernel_path_matches_torch_path(arch, monkeypatch):
    """One loss and its gradients through the Triton kernels (interpreter) and through torch."""
    sae, stream = _trained(arch, steps=5)
    x = stream.batch(7, 8) * sae.cfg.input_scale
    dead = torch.zeros(N, dtype=torch.bool)
    results = []
    for interpret in ("0", "1"):
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        sae.zero_grad()
        loss, _, fired = sae.training_loss(x, dead, 1.0)
        loss.backward()
        results.append(
            (loss.detach(), fired, {k: p.grad.clone() for k, p in sae.named_parameters()})
        )
    (loss0, fired0, grads0), (loss1, fired1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=0)
    assert torch.equal(fired1, fired0)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_relu_decoder_norm_weighted_l1_and_defaults():
    default = _build("relu", _Stream(), sparsity_coeff=0.0).cfg.sparsity_coeff
    assert default == ReLUSAE.default_sparsity_coeff  # λ = 0 in the config means the default
    sae = _build("relu", _Stream())
    assert not sae.unit_norm_decoder and sae.grad_clip == 1.0 and sae.lr_decay_frac == 0.2
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((N,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(N, 1) * 3)  # uneven norms
    x = torch.randn(B, D) * 2
    f = sae.encode(x).detach()
    dead = torch.zeros(N, dtype=torch.bool)
    loss, parts, _ = sae.training_loss(x, dead, 1.0)
    expected_l1 = (f * sae.W_dec.detach().norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(parts["l1"], expected_l1)
    mse = (x - sae(x)).square().sum(1).mean()
    torch.testing.assert_close(loss, mse + sae.cfg.sparsity_coeff * expected_l1)
    # λ warms up linearly over the first 5% of training
    half = sae.training_loss(x, dead, SPARSITY_WARMUP / 2)[0]
    torch.testing.assert_close(half, mse + sae.cfg.sparsity_coeff / 2 * expected_l1)
    torch.testing.assert_close(sae.training_loss(x, dead, 0.0)[0], mse)
    norms = sae.W_dec.detach().norm(dim=1).clone()
    sae.after_step()  # no unit-norm constraint
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=1), norms)


def test_gated_aux_loss_leaves_the_decoder_alone():
    """The auxiliary term reaches W_enc and b_gate, and b_dec only through x_c = x - b_dec
    (grad b_dec = -Σ_b grad x_c), never through the frozen-decoder reconstruction."""
    sae, stream = _trained("gated", steps=10)
    assert sae.adam_betas == (0.0, 0.999)
    x = (stream.batch(3) * sae.cfg.input_scale).requires_grad_()
    terms, _ = sae.loss_terms(x)
    params = [sae.W_dec, sae.b_dec, sae.W_enc, sae.b_gate, sae.r_mag, sae.b_mag, x]
    g_W_dec, g_b_dec, g_W_enc, g_b_gate, g_r_mag, g_b_mag, g_x = torch.autograd.grad(
        terms["aux"], params, allow_unused=True, retain_graph=True
    )
    assert g_W_dec is None or (g_W_dec == 0).all()
    with torch.no_grad():  # grad x = (through x_c) + (direct: 2 (x - v) / B), v the aux x̂
        v = sae.encode_paths(x)[1] @ sae.W_dec + sae.b_dec
        through_xc = g_x - 2 * (x - v) / x.shape[0]
    torch.testing.assert_close(g_b_dec, -through_xc.sum(0))
    assert g_W_enc.abs().sum() > 0 and g_b_gate.abs().sum() > 0
    assert (g_r_mag is None or (g_r_mag == 0).all()) and (g_b_mag is None or (g_b_mag == 0).all())
    # the reconstruction term does reach the decoder
    g_W_dec, g_b_dec = torch.autograd.grad(terms["mse"], [sae.W_dec, sae.b_dec])
    assert g_W_dec.abs().sum() > 0 and not torch.allclose(g_b_dec, torch.zeros(D))


def test_rescale_shift_starts_as_the_relu_sae_and_trains_only_r_mag_b_mag():
    relu, stream = _trained("relu", steps=40)
    rs = rescale_shift(relu)
    assert isinstance(rs, GatedSAE)
    x = stream.batch(5) * relu.cfg.input_scale
    with torch.no_grad():
        torch.testing.assert_close(rs(x), relu(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rs.W_dec.norm(dim=1), torch.ones(N), rtol=1e-5, atol=1e-5)
    frozen = {k: p.detach().clone() for k, p in rs.named_parameters()}
    assert {k for k, p in rs.named_parameters() if p.requires_grad} == {"r_mag", "b_mag"}
    _train(rs, stream, 20)
    for name, p in rs.named_parameters():
        changed = not torch.equal(p.detach(), frozen[name])
        assert changed == (name in ("r_mag", "b_mag")), name


@pytest.mark.parametrize("arch", ["jumprelu", "jumprelu_step"])
def test_jumprelu_threshold_learns_only_through_the_ste(arch):
    """grad of θ's parameter p (θ = exp(c_θ p)) = c_θ θ Σ_b K_b (-(θ/ε) ∂L/∂f_b - [step] λ/(ε B)),
    K_b = 1[|z_b - θ| < ε/2], with ∂L/∂f_b including λ c sech²(c f_b) / B for the tanh
    penalty: exactly the rectangle-kernel pseudo-gradient, zero for latents with no
    pre-activation inside the window."""
    sae = _build(arch, _Stream())
    assert isinstance(sae, JumpReLUSAE) and sae.adam_betas == (0.0, 0.999)
    torch.testing.assert_close(sae.threshold, torch.full((N,), sae.threshold_init))
    eps, c_theta = sae.bandwidth, sae.threshold_lr_scale
    w = min(eps, 0.01)  # offsets of θ from z inside the window, θ > 0
    x = _Stream().batch(0, 16) * sae.cfg.input_scale
    with torch.no_grad():
        z = x @ sae.W_enc + sae.b_enc
        theta = torch.full((N,), 50.0)  # far above every z: no window, no gradient
        below = z[0] > 0.01
        theta[below] = z[0, below] + 0.2 * w  # row 0 just below θ: inside, inactive
        above = ~below & (z[1] > 0.01)
        theta[above] = z[1, above] - 0.3 * w  # row 1 just above θ: inside, active
        sae.theta_param.copy_(theta.log() / c_theta)
        theta = sae.threshold
    loss, _, _ = sae.training_loss(x, torch.zeros(N, dtype=torch.bool), 1.0)
    loss.backward()
    with torch.no_grad():
        B, lam = x.shape[0], sae.cfg.sparsity_coeff
        z = x @ sae.W_enc + sae.b_enc
        f = z * (z > theta)
        df = 2 * (f @ sae.W_dec + sae.b_dec - x) @ sae.W_dec.T / B
        K = ((z - theta).abs() < eps / 2).float()
        if isinstance(sae, JumpReLUStepSAE):
            pseudo = (K * (-theta / eps * df - lam / (eps * B))).sum(0)
        else:
            df = df + lam * TANH_SCALE / torch.cosh(TANH_SCALE * f).square() / B
            pseudo = (K * (-theta / eps * df)).sum(0)
        expected = c_theta * theta * pseudo
    assert K.sum(0).gt(0).sum() >= 3
    grad = sae.theta_param.grad
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7)
    assert (grad[K.sum(0) == 0] == 0).all() and (grad[K.sum(0) > 0] != 0).all()


def test_jumprelu_penalties_reach_the_encoder():
    """jumprelu's terms give the encoder gradients of their own: the tanh penalty λ c sech²(c f)
    on active entries, the pre-activation loss -λ_p on entries below θ; the step penalty gives
    it none (only θ learns from L0)."""
    stream = _Stream()
    x = stream.batch(0, 32)
    for arch in ("jumprelu", "jumprelu_step"):
        torch.manual_seed(0)
        sae = _build(arch, stream, sparsity_coeff=1.0)
        xs = x * sae.cfg.input_scale
        loss, parts, _ = sae.training_loss(xs, torch.zeros(N, dtype=torch.bool), 1.0)
        (g_loss,) = torch.autograd.grad(loss, [sae.b_enc])
        (g_mse,) = torch.autograd.grad((xs - sae(xs)).square().sum(1).mean(), [sae.b_enc])
        f = sae.encode(xs).detach()
        z = (xs @ sae.W_enc + sae.b_enc).detach()
        if arch == "jumprelu":
            torch.testing.assert_close(parts["sparsity"], torch.tanh(TANH_SCALE * f).sum(1).mean())
            torch.testing.assert_close(
                parts["preact"], torch.relu(sae.threshold - z).sum(1).mean(), msg="preact"
            )
            tanh = (TANH_SCALE / torch.cosh(TANH_SCALE * f).square() * (f > 0)).mean(0)
            expected = tanh - PREACT_COEFF * (z < sae.threshold).float().mean(0)
            assert tanh.abs().sum() > 0
        else:
            expected = torch.zeros(N)
        torch.testing.assert_close(g_loss - g_mse, expected, rtol=1e-4, atol=1e-6)


def test_batchtopk_threshold_ema_is_used_at_inference():
    torch.manual_seed(0)
    stream = _Stream()
    sae = _build("batchtopk", stream)
    assert sae.threshold.item() == 0.0  # unset
    x1, x2 = (stream.batch(i) * sae.cfg.input_scale for i in (0, 1))
    dead = torch.zeros(N, dtype=torch.bool)

    def min_kept(x):
        z = sae.preactivations(x).detach()
        kept = z.reshape(-1).topk(x.shape[0] * sae.cfg.k).values
        return kept[kept > 0].min()

    m1, m2 = min_kept(x1), min_kept(x2)
    sae.training_loss(x1, dead, 0.0)
    torch.testing.assert_close(sae.threshold, m1)  # the first batch sets θ
    # at inference θ reproduces the batch's selection (z > θ excludes the minimum itself)
    f = sae.encode(x1)
    assert (f > 0).sum() == x1.shape[0] * sae.cfg.k - 1
    sae.training_loss(x2, dead, 0.0)
    torch.testing.assert_close(sae.threshold, THRESHOLD_DECAY * m1 + (1 - THRESHOLD_DECAY) * m2)
    with torch.no_grad():
        z = sae.preactivations(x2)
        torch.testing.assert_close(sae.encode(x2), torch.where(z > sae.threshold, z, 0))
    assert not torch.equal(sae.encode(x2), z.relu())


def test_matryoshka_loss_is_the_mean_over_nested_prefixes():
    assert matryoshka_prefixes(2048) == [128, 256, 512, 1024, 2048]
    assert matryoshka_prefixes(N) == [4, 8, 16, 32, 64]
    sae = _build("matryoshka", _Stream())
    x = _Stream().batch(0) * sae.cfg.input_scale
    f = sae.encode(x).detach()
    rec, x_hat, _ = sae.reconstruction_loss(x, f)
    expected = torch.stack(
        [normalized_mse(x, f[:, :m] @ sae.W_dec[:m] + sae.b_dec) for m in matryoshka_prefixes(N)]
    ).mean()
    torch.testing.assert_close(rec, expected)
    torch.testing.assert_close(x_hat, sae.decode(f))


@pytest.mark.parametrize("budget", [None, 2])
def test_auxk_gives_the_segment_reduction_no_padded_pairs(monkeypatch, budget):
    """With fewer dead latents (2) than k_aux (8), the Triton path (interpreter) hands the segment
    reductions of the backward exactly B·k pairs for the encoder, B·k for the decoder and B·2
    for AuxK's decoder: no slot stands for a latent that is not dead (no pile-up on latent 0).
    ``budget`` None gathers the dead latents exactly; 2 is what the trainer sets for 2 dead."""
    from flashsae.kernels import encode_topk_kernels, segment_matmul_kernels, sparse_decode_kernels

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sae = _build("topk", _Stream())
    sae.dead_budget = budget
    x = _Stream().batch(0, 8) * sae.cfg.input_scale
    dead = torch.zeros(N, dtype=torch.bool)
    dead[[17, 40]] = True
    pairs = []

    def counted(coef, indices, *args, **kwargs):
        pairs.append((indices.numel(), set(indices.unique().tolist())))
        return segment_matmul_kernels.segment_matmul(coef, indices, *args, **kwargs)

    for module in (encode_topk_kernels, sparse_decode_kernels):
        monkeypatch.setattr(module, "segment_matmul", counted)
    loss, parts, _ = sae.training_loss(x, dead, 1.0)
    assert parts["aux"] > 0
    loss.backward()
    B, k = x.shape[0], sae.cfg.k
    assert sorted(n for n, _ in pairs) == sorted([B * k, B * k, B * 2])
    (aux_latents,) = [lat for n, lat in pairs if n == B * 2]
    assert aux_latents == {17, 40}


@pytest.mark.parametrize("arch", ["gated", "jumprelu", "jumprelu_step"])
def test_initial_reconstruction_has_about_the_inputs_norm(arch):
    """W_enc = (2d/n) W_decᵀ: at n = 16 d, ||x̂ - b_dec|| ≈ ||x - b_dec|| (W_enc = W_decᵀ gave
    about 8x), and FVU well under 1 before any training."""
    torch.manual_seed(0)
    d, n = 32, 512
    raw = torch.randn(4096, d) * 3 + 1
    sae = make_sae(arch, n, raw.mean(0), raw.square().sum(1).mean().item())
    x = raw * sae.cfg.input_scale
    with torch.no_grad():
        xc, f = x - sae.b_dec, sae.encode(x)
        ratio = ((f @ sae.W_dec).norm(dim=1) / xc.norm(dim=1)).mean().item()
    assert 0.8 < ratio < 1.3, ratio
    # about half the latents fire at θ ≈ 0 (z is symmetric about 0), a fifth at jumprelu's 0.1
    share = 0.2 if arch == "jumprelu" else 0.5
    assert abs((f > 0).float().mean() - share) < 0.1
    assert normalized_mse(x, sae(x).detach()) < 0.3


def test_gated_noaux_drops_only_the_auxiliary_term():
    torch.manual_seed(0)
    stream = _Stream()
    gated = _build("gated", stream)
    noaux = _build("gated_noaux", stream)
    assert isinstance(noaux, GatedNoAuxSAE) and noaux.saelens == gated.saelens
    noaux.load_state_dict(gated.state_dict())
    x = stream.batch(0) * gated.cfg.input_scale
    dead = torch.zeros(N, dtype=torch.bool)
    loss_g, parts_g, _ = gated.training_loss(x, dead, 1.0)
    loss_n, parts_n, _ = noaux.training_loss(x, dead, 1.0)
    lam = gated.cfg.sparsity_coeff
    torch.testing.assert_close(loss_g, parts_g["mse"] + lam * parts_g["l1"] + parts_g["aux"])
    torch.testing.assert_close(loss_n, parts_n["mse"] + lam * parts_n["l1"])
    assert parts_n["aux"] > 0  # still computed and logged
    torch.testing.assert_close(parts_n["l0"], (gated.encode(x) > 0).sum(1).float().mean())
    (g_b_gate,) = torch.autograd.grad(loss_n, [noaux.b_gate])
    # without L_aux the gate bias sees only the L1 term: λ 1[π_gate > 0] / B, never negative
    with torch.no_grad():
        pi_gate = (x - noaux.b_dec) @ noaux.W_enc + noaux.b_gate
    torch.testing.assert_close(g_b_gate, lam * (pi_gate > 0).float().mean(0))


def test_gated_sigmoid_gate_and_l1_on_f():
    torch.manual_seed(0)
    sae = _build("gated_sigmoid", _Stream())
    assert isinstance(sae, GatedSigmoidSAE) and sae.saelens is None
    with torch.no_grad():
        for p in (sae.b_gate, sae.r_mag, sae.b_mag):
            p.normal_(0, 0.3)
    x = _Stream().batch(0) * sae.cfg.input_scale
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc
        f = torch.sigmoid(pre + sae.b_gate) * torch.relu(sae.r_mag.exp() * pre + sae.b_mag)
    torch.testing.assert_close(sae.encode(x), f)
    loss, parts, fired = sae.training_loss(x, torch.zeros(N, dtype=torch.bool), 1.0)
    mse = (x - f @ sae.W_dec - sae.b_dec).square().sum(1).mean()
    torch.testing.assert_close(parts["l1"], f.sum(1).mean())
    torch.testing.assert_close(loss, mse + sae.cfg.sparsity_coeff * f.sum(1).mean())
    assert torch.equal(fired, (f > 0).any(0))
    # the reconstruction reaches the gate directly (no Heaviside)
    (g,) = torch.autograd.grad(sae.training_loss(x, torch.zeros(N, dtype=torch.bool), 0.0)[0],
                               [sae.b_gate])  # fmt: skip
    assert g.abs().sum() > 0
