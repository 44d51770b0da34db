import pytest
import torch

from flashsae.kernels import jumprelu
from flashsae.kernels.jumprelu_kernels import (
    jumprelu_backward,
    jumprelu_forward,
    jumprelu_reference,
)
from tests.kernel_checks import (
    DEVICE,
    assert_flips,
    assert_fp32_grads,
    assert_launcher_error,
    assert_rel,
    assert_rel_bracketed,
    bracket,
    kernel_and_reference,
    poison_outputs,
    ulp32,
)

FNS = kernel_and_reference(jumprelu, jumprelu_reference)


def _inputs(B, n, dtype, eps, adversarial, device=DEVICE):
    """Random (pre [B, n] in dtype, b_enc, θ > 0). adversarial: every third latent's θ is set to
    the largest fp32 z = pre + b_enc of its column, the next latent's to that z - ε/2, so that
    H(z - θ) and the window edge there hinge on the last bit of z."""
    pre = torch.randn(B, n, device=device).to(dtype)
    b_enc = 0.1 * torch.randn(n, device=device)
    theta = torch.exp(torch.randn(n, device=device) * 0.5 - 1)
    if adversarial:
        z_max = (pre.float() + b_enc).max(0).values
        col = torch.arange(n, device=device) % 3
        ok = z_max - eps / 2 > 1e-3  # thresholds stay positive
        theta = torch.where(ok & (col == 0), z_max, theta)
        theta = torch.where(ok & (col == 1), z_max - eps / 2, theta)
    return pre, b_enc, theta


def _check(fn, pre, b_enc, theta, eps, tol):
    """fn against a float64 oracle on the same rounded inputs. The kernel evaluates z = pre +
    b_enc in fp32 (off by at most ½ ulp of |pre| + |b_enc|) and the window as |u|·(1/ε) < ½
    (two more roundings), so H(z - θ) and the window may differ from float64 only where z - θ
    is within the band: 2 fp32 ulps of |pre| + |b_enc| (plus 4 ulps of ε/2 at the window edge).
    Decisions are compared by flips inside the band, values against the oracle resolved with
    the kernel's own H (f ≠ 0: θ > 0), gradient sums within the range the band leaves open.
    Returns the number of flipped H decisions."""
    leaves = [t.detach().clone().requires_grad_() for t in (pre, b_enc, theta)]
    with poison_outputs():
        f, l0 = fn(*leaves, eps)
    assert f.shape == pre.shape and f.dtype == pre.dtype and l0.shape == (pre.shape[0],)
    g_f, g_l0 = torch.randn_like(f), torch.randn_like(l0)

    p, b, th = pre.double(), b_enc.double(), theta.double()
    z = p + b
    slack = 2 * ulp32(p.abs() + b.abs())
    near_step = (z - th).abs() <= slack
    near_window = ((z - th).abs() - eps / 2).abs() <= slack + 4 * ulp32(torch.tensor(eps / 2))
    step, window = z > th, (z - th).abs() < eps / 2
    assert window.any(), "no pre-activation inside the rectangle: the θ gradient is untested"

    on = f.detach() != 0
    flips = assert_flips(on, step, near_step, "H(z - θ)")
    assert_rel(f.detach(), torch.where(on, z, 0.0), tol, "f")
    assert_rel(l0.detach(), on.double().sum(1), 1e-12, "l0")

    grads = torch.autograd.grad((f.float() * g_f.float()).sum() + (l0 * g_l0).sum(), leaves)
    gf = g_f.double()
    jump = (-th * gf - g_l0.double()[:, None]) / eps  # a window entry's term of grad θ
    ranges = (
        bracket(gf, step, near_step),  # grad pre = g_f · H
        bracket(gf, step, near_step, dim=0),  # grad b_enc = Σ_b g_f · H
        bracket(jump, window, near_window, dim=0),  # grad θ
    )
    for name, grad, leaf, (lo, hi) in zip(
        ("pre", "b_enc", "θ"), grads, leaves, ranges, strict=True
    ):
        assert grad.dtype == leaf.dtype, f"grad {name}: dtype {grad.dtype} != {leaf.dtype}"
        assert_rel_bracketed(grad, lo, hi, tol, f"grad {name}")
    return flips


@FNS
@pytest.mark.parametrize("B, n", [(9, 200), (3, 32), (2, 37)])
def test_jumprelu_fp32(fn, B, n):
    # a wide rectangle puts many entries inside it, so the θ pseudo-gradients are exercised
    _check(fn, *_inputs(B, n, torch.float32, 0.5, adversarial=False), 0.5, 1e-5)


@FNS
def test_jumprelu_fp32_at_the_last_bit(fn):
    """Thresholds on computed z and on the window edge: flips inside the band are accepted."""
    _check(fn, *_inputs(9, 300, torch.float32, 0.05, adversarial=True), 0.05, 1e-5)


def test_rounding_flips_are_real_and_accepted():
    """A correct fp32 computation (the reference, fp32 math) at a size where thresholds on the
    computed z make H differ from float64: the check counts those flips and passes."""
    flips = _check(
        jumprelu_reference, *_inputs(64, 3000, torch.float32, 0.05, True, "cpu"), 0.05, 1e-5
    )
    assert flips > 0


