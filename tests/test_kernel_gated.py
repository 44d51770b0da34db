import pytest
import torch

from flashsae.kernels import gated
from flashsae.kernels.gated_kernels import gated_backward, gated_forward, gated_reference
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

FNS = kernel_and_reference(gated, gated_reference)


def _inputs(B, n, dtype, device, adversarial=False):
    """Random (pre [B, n] in dtype, b_gate, r_mag, b_mag). adversarial: in every third latent
    b_mag cancels the fp32 exp(r_mag) · pre of the row with the widest-open gate (π_mag ≈ 0
    there), in the next one b_gate = -pre of row 0 (π_gate = 0 exactly)."""
    pre = torch.randn(B, n, device=device).to(dtype)
    b_gate = 0.3 * torch.randn(n, device=device)
    r_mag = 0.5 * torch.randn(n, device=device)
    b_mag = 0.3 * torch.randn(n, device=device)  # differs from b_gate: gate and mag disagree
    if adversarial:
        p = pre.float()
        cols = torch.arange(n, device=device)
        row = (p + b_gate).argmax(0)
        col = cols % 3
        b_mag = torch.where(col == 0, -(p[row, cols] * torch.exp(r_mag)), b_mag)
        b_gate = torch.where(col == 1, -p[0], b_gate)
    return pre, b_gate, r_mag, b_mag


def _check(fn, inputs, tol, frozen_pre=False):
    """fn against a float64 oracle on the same rounded inputs. fl(pre + b_gate) has the sign of
    pre + b_gate, but allow 2 fp32 ulps of |pre| + |b_gate| anyway; π_mag uses exp(r_mag), which
    on the GPU is ex2.approx (relative error ≤ 2^-21 with the rounding of r_mag · log2 e), so the
    sign of π_mag may differ from float64 where |π_mag| ≤ 2^-20 |exp(r_mag) pre| + 2 ulps.
    Decisions are compared by flips inside those bands; f and g against the oracle resolved with
    the kernel's gate (g ≠ 0), gradients within the range the bands leave open. Returns the
    number of flipped 1[π_gate > 0]·1[π_mag > 0] decisions."""
    leaves = [t.detach().clone().requires_grad_(not (frozen_pre and i == 0))
              for i, t in enumerate(inputs)]  # fmt: skip
    with poison_outputs():
        f, g = fn(*leaves)
    B, n = inputs[0].shape
    assert f.shape == g.shape == (B, n) and f.dtype == g.dtype == inputs[0].dtype

    p, b_gate, r_mag, b_mag = (t.double() for t in inputs)
    scale = r_mag.exp()
    gate, mag = p + b_gate, p * scale + b_mag
    near_gate = gate.abs() <= 2 * ulp32(p.abs() + b_gate.abs())
    near_mag = mag.abs() <= 2.0**-20 * (p * scale).abs() + 2 * ulp32(
        (p * scale).abs() + b_mag.abs()
    )
    open_gate, active = gate > 0, (gate > 0) & (mag > 0)
    near_active = near_gate | near_mag

    on_g = g.detach() != 0
    assert_flips(on_g, open_gate, near_gate, "1[π_gate > 0]")
    flips = assert_flips(f.detach() != 0, active, near_active, "1[π_gate > 0]·1[π_mag > 0]")
    ref_f = torch.where(on_g, mag.clamp_min(0), 0.0)
    assert_rel(f.detach(), ref_f, tol, "f")
    assert_rel(g.detach(), torch.where(on_g, gate, 0.0), tol, "g")
    assert ((ref_f == 0) & on_g).any() and ((ref_f > 0) & on_g).any()

    g_f, g_g = torch.randn_like(f), torch.randn_like(g)
    wanted = leaves[1:] if frozen_pre else leaves
    loss = (f.float() * g_f.float()).sum() + (g.float() * g_g.float()).sum()
    grads = torch.autograd.grad(loss, wanted)
    df, dg = g_f.double(), g_g.double()
    lo_mag, hi_mag = bracket(df * scale, active, near_active)
    lo_gate, hi_gate = bracket(dg, open_gate, near_gate)
    ranges = {
        "pre": (lo_mag + lo_gate, hi_mag + hi_gate),  # df·A·exp(r_mag) + dg·G
        "b_gate": bracket(dg, open_gate, near_gate, dim=0),
        "r_mag": bracket(df * scale * p, active, near_active, dim=0),
        "b_mag": bracket(df, active, near_active, dim=0),
    }
    names = ("pre", "b_gate", "r_mag", "b_mag")[1 if frozen_pre else 0 :]
    for name, grad, leaf in zip(names, grads, wanted, strict=True):
        assert grad.dtype == leaf.dtype, f"grad {name}: dtype {grad.dtype} != {leaf.dtype}"
        assert_rel_bracketed(grad, *ranges[name], tol, f"grad {name}")
    return flips


@FNS
@pytest.mark.parametrize("B, n", [(9, 200), (3, 32), (2, 37)])
def test_gated_fp32(fn, B, n):
    _check(fn, _inputs(B, n, torch.float32, DEVICE), 1e-5)


@FNS
def test_gated_fp32_at_the_last_bit(fn):
    """π_mag ≈ 0 and π_gate = 0 on purpose: flips inside the bands are accepted."""
    _check(fn, _inputs(9, 300, torch.float32, DEVICE, adversarial=True), 1e-5)


def test_gated_check_accepts_approximate_exp():
    """A correct fp32 computation whose exp(r_mag) is off by 2^-22 relative (as ex2.approx may
    be) passes, with flipped π_mag signs; an exp off by 2^-12 does not."""

    def with_exp_error(rel):
        def fn(pre, b_gate, r_mag, b_mag):
            r = r_mag + torch.log1p(torch.tensor(rel))  # exp(r) · (1 + rel), through autograd
            return gated_reference(pre, b_gate, r, b_mag)

        return fn

    inputs = _inputs(64, 3000, torch.float32, "cpu", adversarial=True)
    assert _check(with_exp_error(2.0**-22), inputs, 1e-5) > 0
    with pytest.raises(AssertionError):
        _check(with_exp_error(2.0**-12), inputs, 1e-5)


@FNS
def test_gated_frozen_encoder(fn):
    """Rescale & shift trains only r_mag and b_mag: pre needs no gradient (none is written)."""
    _check(fn, _inputs(9, 70, torch.float32, DEVICE), 1e-5, frozen_pre=True)


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
@pytest.mark.parametrize("adversarial", [False, True])
def test_gated_gpu(dtype, tol, B, n, adversarial):
    _check(gated, _inputs(B, n, dtype, "cuda", adversarial), tol)


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
