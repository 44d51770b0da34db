import pytest
import torch

from flashsae.kernels import batch_topk
from tests.kernel_checks import DEVICE, topk_inputs


def _check(z, k):
    z = z.requires_grad_()
    f, min_kept = batch_topk(z, k)
    B, n = z.shape
    kept = f.detach() != 0
    assert f.shape == z.shape and f.dtype == z.dtype
    torch.testing.assert_close(f.detach()[kept], z.detach()[kept], rtol=0, atol=0)
    assert (z.detach()[kept] > 0).all()
    # the kept entries are among the B·k largest: no dropped positive entry beats the smallest kept
    flat = z.detach().reshape(-1)
    kth = flat.topk(B * k).values.min()
    assert kept.sum() == (flat.topk(B * k).values > 0).sum()
    assert (z.detach()[~kept] <= kth.clamp_min(0)).all()
    expected_min = z.detach()[kept].min() if kept.any() else torch.zeros((), device=z.device)
    torch.testing.assert_close(min_kept, expected_min.to(z.dtype), rtol=0, atol=0)

    g = torch.randn_like(f)
    (grad,) = torch.autograd.grad(f, z, g)
    torch.testing.assert_close(grad, torch.where(kept, g, 0), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kind, B, n, k",
    [("randn", 6, 50, 3), ("randn", 3, 20, 20), ("ties", 5, 40, 4), ("negative", 4, 30, 2)],
)
def test_batch_topk(kind, B, n, k):
    _check(topk_inputs(kind, B, n), k)


def test_batch_topk_rows_keep_different_counts():
    z = torch.full((3, 8), -1.0, device=DEVICE)
    z[0] = torch.arange(1.0, 9.0)  # row 0 holds the 6 largest entries of the batch
    f, min_kept = batch_topk(z, 2)
    assert (f[0] != 0).sum() == 6 and (f[1:] == 0).all()
    assert min_kept.item() == 3.0


@pytest.mark.parametrize(
    "z, k", [(torch.randn(5), 1), (torch.randn(2, 5), 0), (torch.randn(2, 5), 6)]
)
def test_batch_topk_errors(z, k):
    with pytest.raises(ValueError):
        batch_topk(z, k)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_topk_gpu(dtype):
    _check(torch.randn(4096, 32768, device="cuda", dtype=dtype), 32)
