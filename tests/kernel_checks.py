"""Helpers shared by the kernel tests (tests/test_kernel_*.py): poisoned outputs, relative
errors, gradient comparison, input generators, launcher-error checks, and the comparison of
discontinuous functions (Heaviside steps, windows, ReLU gates) against a float64 oracle, where
rounding may flip decisions next to the threshold."""

import contextlib
from collections.abc import Callable, Sequence
from unittest import mock

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Written into every tensor a launcher allocates with torch.empty, so that any element a kernel
# fails to write shows up: NaN for floats, an out-of-range index for int32, a key that would win
# every top-k for int64.
_POISON_INT = {torch.int32: 2**30, torch.int64: 2**62}
_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in _POISON_INT:
        t.fill_(_POISON_INT[t.dtype])
    return t


@contextlib.contextmanager
def poison_outputs():
    """Make torch.empty return poisoned tensors inside the block."""
    with mock.patch.object(torch, "empty", _poisoned_empty):
        yield


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute error when ref is zero)."""
    out, ref = out.double(), ref.double()
    diff = torch.linalg.vector_norm(out - ref).item()
    scale = torch.linalg.vector_norm(ref).item()
    return diff / scale if scale > 0 else diff


def assert_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = rel_err(out, ref)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e}"


def ulp32(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the fp32 numbers at |t|, in float64: 2^(e - 24) for |t| in [2^(e-1), 2^e)
    (at least 2^-149, the subnormal spacing)."""
    _, e = torch.frexp(t.double().abs())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), (e - 24).clamp_min(-149))


def assert_flips(out_on: torch.Tensor, ref_on: torch.Tensor, near: torch.Tensor, name: str) -> int:
    """The kernel's decisions out_on (e.g. f != 0) agree with the oracle's ref_on everywhere
    except where ``near`` (the oracle's argument within a stated rounding band of the
    threshold). Returns the number of flips, all of them inside the band."""
    flips = out_on != ref_on
    stray = flips & ~near
    if stray.any():
        where = tuple(i.item() for i in stray.nonzero()[0])
        raise AssertionError(
            f"{name}: {stray.sum().item()} decisions differ from the oracle outside the "
            f"rounding band (first at {where}), {flips.sum().item()} in all"
        )
    return int(flips.sum().item())


def bracket(
    on_value: torch.Tensor,
    ref_on: torch.Tensor,
    near: torch.Tensor,
    dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [lo, hi] of Σ_dim on_value · 1[decision] (elementwise when dim is None) over
    every choice of the decisions inside the rounding band ``near``; outside it the decision
    is the oracle's ref_on. on_value is what a term contributes when its decision is on."""
    v = on_value.double()
    fixed = torch.where(ref_on & ~near, v, 0.0)
    lo = fixed + torch.where(near, v.clamp(max=0), 0.0)
    hi = fixed + torch.where(near, v.clamp(min=0), 0.0)
    return (lo, hi) if dim is None else (lo.sum(dim), hi.sum(dim))


def assert_rel_bracketed(
    out: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tol: float, name: str
) -> None:
    """||out - clamp(out, lo, hi)|| / ||(lo + hi) / 2|| < tol: out is within relative error tol
    of some value the oracle allows, given the decisions left free by ``bracket``."""
    assert out.shape == lo.shape, f"{name}: shape {tuple(out.shape)} != {tuple(lo.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    o = out.double()
    excess = o - torch.minimum(torch.maximum(o, lo), hi)
    scale = torch.linalg.vector_norm((lo + hi) / 2).item()
    err = torch.linalg.vector_norm(excess).item() / (scale if scale > 0 else 1.0)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} beyond the rounding band"


def float64_leaves(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Detached float64 copies that require grad: the inputs of a float64 oracle."""
    return [t.detach().double().requires_grad_() for t in tensors]


def assert_grads(
    names: Sequence[str],
    grads: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    leaves: Sequence[torch.Tensor],
    tol: float,
) -> None:
    """Each gradient has its leaf's dtype and is within relative error tol of the reference."""
    for name, grad, ref, leaf in zip(names, grads, refs, leaves, strict=True):
        assert grad.dtype == leaf.dtype, f"grad {name}: dtype {grad.dtype} != {leaf.dtype}"
        assert_rel(grad, ref, tol, f"grad {name}")


def assert_fp32_grads(*params: torch.Tensor) -> None:
    """fp32 master parameters received finite fp32 gradients (after backward under autocast)."""
    for t in params:
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


def kernel_and_reference(kernel: Callable, reference: Callable) -> pytest.MarkDecorator:
    """Parametrize a test's ``fn`` over the public function and its torch reference."""
    return pytest.mark.parametrize("fn", [kernel, reference], ids=["kernel", "reference"])


def topk_inputs(kind: str, B: int, n: int, device: str = DEVICE) -> torch.Tensor:
    """Pre-activations [B, n]: "randn", "negative" (every entry below -0.1) or "ties" (integers
    in [-2, 2], heavily tied)."""
    if kind == "randn":
        return torch.randn(B, n, device=device)
    if kind == "negative":
        return -(torch.rand(B, n, device=device) + 0.1)
    return torch.randint(-2, 3, (B, n), device=device).float()


def assert_distinct_indices(indices: torch.Tensor, n: int) -> None:
    """Every index of a top-k selection is in [0, n) and no row repeats one."""
    idx = indices.long()
    assert ((idx >= 0) & (idx < n)).all(), "index out of range (unwritten?)"
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "repeated index in a row"


def assert_launcher_error(launcher: Callable, args: dict, change: dict, match: str) -> None:
    """launcher(**args), with each args[name] replaced by change[name](args[name]), raises a
    ValueError matching ``match``."""
    for name, fn in change.items():
        args[name] = fn(args[name])
    with pytest.raises(ValueError, match=match):
        launcher(**args)
