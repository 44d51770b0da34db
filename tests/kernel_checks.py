"""Helpers shared by the kernel tests (tests/test_kernel_*.py): poisoned outputs, relative
errors, gradient comparison, input generators and launcher-error checks."""

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
