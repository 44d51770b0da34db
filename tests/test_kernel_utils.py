"""Shared helpers for the kernel tests (imported by the other test_kernel_* files) and tests of
kernels/utils.py: dispatch, autocast casting, input checks."""

import contextlib
from unittest import mock

import pytest
import torch

from flashsae.kernels import encode_topk, sparse_decode, topk
from flashsae.kernels.utils import autocast_inputs, check_tensor, use_triton

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


def test_use_triton_follows_interpreter_flag(monkeypatch):
    t = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(t)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(t)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not use_triton(t)


def test_cpu_tensors_use_the_reference_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("the CPU dispatch is what is tested here")
    z = torch.randn(3, 20, requires_grad=True)
    values, _ = topk(z, 4)
    assert type(values.grad_fn).__name__ == "ReluBackward0"
    W_enc = torch.randn(6, 20, requires_grad=True)
    values, indices = encode_topk(torch.randn(3, 6), W_enc, torch.zeros(20), torch.zeros(6), 4)
    assert type(values.grad_fn).__name__ == "ReluBackward0"
    out = sparse_decode(values, indices, torch.randn(20, 6, requires_grad=True), torch.zeros(6))
    assert type(out.grad_fn).__name__ == "AddBackward0"


def test_interpreter_dispatches_to_triton():
    if not use_triton(torch.zeros(1)):
        pytest.skip("needs the interpreter or CUDA")
    z = torch.randn(2, 16, device=DEVICE, requires_grad=True)
    values, _ = topk(z, 2)
    assert type(values.grad_fn).__name__ == "TopKFunctionBackward"


def test_autocast_inputs_casts_floats_only():
    x, idx = torch.randn(2, 3), torch.zeros(2, dtype=torch.int32)
    assert autocast_inputs(x, idx)[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, cidx = autocast_inputs(x, idx)
    assert cx.dtype == torch.bfloat16 and cidx.dtype == torch.int32


@pytest.mark.parametrize(
    "t, match",
    [
        (torch.zeros(3), r"must have shape \[n, d\], got \(3,\)"),
        (torch.zeros(3, 5), r"must have shape \[n, d\], got \(3, 5\)"),
        (torch.zeros(4, 5, dtype=torch.float64), "must have dtype float32, bfloat16, float16"),
        (torch.zeros(5, 4).t(), "must be contiguous"),
    ],
)
def test_check_tensor_messages(t, match):
    with pytest.raises(ValueError, match=match):
        check_tensor("W", t, (4, None), (torch.float32, torch.bfloat16, torch.float16), "[n, d]")
