"""compact_rows: the capture kernel against its reference (interpreter on CPU, bf16 on GPU)."""

import pytest
import torch

from flashsae.kernels.capture_kernels import (
    compact_rows,
    compact_rows_forward,
    compact_rows_reference,
)
from tests.kernel_checks import DEVICE, poison_outputs, rel_err


def inputs(n, d, p_keep, dtype=torch.float32, device=DEVICE):
    h = (torch.randn(n, d, device=device) * 3 + 1).to(dtype)
    keep = torch.rand(n, device=device) < p_keep
    return h, keep


@pytest.mark.parametrize(
    "n, d, p_keep, out_dtype",
    # bf16 casts only on a GPU: the interpreter rounds them differently
    [(37, 20, 0.7, torch.float32), (64, 300, 0.5, torch.float32), (10, 8, 0.0, torch.float32),
     (9, 5, 1.0, torch.float16)],
)  # fmt: skip
def test_compact_rows(n, d, p_keep, out_dtype):
    h, keep = inputs(n, d, p_keep)
    with poison_outputs():
        rows, total, sq = compact_rows_forward(h, keep, out_dtype)
    ref_rows, ref_total, ref_sq = compact_rows_reference(h, keep, out_dtype)
    assert rows.dtype == out_dtype and rows.shape == ref_rows.shape
    torch.testing.assert_close(rows, ref_rows, rtol=0, atol=0)
    if keep.any():
        assert rel_err(total, ref_total) < 1e-5 and rel_err(sq, ref_sq) < 1e-5
    else:
        assert total.abs().sum() == 0 and sq == 0


def test_dispatch_and_checks():
    h, keep = inputs(12, 6, 0.5)
    for got, ref in zip(
        compact_rows(h, keep, torch.float32),
        compact_rows_reference(h, keep, torch.float32),
        strict=True,
    ):
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="keep"):
        compact_rows_forward(h, keep[:5], torch.float32)
    with pytest.raises(ValueError, match="keep"):
        compact_rows_forward(h, keep.int(), torch.float32)
    with pytest.raises(ValueError, match="contiguous"):
        compact_rows_forward(h.t(), torch.ones(6, dtype=torch.bool), torch.float32)


def test_nan_rows_show_in_the_statistics_only_when_kept():
    h, keep = inputs(16, 8, 0.5)
    keep[3], keep[4] = True, False
    h[3, 2], h[4, 1] = float("nan"), float("inf")
    _, total, sq = compact_rows_forward(h, keep, torch.float32)
    assert torch.isnan(total[2]) and torch.isfinite(total[1]) and torch.isnan(sq)
    keep[3] = False
    _, total, sq = compact_rows_forward(h, keep, torch.float32)
    assert torch.isfinite(total).all() and torch.isfinite(sq)


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_compact_rows_gpu_real_size(in_dtype):
    h, keep = inputs(64 * 1024, 4096, 0.9, in_dtype, "cuda")
    with poison_outputs():
        rows, total, sq = compact_rows(h, keep, torch.bfloat16)
    ref_rows, ref_total, ref_sq = compact_rows_reference(h, keep, torch.bfloat16)
    torch.testing.assert_close(rows, ref_rows, rtol=0, atol=0)
    assert rel_err(total, ref_total) < 1e-4 and rel_err(sq, ref_sq) < 1e-4
