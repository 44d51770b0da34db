import pytest
import torch

from flashsae.kernels import gated
from flashsae.kernels.gated_kernels import gated_backward, gated_forward, gated_reference
from tests.kernel_checks import (
    DEVICE,
    assert_fp32_grads,
    assert_grads,
    assert_launcher_error,
    assert_rel,
    float64_leaves,
    kernel_and_reference,
    poison_outputs,
)

FNS = kernel_and_reference(gated, gated_reference)


def _oracle(pre, b_gate, r_mag, b_mag):
    """float64, written out from the Gated SAE equations; differentiable."""
    gate = pre + b_gate
    mag = torch.exp(r_mag) * pre + b_mag
    return (gate > 0).double() * mag.clamp_min(0), gate.clamp_min(0)


def _inputs(B, n, dtype, device):
    pre = torch.randn(B, n, device=device).to(dtype)
    b_gate = 0.3 * torch.randn(n, device=device)
    r_mag = 0.5 * torch.randn(n, device=device)
    b_mag = 0.3 * torch.randn(n, device=device)  # differs from b_gate: gate and mag disagree
    return pre, b_gate, r_mag, b_mag


def _check(fn, B, n, dtype, tol, frozen_pre=False, device=DEVICE):
    inputs = _inputs(B, n, dtype, device)
    leaves = [t.requires_grad_(not (frozen_pre and i == 0)) for i, t in enumerate(inputs)]
    with poison_outputs():
        f, g = fn(*leaves)
    assert f.shape == g.shape == (B, n) and f.dtype == g.dtype == dtype

    ref_leaves = float64_leaves(leaves)
    ref_f, ref_g = _oracle(*ref_leaves)
    assert_rel(f.detach(), ref_f.detach(), tol, "f")
    assert_rel(g.detach(), ref_g.detach(), tol, "g")
    gate_open = ref_g.detach() > 0
    assert ((ref_f.detach() == 0) & gate_open).any() and ((ref_f.detach() > 0) & gate_open).any()

    g_f, g_g = torch.randn_like(f), torch.randn_like(g)
    wanted = leaves[1:] if frozen_pre else leaves
    loss = (f.float() * g_f.float()).sum() + (g.float() * g_g.float()).sum()
    grads = torch.autograd.grad(loss, wanted)
    ref_loss = (ref_f * g_f.double()).sum() + (ref_g * g_g.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves[1:] if frozen_pre else ref_leaves)
    names = ("pre", "b_gate", "r_mag", "b_mag")[1 if frozen_pre else 0 :]
    assert_grads(names, grads, ref_grads, wanted, tol)


@FNS
@pytest.mark.parametrize("B, n", [(9, 200), (3, 32), (2, 37)])
def test_gated_fp32(fn, B, n):
    _check(fn, B, n, torch.float32, 1e-5)


@FNS
def test_gated_frozen_encoder(fn):
    """Rescale & shift trains only r_mag and b_mag: pre needs no gradient (none is written)."""
    _check(fn, 9, 70, torch.float32, 1e-5, frozen_pre=True)


@FNS
def test_gated_tied_paths_at_init(fn):
    """r_mag = 0 and b_mag = b_gate make both paths one ReLU: f = g."""
    pre, b_gate, _, _ = _inputs(5, 40, torch.float32, DEVICE)
    f, g = fn(pre, b_gate, torch.zeros_like(b_gate), b_gate.clone())
    torch.testing.assert_close(f, g, rtol=0, atol=0)


def _args(B=4, n=10):
    return {"pre": torch.randn(B, n), "b_gate": torch.zeros(n), "r_mag": torch.zeros(n),
            "b_mag": torch.zeros(n)}  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        ({"pre": lambda t: t[0]}, r"pre must have shape \[B, n\]"),
        ({"pre": lambda t: t.t()}, "pre must be contiguous"),
        ({"pre": lambda t: t.double()}, "pre must have dtype"),
        ({"b_gate": lambda t: t[:9]}, r"b_gate must have shape \[n=10\]"),
        ({"r_mag": lambda t: t.int()}, "r_mag must have dtype"),
        ({"b_mag": lambda t: t[None]}, r"b_mag must have shape \[n=10\]"),
    ],
)
def test_gated_launcher_errors(change, match):
    assert_launcher_error(gated_forward, _args(), change, match)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"grad_f": lambda t: t[:3]}, r"grad_f must have shape \[B=4, n=10\]"),
        ({"grad_g": lambda t: t.double()}, "grad_g must have dtype"),
        ({"b_mag": lambda t: t[:9]}, r"b_mag must have shape \[n=10\]"),
    ],
)
def test_gated_backward_launcher_errors(change, match):
    args = {**_args(), "grad_f": torch.randn(4, 10), "grad_g": torch.randn(4, 10), "need_pre": True}
    assert_launcher_error(gated_backward, args, change, match)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("B, n", [(8192, 32768), (4096, 65536), (7, 1000)])
def test_gated_gpu(dtype, tol, B, n):
    _check(gated, B, n, dtype, tol, device="cuda")


@pytest.mark.gpu
def test_gated_gpu_autocast():
    """fp32 master parameters under bf16 autocast: bf16 f and g, fp32 gradients."""
    x = torch.randn(512, 768, device="cuda")
    W_enc = (torch.randn(768, 8192, device="cuda") / 768**0.5).requires_grad_()
    vectors = [torch.zeros(8192, device="cuda", requires_grad=True) for _ in range(3)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        f, g = gated(x @ W_enc, *vectors)
    assert f.dtype == g.dtype == torch.bfloat16
    (f.float().square().sum() + g.float().sum()).backward()
    assert_fp32_grads(W_enc, *vectors)
