import pytest
import torch

from flashsae.kernels import topk
from flashsae.kernels.topk_kernels import topk_forward, topk_reference
from tests.kernel_checks import (
    assert_distinct_indices,
    assert_fp32_grads,
    poison_outputs,
    topk_inputs,
)


def assert_valid_topk(z: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor):
    """values/indices are ReLU'd top-k of z, whichever tied columns were chosen."""
    B, n = z.shape
    assert values.shape == (B, k) and indices.shape == (B, k)
    assert values.dtype == z.dtype and indices.dtype == torch.int32
    assert_distinct_indices(indices, n)
    picked = z.gather(1, indices.long())
    torch.testing.assert_close(values, picked.relu(), rtol=0, atol=0)
    expected = torch.topk(z, k, dim=1).values
    torch.testing.assert_close(picked.sort(dim=1, descending=True).values, expected, rtol=0, atol=0)
    assert (values.diff(dim=1) <= 0).all(), "values not sorted descending"


def expected_grad(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, g: torch.Tensor):
    """dL/dz for the selection the kernel made: g where the value is positive, scattered."""
    return torch.zeros_like(z).scatter(1, indices.long(), torch.where(values > 0, g, 0))


def run_and_check_topk(z, k):
    """topk on poisoned outputs: a valid selection, and the exact scattered gradient."""
    with poison_outputs():
        values, indices = topk(z, k)
    assert_valid_topk(z.detach(), k, values.detach(), indices)
    g = torch.randn_like(values)
    (grad,) = torch.autograd.grad(values, z, g)
    torch.testing.assert_close(grad, expected_grad(z, values, indices, g), rtol=0, atol=0)
    return values, indices, g, grad


@pytest.mark.parametrize(
    "kind, B, n, k",
    [
        ("randn", 3, 600, 8),  # many tiles, n not a power of two
        ("randn", 2, 100, 100),  # k = n, not a power of two
        ("randn", 4, 64, 1),
        ("negative", 3, 70, 5),
        ("ties", 5, 90, 16),
    ],
)
def test_topk_forward_backward(kind, B, n, k):
    z = topk_inputs(kind, B, n).requires_grad_()
    values, indices, g, grad = run_and_check_topk(z, k)
    if kind != "ties":  # a unique selection: the reference must agree exactly
        ref_values, ref_indices = topk_reference(z, k)
        (ref_grad,) = torch.autograd.grad(ref_values, z, g)
        torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
        assert torch.equal(indices.sort(1).values, ref_indices.sort(1).values)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    if kind == "negative":
        assert (values == 0).all() and (grad == 0).all()


@pytest.mark.parametrize(
    "z, k, match",
    [
        (torch.randn(8), 2, r"z must have shape \[B, n\]"),
        (torch.randn(2, 8), 0, r"k must be in \[1, n=8\], got 0"),
        (torch.randn(2, 8), 9, r"k must be in \[1, n=8\], got 9"),
        (torch.randint(0, 5, (2, 8)), 2, "z must have dtype"),
        (torch.randn(2, 8, dtype=torch.float64), 2, "z must have dtype"),
        (torch.randn(8, 2).t(), 2, "z must be contiguous"),
    ],
)
def test_topk_launcher_errors(z, k, match):
    with pytest.raises(ValueError, match=match):
        topk_forward(z, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, n, k", [(4096, 32768, 32), (1024, 131072, 64), (64, 3000, 3000)])
def test_topk_gpu(dtype, B, n, k):
    run_and_check_topk(torch.randn(B, n, device="cuda", dtype=dtype, requires_grad=True), k)


@pytest.mark.gpu
def test_topk_gpu_autocast():
    """fp32 pre-activations under bf16 autocast: the bf16 top-k, and an fp32 gradient."""
    z = torch.randn(4096, 32768, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        values, indices = topk(z, 32)
    ref_values, ref_indices = topk(z.detach().bfloat16(), 32)
    assert values.dtype == torch.bfloat16
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    assert torch.equal(indices, ref_indices)
    values.float().sum().backward()
    assert_fp32_grads(z)
