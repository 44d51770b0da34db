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
    assert_fp32_grads,
    assert_grads,
    assert_launcher_error,
    assert_rel,
    kernel_and_reference,
    poison_outputs,
)

FNS = kernel_and_reference(jumprelu, jumprelu_reference)


def _oracle(pre, b_enc, theta, g_f, g_l0, eps):
    """float64, written out: (f, l0) and the gradients of Σ f·g_f + Σ l0·g_l0 w.r.t.
    (pre, b_enc, θ): true ones for z, rectangle-kernel pseudo-derivatives for θ."""
    pre, b_enc, theta, g_f, g_l0 = (t.double() for t in (pre, b_enc, theta, g_f, g_l0))
    z = pre + b_enc
    step = (z > theta).double()
    window = ((z - theta).abs() < eps / 2).double() / eps
    dz = g_f * step
    dtheta = (-theta * window * g_f - window * g_l0[:, None]).sum(0)
    return z * step, step.sum(1), (dz, dz.sum(0), dtheta)


def _check(fn, B, n, dtype, tol, eps, device=DEVICE):
    pre = torch.randn(B, n, device=device).to(dtype)
    b_enc = 0.1 * torch.randn(n, device=device)
    theta = torch.exp(torch.randn(n, device=device) * 0.5 - 1)
    leaves = [t.requires_grad_() for t in (pre, b_enc, theta)]
    with poison_outputs():
        f, l0 = fn(*leaves, eps)
    assert f.shape == (B, n) and f.dtype == dtype and l0.shape == (B,)
    g_f, g_l0 = torch.randn_like(f), torch.randn_like(l0)
    ref_f, ref_l0, ref_grads = _oracle(*(t.detach() for t in leaves), g_f, g_l0, eps)
    assert_rel(f.detach(), ref_f, tol, "f")
    assert_rel(l0.detach(), ref_l0, 1e-12, "l0")
    window = ((pre.double() + b_enc.double() - theta.double()).abs() < eps / 2).sum()
    assert window > 0, "no pre-activation inside the rectangle: the θ gradient is untested"
    grads = torch.autograd.grad((f.float() * g_f.float()).sum() + (l0 * g_l0).sum(), leaves)
    assert_grads(("pre", "b_enc", "θ"), grads, ref_grads, leaves, tol)


@FNS
@pytest.mark.parametrize("B, n", [(9, 200), (3, 32), (2, 37)])
def test_jumprelu_fp32(fn, B, n):
    # a wide rectangle puts many entries inside it, so the θ pseudo-gradients are exercised
    _check(fn, B, n, torch.float32, 1e-5, eps=0.5)


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
def test_jumprelu_gpu(dtype, tol, B, n):
    _check(jumprelu, B, n, dtype, tol, eps=0.05, device="cuda")


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
