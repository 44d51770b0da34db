import pytest
import torch

from flashsae.kernels import normalize_decoder_, remove_parallel_grad_
from flashsae.kernels.decoder_norm_kernels import (
    normalize_decoder_forward,
    normalize_decoder_reference,
    remove_parallel_grad_forward,
    remove_parallel_grad_reference,
)
from tests.kernel_checks import DEVICE, assert_rel


def _decoder(n, d, dtype, device):
    W = torch.randn(n, d, device=device) * torch.rand(n, 1, device=device) * 3
    W[1] = 0  # a zero row stays zero (and its gradient untouched)
    return W.to(dtype)


def _check_normalize(n, d, dtype, tol, device=DEVICE):
    W = torch.nn.Parameter(_decoder(n, d, dtype, device))
    expected = W.detach().double() / W.detach().double().norm(dim=1, keepdim=True).clamp_min(1e-30)
    ptr, version = W.data_ptr(), W._version
    assert normalize_decoder_(W) is W
    assert W.data_ptr() == ptr and W._version > version
    assert_rel(W.detach(), expected, tol, "W_dec")
    norms = W.detach().double().norm(dim=1)
    assert norms[1] == 0 and ((norms[2:] - 1).abs() < 10 * tol).all()


def _check_remove_parallel(n, d, dtype, tol, device=DEVICE):
    W = _decoder(n, d, dtype, device)
    grad = torch.randn(n, d, device=device, dtype=dtype)
    w, g = W.double(), grad.double()
    coef = (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-30)
    expected = g - coef * w
    version = grad._version
    assert remove_parallel_grad_(W, grad) is grad
    assert grad._version > version
    assert_rel(grad, expected, tol, "grad")
    torch.testing.assert_close(grad[1], g[1].to(dtype), rtol=0, atol=0)
    cos = (grad.double() * w).sum(1) / (grad.double().norm(dim=1) * w.norm(dim=1))
    assert cos[2:].abs().max() < 10 * tol


@pytest.mark.parametrize("n, d", [(37, 300), (5, 3)])
def test_normalize_decoder(n, d):
    _check_normalize(n, d, torch.float32, 1e-6)


@pytest.mark.parametrize("n, d", [(37, 300), (5, 3)])
def test_remove_parallel_grad(n, d):
    _check_remove_parallel(n, d, torch.float32, 1e-6)


def test_references_match_definitions():
    W = _decoder(6, 10, torch.float32, "cpu")
    grad = torch.randn(6, 10)
    unit = normalize_decoder_reference(W)
    assert_rel(unit[2:].norm(dim=1), torch.ones(4), 1e-6, "norms")
    out = remove_parallel_grad_reference(W, grad)
    assert_rel((out * W).sum(1), torch.zeros(6), 1e-5, "parallel part")


@pytest.mark.parametrize(
    "W, grad, match",
    [
        (torch.randn(10), None, r"W_dec must have shape \[n, d\]"),
        (torch.randn(4, 10).t(), None, "W_dec must be contiguous"),
        (torch.randn(4, 10, dtype=torch.float64), None, "W_dec must have dtype"),
        (torch.randn(4, 10), torch.randn(4, 9), r"grad must have shape \[n=4, d=10\]"),
        (torch.randn(4, 10), torch.randn(10, 4).t(), "grad must be contiguous"),
    ],
)
def test_decoder_norm_launcher_errors(W, grad, match):
    with pytest.raises(ValueError, match=match):
        if grad is None:
            normalize_decoder_forward(W)
        else:
            remove_parallel_grad_forward(W, grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n, d", [(32768, 768), (65536, 2048), (1000, 5000)])
def test_decoder_norm_gpu(dtype, tol, n, d):
    _check_normalize(n, d, dtype, tol, device="cuda")
    _check_remove_parallel(n, d, dtype, tol, device="cuda")
