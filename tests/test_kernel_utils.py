"""kernels/utils.py: dispatch, autocast casting (in every differentiable public function),
input checks, grid splits."""

import pytest
import torch

from flashsae.kernels import (
    batch_topk,
    encode_topk,
    gated,
    jumprelu,
    sparse_decode,
    topk,
)
from flashsae.kernels.utils import autocast_inputs, check_tensor, column_splits, use_triton
from tests.kernel_checks import DEVICE, assert_fp32_grads


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


@pytest.mark.parametrize(
    "B, n, block_m, block_n",
    [(1, 10, 4, 32), (5, 200, 4, 32), (9, 200, 4, 32), (100, 32, 4, 32), (37, 70, 16, 32)],
)
def test_column_splits_cover_every_row_once(B, n, block_m, block_n):
    splits, rows_per_split = column_splits(B, n, block_m, block_n, torch.device(DEVICE))
    assert rows_per_split % block_m == 0
    assert (splits - 1) * rows_per_split < B <= splits * rows_per_split  # no empty split
    assert 1 <= splits <= -(-B // block_m)
    if not torch.cuda.is_available():  # the interpreter: two splits per column block at most
        assert splits == min(2, -(-B // block_m))


# Autocast on the CPU (under the interpreter) takes float16: the interpreter rounds bf16 wrongly.
AUTOCAST_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def _autocast_case(name):
    """(function of the float inputs returning its main float output, the inputs, which inputs
    the function casts): the [n] vectors of gated and jumprelu keep their dtype."""
    B, d, n, k = 3, 8, 40, 4
    idx = torch.randint(0, n, (B, k), device=DEVICE, dtype=torch.int32)

    def r(*shape):
        return torch.randn(*shape, device=DEVICE)

    return {
        "topk": (lambda z: topk(z, k)[0], [r(B, n)], [True]),
        "batch_topk": (lambda z: batch_topk(z, k)[0], [r(B, n)], [True]),
        "encode_topk": (  # x and b_dec stay fp32: the centring x - b_dec is done in fp32
            lambda *t: encode_topk(*t, k)[0],
            [r(B, d), r(d, n), r(n), r(d)],
            [False, True, False, False],
        ),
        "gated": (lambda *t: gated(*t)[0], [r(B, n), r(n), r(n), r(n)], [True] + [False] * 3),
        "jumprelu": (
            lambda *t: jumprelu(*t, 0.5)[0],
            [r(B, n), r(n), r(n).abs() + 0.1],
            [True, False, False],
        ),
        "sparse_decode": (
            lambda v, W, b: sparse_decode(v, idx, W, b),
            [r(B, k), r(n, d), r(d)],
            [True] * 3,
        ),
    }[name]


@pytest.mark.parametrize(
    "name", ["topk", "batch_topk", "encode_topk", "gated", "jumprelu", "sparse_decode"]
)
def test_public_functions_cast_under_autocast(name):
    """fp32 inputs under autocast give the output of the autocast-dtype inputs, and fp32
    gradients (the cast is in the autograd graph)."""
    if not use_triton(torch.zeros(1, device=DEVICE)):
        pytest.skip("needs the interpreter or CUDA")
    fn, inputs, cast = _autocast_case(name)
    leaves = [t.requires_grad_() for t in inputs]
    with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE):
        out = fn(*leaves)
    assert out.dtype == AUTOCAST_DTYPE
    expected = fn(
        *(
            t.detach().to(AUTOCAST_DTYPE) if c else t.detach()
            for t, c in zip(leaves, cast, strict=True)
        )
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert_fp32_grads(*leaves)
