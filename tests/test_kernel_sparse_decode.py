import pytest
import torch

from flashsae.kernels import sparse_decode
from flashsae.kernels.sparse_decode_kernels import gather_sum, sparse_decode_reference
from tests.test_kernel_utils import DEVICE, assert_rel, poison_outputs


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
    return out.detach(), grads


def _check(B, k, n, d, dtype, tol, device=DEVICE):
    values, indices, W_dec, b_dec = _inputs(B, k, n, d, dtype, device)
    grad_out = torch.randn(B, d, device=device, dtype=dtype)
    with poison_outputs():
        out, grads = _run(sparse_decode, values, indices, W_dec, b_dec, grad_out)
    ref_out, ref_grads = _run(
        sparse_decode_reference, values.double(), indices, W_dec.double(), b_dec.double(),
        grad_out.double(),
    )  # fmt: skip
    assert out.dtype == dtype
    assert_rel(out, ref_out, tol, "x_hat")
    for name, grad, ref in zip(("values", "W_dec", "b_dec"), grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        assert_rel(grad, ref, tol, f"grad {name}")


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


def test_gather_sum_mixed_dtypes_without_bias():
    """The encoder backward's use: fp32 coefficients, another weight dtype, no bias."""
    values, indices, W, _ = _inputs(4, 3, 10, 6, torch.float32)
    with poison_outputs():
        out = gather_sum(values, indices, W.half(), None, torch.float32)
    ref = torch.nn.functional.embedding_bag(
        indices.long(), W.half().double(), per_sample_weights=values.double(), mode="sum"
    )
    assert_rel(out, ref, 1e-6, "gather_sum")


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
    for name, fn in change.items():
        args[name] = fn(args[name])
    with pytest.raises(ValueError, match=match):
        gather_sum(args["values"], args["indices"], args["W_dec"], args["b_dec"], torch.float32)


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
    assert W_dec.grad.dtype == torch.float32 and torch.isfinite(W_dec.grad).all()
