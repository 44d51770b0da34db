import pytest
import torch

from flashsae.kernels import sparse_decode
from flashsae.kernels.sparse_decode_kernels import (
    sparse_decode_backward,
    sparse_decode_forward,
    sparse_decode_reference,
)
from tests.kernel_checks import (
    DEVICE,
    assert_fp32_grads,
    assert_grads,
    assert_launcher_error,
    assert_rel,
    poison_outputs,
)


def _inputs(B, k, n, d, dtype, device=DEVICE):
    values = torch.randn(B, k, device=device, dtype=dtype)
    indices = torch.randint(0, n, (B, k), device=device, dtype=torch.int32)  # repeats allowed
    W_dec = torch.randn(n, d, device=device, dtype=dtype)
    b_dec = torch.randn(d, device=device, dtype=dtype)
    return values, indices, W_dec, b_dec


def _run(fn, values, indices, W_dec, b_dec, grad_out):
    leaves = [t.detach().requires_grad_() for t in (values, W_dec, b_dec)]
    out = fn(leaves[0], indices, leaves[1], leaves[2])
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads, leaves


def _check(B, k, n, d, dtype, tol, device=DEVICE):
    values, indices, W_dec, b_dec = _inputs(B, k, n, d, dtype, device)
    grad_out = torch.randn(B, d, device=device, dtype=dtype)
    with poison_outputs():
        out, grads, leaves = _run(sparse_decode, values, indices, W_dec, b_dec, grad_out)
    ref_out, ref_grads, _ = _run(
        sparse_decode_reference, values.double(), indices, W_dec.double(), b_dec.double(),
        grad_out.double(),
    )  # fmt: skip
    assert out.dtype == dtype
    assert_rel(out, ref_out, tol, "x_hat")
    assert_grads(("values", "W_dec", "b_dec"), grads, ref_grads, leaves, tol)


@pytest.mark.parametrize(
    "B, k, n, d",
    [
        (5, 7, 50, 37),  # nothing a power of two
        (40, 4, 8, 20),  # ~20 (row, slot) pairs per latent: several pair blocks per tile
        (3, 1, 100, 300),  # k = 1; d spans two column blocks; most latents unused
    ],
)
def test_sparse_decode_fp32(B, k, n, d):
    _check(B, k, n, d, torch.float32, 1e-5)


def test_sparse_decode_forward_mixed_dtypes_without_bias():
    """The encoder backward's use: fp32 coefficients, another weight dtype, no bias."""
    values, indices, W, _ = _inputs(4, 3, 10, 6, torch.float32)
    with poison_outputs():
        out = sparse_decode_forward(values, indices, W.half(), None, torch.float32)
    ref = torch.nn.functional.embedding_bag(
        indices.long(), W.half().double(), per_sample_weights=values.double(), mode="sum"
    )
    assert_rel(out, ref, 1e-6, "sparse_decode_forward")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"indices": lambda t: t.long()}, "indices must have dtype int32"),
        ({"values": lambda t: t[:, :2].contiguous()}, r"values must have shape \[B=4, k=3\]"),
        ({"W_dec": lambda t: t.reshape(-1)}, r"W_dec must have shape \[n, d\]"),
        ({"W_dec": lambda t: t.t().contiguous().t()}, "W_dec must be contiguous"),
        ({"W_dec": lambda t: t.double()}, "W_dec must have dtype"),
        ({"b_dec": lambda t: t[:5]}, r"b_dec must have shape \[d=6\]"),
    ],
)
def test_sparse_decode_launcher_errors(change, match):
    names = ("values", "indices", "W_dec", "b_dec")
    args = dict(zip(names, _inputs(4, 3, 10, 6, torch.float32), strict=True))
    assert_launcher_error(
        sparse_decode_forward, {**args, "out_dtype": torch.float32}, change, match
    )


@pytest.mark.parametrize(
    "change, match",
    [
        ({"grad_out": lambda t: t[:, :5]}, r"grad_out must have shape \[B=4, d=6\]"),
        ({"grad_out": lambda t: t.int()}, "grad_out must have dtype"),
        ({"indices": lambda t: t.long()}, "indices must have dtype int32"),
    ],
)
def test_sparse_decode_backward_launcher_errors(change, match):
    values, indices, W_dec, _ = _inputs(4, 3, 10, 6, torch.float32)
    args = {"grad_out": torch.randn(4, 6), "values": values, "indices": indices, "W_dec": W_dec,
            "needs_input_grad": (True, False, True, True)}  # fmt: skip
    assert_launcher_error(sparse_decode_backward, args, change, match)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_sparse_decode_gpu(dtype, tol):
    _check(4096, 32, 32768, 768, dtype, tol, device="cuda")


@pytest.mark.gpu
def test_sparse_decode_gpu_autocast():
    """fp32 master weights under bf16 autocast: bf16 output, fp32 gradients."""
    values, indices, W_dec, b_dec = _inputs(256, 32, 4096, 768, torch.float32, "cuda")
    W_dec.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sparse_decode(values, indices, W_dec, b_dec)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert_fp32_grads(W_dec)
