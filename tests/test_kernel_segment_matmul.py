import pytest
import torch

from flashsae.kernels.segment_matmul_kernels import segment_matmul, segment_matmul_reference
from tests.kernel_checks import DEVICE, assert_rel, poison_outputs


@pytest.mark.parametrize(
    "B, k, n, d, n_used",
    [
        (30, 3, 100, 40, 20),  # only latents < 20 used: three empty latent tiles must be zeroed
        (50, 4, 7, 5, 7),  # ~30 pairs per latent, all in one tile: several pair blocks
        (6, 5, 45, 200, 45),  # d spans two column blocks
    ],
)
@pytest.mark.parametrize("transpose_out", [False, True])
def test_segment_matmul(B, k, n, d, n_used, transpose_out):
    coef = torch.randn(B, k, device=DEVICE)
    indices = torch.randint(0, n_used, (B, k), device=DEVICE, dtype=torch.int32)
    x = torch.randn(B, d, device=DEVICE)
    with poison_outputs():
        out, colsum = segment_matmul(
            coef, indices, x, n, torch.float32, transpose_out=transpose_out, with_colsum=True
        )
    ref, ref_colsum = segment_matmul_reference(coef, indices, x, n)
    assert_rel(out, ref.T if transpose_out else ref, 1e-5, "out")
    assert_rel(colsum, ref_colsum, 1e-5, "colsum")


def test_segment_matmul_without_colsum():
    coef, x = torch.randn(4, 2, device=DEVICE), torch.randn(4, 3, device=DEVICE)
    indices = torch.randint(0, 5, (4, 2), device=DEVICE, dtype=torch.int32)
    out, colsum = segment_matmul(coef, indices, x, 5, torch.float32)
    assert colsum is None
    assert_rel(out, segment_matmul_reference(coef, indices, x, 5)[0], 1e-5, "out")


@pytest.mark.parametrize(
    "coef, indices, x, match",
    [
        (torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.int64), torch.randn(4, 3), "int32"),
        (torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int32), torch.randn(4, 3), "coef"),
        (torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.int32), torch.randn(5, 3), "x must"),
    ],
)
def test_segment_matmul_errors(coef, indices, x, match):
    with pytest.raises(ValueError, match=match):
        segment_matmul(coef, indices, x, 5, torch.float32)


def test_segment_matmul_cpu_path_without_interpreter(monkeypatch):
    """CPU tensors without the interpreter take the reference, cast and laid out as asked."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    coef, x = torch.randn(6, 2), torch.randn(6, 3)
    indices = torch.randint(0, 5, (6, 2), dtype=torch.int32)
    out, colsum = segment_matmul(
        coef, indices, x, 5, torch.float16, transpose_out=True, with_colsum=True
    )
    assert out.shape == (3, 5) and out.is_contiguous()
    assert out.dtype == colsum.dtype == torch.float16
    ref, ref_colsum = segment_matmul_reference(coef, indices, x, 5)
    assert_rel(out, ref.T, 1e-3, "out")
    assert_rel(colsum, ref_colsum, 1e-3, "colsum")
    assert segment_matmul(coef, indices, x, 5, torch.float32)[1] is None