@pytest.mark.parametrize(
    "wrong",
    [
        lambda pre, b, th, eps: jumprelu_reference(pre, b, th * (1 + 1e-3), eps),  # θ drifts
        lambda pre, b, th, eps: jumprelu_reference(pre, b, th, 1.1 * eps),  # a wider window
        lambda pre, b, th, eps: jumprelu_reference(pre, b.bfloat16().float(), th, eps),  # b rounded
    ],
    ids=["theta", "window", "bias"],
)
def test_check_catches_errors_beyond_rounding(wrong):
    pre, b_enc, theta = _inputs(64, 3000, torch.float32, 0.05, True, "cpu")
    with pytest.raises(AssertionError):
        _check(wrong, pre, b_enc, theta, 0.05, 1e-5)


@FNS
def test_jumprelu_pseudo_derivatives_at_the_threshold(fn):
    """Entries at θ + u·ε: inside the rectangle (|u| < 1/2) the θ derivatives are -θ/ε for f and
    -1/ε for l0, outside they are 0; exactly at θ, H = 0 (f = 0) and the entry is inside."""
    eps = 1e-3
    offsets = torch.tensor([0.0, 0.25, -0.25, 0.45, -0.45, 0.55, -0.55, 0.75, -0.75, 3.0, -3.0])
    theta = torch.tensor([1e-3, 0.02, 0.5, 2.0], device=DEVICE)
    pre = (theta[None, :] + offsets[:, None].to(DEVICE) * eps).contiguous()
    b_enc = torch.zeros(4, device=DEVICE)
    leaves = [t.requires_grad_() for t in (pre, b_enc, theta)]
    f, l0 = fn(*leaves, eps)
    above = (offsets > 0).float().to(DEVICE)[:, None].expand(-1, 4)
    inside = (offsets.abs() < 0.5).float().to(DEVICE)[:, None].expand(-1, 4)
    torch.testing.assert_close(f.detach(), pre.detach() * above, rtol=0, atol=0)
    torch.testing.assert_close(l0.detach(), above.sum(1), rtol=0, atol=0)

    d_pre, d_b, d_theta = torch.autograd.grad(f.sum(), leaves, retain_graph=True)
    torch.testing.assert_close(d_pre, above, rtol=0, atol=0)  # the true gradient, H(z - θ)
    torch.testing.assert_close(d_b, above.sum(0), rtol=0, atol=0)
    torch.testing.assert_close(d_theta, -theta.detach() / eps * inside.sum(0), rtol=1e-6, atol=0)

    d_pre, d_b, d_theta = torch.autograd.grad(l0.sum(), leaves, allow_unused=True)
    assert d_pre is None or (d_pre == 0).all()  # the L0 count passes nothing to z
    assert d_b is None or (d_b == 0).all()
    torch.testing.assert_close(d_theta, -inside.sum(0) / eps, rtol=1e-6, atol=0)


def _args(B=4, n=10):
    return {"pre": torch.randn(B, n), "b_enc": torch.zeros(n), "threshold": torch.ones(n)}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"pre": lambda t: t[0]}, r"pre must have shape \[B, n\]"),
        ({"pre": lambda t: t.t()}, "pre must be contiguous"),
        ({"pre": lambda t: t.double()}, "pre must have dtype"),
        ({"b_enc": lambda t: t[:9]}, r"b_enc must have shape \[n=10\]"),
        ({"threshold": lambda t: t[None]}, r"threshold must have shape \[n=10\]"),
        ({"threshold": lambda t: t.int()}, "threshold must have dtype"),
    ],
)
def test_jumprelu_launcher_errors(change, match):
    assert_launcher_error(jumprelu_forward, _args(), change, match)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"grad_f": lambda t: t[:, :9]}, r"grad_f must have shape \[B=4, n=10\]"),
        ({"grad_l0": lambda t: t[:3]}, r"grad_l0 must have shape \[B=4\]"),
        ({"threshold": lambda t: t.int()}, "threshold must have dtype"),
    ],
)
def test_jumprelu_backward_launcher_errors(change, match):
    args = {**_args(), "grad_f": torch.randn(4, 10), "grad_l0": torch.randn(4), "bandwidth": 0.1}
    assert_launcher_error(jumprelu_backward, args, change, match)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("B, n", [(8192, 32768), (4096, 65536), (7, 1000)])
@pytest.mark.parametrize("adversarial", [False, True])
def test_jumprelu_gpu(dtype, tol, B, n, adversarial):
    _check(jumprelu, *_inputs(B, n, dtype, 0.05, adversarial, device="cuda"), 0.05, tol)


@pytest.mark.gpu
def test_jumprelu_gpu_autocast():
    """fp32 master parameters under bf16 autocast: bf16 f, fp32 l0 and gradients."""
    x = torch.randn(512, 768, device="cuda")
    W_enc = (torch.randn(768, 8192, device="cuda") / 768**0.5).requires_grad_()
    b_enc = torch.zeros(8192, device="cuda", requires_grad=True)
    log_theta = torch.full((8192,), -2.0, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        f, l0 = jumprelu(x @ W_enc, b_enc, log_theta.exp(), 0.05)
    assert f.dtype == torch.bfloat16 and l0.dtype == torch.float32
    (f.float().square().sum() + l0.sum()).backward()
    assert_fp32_grads(W_enc, b_enc, log_theta)
    assert (log_theta.grad != 0).any()
