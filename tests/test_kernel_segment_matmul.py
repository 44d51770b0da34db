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


def _skewed_indices(B, k, n, device=DEVICE):
    """indices [B, k] int32 (k >= 3) with the skew of a trained SAE: latent 0 in every row (the
    padding slot of the aux top-k), latent n - 1 (in the last, ragged latent group) in every
    row, latent 1 (in latent 0's group) in 2/3 of the rows, the other slots drawn from
    [2, 2 + n // 8), so that most latents have no pair."""
    idx = torch.randint(2, 2 + n // 8, (B, k), device=device)
    idx[:, 0] = 0
    idx[:, 1] = n - 1
    idx[torch.arange(B, device=device) % 3 > 0, 2] = 1
    return idx.int()


def _oracle(coef, indices, x, n):
    """float64 (Sᵀ x, Sᵀ 1) by index_add_ over the pairs, on the inputs exactly as given."""
    B, k = indices.shape
    lat = indices.reshape(-1).long()
    out = torch.zeros(n, x.shape[1], dtype=torch.float64, device=x.device)
    pairs = coef.reshape(-1, 1).double() * x.double().repeat_interleave(k, dim=0)
    out.index_add_(0, lat, pairs)
    colsum = torch.zeros(n, dtype=torch.float64, device=x.device)
    colsum.index_add_(0, lat, coef.reshape(-1).double())
    return out, colsum


def _check_skewed(B, k, n, d, in_dtype, out_dtype, tol, transpose_out, device=DEVICE):
    coef = torch.randn(B, k, device=device).to(in_dtype)
    x = torch.randn(B, d, device=device).to(in_dtype)
    indices = _skewed_indices(B, k, n, device)
    with poison_outputs():
        out, colsum = segment_matmul(
            coef, indices, x, n, out_dtype, transpose_out=transpose_out, with_colsum=True
        )
    ref, ref_colsum = _oracle(coef, indices, x, n)  # sees the same rounded coef and x
    assert out.dtype == colsum.dtype == out_dtype
    assert_rel(out, ref.T if transpose_out else ref, tol, "out")
    assert_rel(colsum, ref_colsum, tol, "colsum")
    untouched = ref_colsum == 0
    assert untouched.sum() > n // 2 and (colsum[untouched] == 0).all()
    return coef, indices, x, out


@pytest.mark.parametrize("transpose_out", [False, True])
def test_segment_matmul_skewed(transpose_out):
    """Latents with 300 and 200 pairs (several CHUNK-pair chunks, summed by the second kernel),
    most latents with none, n and d not multiples of the block sizes."""
    _check_skewed(300, 4, 50, 70, torch.float32, torch.float32, 1e-5, transpose_out)


@pytest.mark.parametrize("B, k", [(0, 3), (4, 0)])
def test_segment_matmul_no_pairs(B, k):
    """No (row, slot) pairs (an empty batch, or k = 0): out and colsum are written as zeros."""
    coef, x = torch.randn(B, k, device=DEVICE), torch.randn(B, 9, device=DEVICE)
    indices = torch.zeros(B, k, device=DEVICE, dtype=torch.int32)
    with poison_outputs():
        out, colsum = segment_matmul(coef, indices, x, 11, torch.float32, with_colsum=True)
    assert (out == 0).all() and out.shape == (11, 9) and (colsum == 0).all()


def test_segment_matmul_deterministic():
    coef, indices, x, out = _check_skewed(
        300, 4, 50, 70, torch.float32, torch.float32, 1e-5, transpose_out=False
    )
    again, _ = segment_matmul(coef, indices, x, 50, torch.float32)
    assert torch.equal(out, again)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "in_dtype, out_dtype, tol",
    [
        (torch.bfloat16, torch.float32, 1e-5),  # grad W_dec in fp32 from bf16 activations
        (torch.bfloat16, torch.bfloat16, 1e-2),  # grad W_dec of bf16 weights
        (torch.float32, torch.float32, 1e-5),  # the fused encoder: fp32 g and x - b_dec
    ],
)
@pytest.mark.parametrize("transpose_out", [False, True])
@pytest.mark.parametrize("B, k, n, d", [(8192, 32, 32768, 768), (4096, 64, 65536, 2048)])
def test_segment_matmul_gpu(in_dtype, out_dtype, tol, transpose_out, B, k, n, d):
    """Real sizes, uniform latents: against float64 on the same rounded inputs."""
    coef = torch.randn(B, k, device="cuda").to(in_dtype)
    x = torch.randn(B, d, device="cuda").to(in_dtype)
    indices = torch.randint(0, n, (B, k), device="cuda", dtype=torch.int32)
    with poison_outputs():
        out, colsum = segment_matmul(
            coef, indices, x, n, out_dtype, transpose_out=transpose_out, with_colsum=True
        )
    ref, ref_colsum = _oracle(coef, indices, x, n)
    assert_rel(out, ref.T if transpose_out else ref, tol, "out")
    assert_rel(colsum, ref_colsum, tol, "colsum")


@pytest.mark.gpu
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("transpose_out", [False, True])
def test_segment_matmul_gpu_skewed(in_dtype, transpose_out):
    """Real size with latents in every row (64 chunks each) and most latents unused; twice,
    bitwise equal (no atomics)."""
    coef, indices, x, out = _check_skewed(
        8192, 32, 32768, 768, in_dtype, torch.float32, 1e-5, transpose_out, device="cuda"
    )
    again, _ = segment_matmul(coef, indices, x, 32768, torch.float32, transpose_out=transpose_out)
    assert torch.equal(out, again)
