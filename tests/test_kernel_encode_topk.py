import math

import pytest
import torch

import flashsae.kernels.encode_topk_kernels as encode_topk_kernels
from flashsae.kernels import encode_topk
from flashsae.kernels.encode_topk_kernels import (
    MAX_OVERFLOW_RATE,
    TOP,
    chunk_size,
    encode_topk_forward,
    encode_topk_reference,
    pick_backend,
)
from tests.kernel_checks import DEVICE, assert_rel, poison_outputs


def _inputs(B, d, n, dtype, device, shift=0.0):
    x = torch.randn(B, d, device=device, dtype=dtype)
    W_enc = (torch.randn(d, n, device=device) / math.sqrt(d)).to(dtype)
    b_enc = (0.1 * torch.randn(n, device=device) + shift).to(dtype)
    b_dec = (0.1 * torch.randn(d, device=device)).to(dtype)
    return x, W_enc, b_enc, b_dec


def _oracle(x, W_enc, b_enc, b_dec, indices):
    """float64, differentiable: the outputs at the given indices."""
    z = torch.addmm(b_enc, x - b_dec, W_enc)
    return z.gather(1, indices.long()).relu()


def _preactivations(x, W_enc, b_enc, b_dec):
    """float64 z from the inputs, x - b_dec taken in fp32 and rounded to W_enc's dtype as the
    kernels do."""
    xc = (x.float() - b_dec.float()).to(W_enc.dtype).double()
    return torch.addmm(b_enc.double(), xc, W_enc.double())


def assert_valid_selection(z, values, indices, tol):
    """indices pick a top-k of z (entries within tol of the k-th may swap), values = ReLU(z)."""
    k = indices.shape[1]
    idx = indices.long()
    assert ((idx >= 0) & (idx < z.shape[1])).all(), "index out of range (unwritten?)"
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "repeated index in a row"
    picked = z.gather(1, idx)
    assert_rel(values, picked.relu(), tol, "values")
    gap = (picked.sort(dim=1, descending=True).values - z.topk(k, dim=1).values).abs().max()
    assert gap <= tol * z.abs().max(), f"not a top-k selection (gap {gap:.3e})"


def _check(fn, B, d, n, k, dtype, tol, device=DEVICE, shift=0.0, **kwargs):
    x, W_enc, b_enc, b_dec = _inputs(B, d, n, dtype, device, shift)
    leaves = [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    with poison_outputs():
        values, indices = fn(*leaves, k, **kwargs)
    assert values.shape == indices.shape == (B, k)
    assert values.dtype == dtype and indices.dtype == torch.int32

    z = _preactivations(*(t.detach() for t in leaves))
    assert_valid_selection(z, values.detach(), indices, tol)

    g = torch.randn_like(values)
    grads = torch.autograd.grad((values.float() * g.float()).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_loss = (_oracle(*ref_leaves, indices) * g.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, grad, ref in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        assert_rel(grad, ref, tol, f"grad {name}")


FNS = {
    "fused": lambda *a: encode_topk(*a, backend="fused"),
    "dense": lambda *a: encode_topk(*a, backend="dense"),
    "reference": encode_topk_reference,
}


@pytest.mark.parametrize("fn", list(FNS.values()), ids=list(FNS))
@pytest.mark.parametrize(
    "B, d, n, k, shift",
    [
        (6, 40, 200, 8, 0.0),  # several latent tiles and splits, d not a block multiple
        (17, 20, 70, 1, 0.0),  # k = 1; two row blocks, the second ragged
        (3, 16, 48, 48, 0.0),  # k = n, not a power of two
        (4, 24, 40, 4, -100.0),  # every pre-activation negative
    ],
)
def test_encode_topk_fp32(fn, B, d, n, k, shift):
    _check(fn, B, d, n, k, torch.float32, 1e-5, shift=shift)


def _launch(x, W_enc, b_enc, b_dec, k, **kwargs):
    """The fused launcher on fp32 inputs: (values, indices, flags of the rows of the exact pass)."""
    values = torch.empty(x.shape[0], k, dtype=W_enc.dtype)
    indices = torch.empty(x.shape[0], k, dtype=torch.int32)
    with poison_outputs():
        flags = encode_topk_kernels._launch_encode_topk(
            x - b_dec, W_enc, b_enc, k, values, indices, **kwargs
        )
    return values, indices, flags


def _assert_exact(x, W_enc, b_enc, b_dec, values, indices):
    z = _preactivations(x, W_enc, b_enc, b_dec)
    assert_valid_selection(z, values, indices, 1e-6)


def test_chunk_candidates_suffice_for_iid_columns():
    """i.i.d. columns: no row has more than TOP of its top-k in one chunk, so the TOP largest
    entries per chunk hold the exact answer and no row goes through the exact pass."""
    B, d, n, k = 8, 16, 1024, 4
    x, W_enc, b_enc, b_dec = _inputs(B, d, n, torch.float32, DEVICE)
    values, indices, flags = _launch(x, W_enc, b_enc, b_dec, k)
    _assert_exact(x, W_enc, b_enc, b_dec, values, indices)
    assert (flags == 0).all(), flags.tolist()


def test_chunk_size_keeps_exact_pass_rare():
    """C(k, TOP+1) / n_chunks^TOP <= MAX_OVERFLOW_RATE, chunks of 8 columns to a tile's width."""
    assert chunk_size(32768, 32, 128) == 128
    assert chunk_size(65536, 64, 128) == 128
    assert chunk_size(32768, 256, 128) == 8  # large k: small chunks, more keys
    assert chunk_size(32768, 32, 16) == 16  # never wider than a tile
    for n, k in ((32768, 32), (65536, 64), (4096, 16)):
        chunks = -(-n // chunk_size(n, k, 128))
        assert math.comb(k, TOP + 1) <= MAX_OVERFLOW_RATE * chunks**TOP


def test_adversarial_rows_take_the_exact_pass():
    """Rows whose z increases with the column have their whole top-k in the last chunk: the
    chunk's bound beats the k-th candidate, the row is flagged and recomputed exactly over
    every column split; the other rows keep their candidates."""
    B, d, n, k = 20, 16, 300, 8
    x, W_enc, b_enc, b_dec = _inputs(B, d, n, torch.float32, DEVICE)
    b_dec.zero_()
    W_enc[0] = torch.arange(n, dtype=torch.float32) / 10  # z ≈ x[:, 0] · col / 10 + noise
    x[:, 0] = 0.0
    x[::3, 0] = 1.0 + torch.rand(len(range(0, B, 3)))  # every third row increasing
    x[1::7, 0] = -1.0  # decreasing rows: their top-k in the first chunk
    values, indices, flags = _launch(x, W_enc, b_enc, b_dec, k, chunk=32)
    _assert_exact(x, W_enc, b_enc, b_dec, values, indices)
    extreme = x[:, 0] != 0
    assert (flags[extreme] == 1).all(), flags.tolist()
    assert (flags[~extreme] == 0).any(), flags.tolist()


def test_all_rows_take_the_exact_pass():
    """Fewer candidates than k (TOP x 7 chunks < 30): every row is flagged and still exact."""
    B, d, n, k = 7, 8, 200, 30
    x, W_enc, b_enc, b_dec = _inputs(B, d, n, torch.float32, DEVICE)
    values, indices, flags = _launch(x, W_enc, b_enc, b_dec, k, chunk=32)
    _assert_exact(x, W_enc, b_enc, b_dec, values, indices)
    assert (flags == 1).all()


def test_ties_keep_k_distinct_columns():
    """Many equal pre-activations (a tie at the k-th value flags the row): k distinct columns."""
    B, d, n, k = 3, 16, 256, 8
    x = torch.randn(B, d)
    W_enc = torch.zeros(d, n)
    b_enc = torch.zeros(n)
    b_enc[::5] = 1.0
    values, indices, _ = _launch(x, W_enc, b_enc, torch.zeros(d), k)
    assert (values == 1.0).all()
    assert (indices.long() % 5 == 0).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()


def test_pick_backend_estimate():
    # the sm_90 SASS estimate: the chunks kernel is MMA-bound and the select kernel adds about
    # 18 ps per key; dense pays for writing and reading z
    assert pick_backend(8192, 768, 32768, 32) == "fused"
    assert pick_backend(8192, 2048, 65536, 64) == "fused"
    assert pick_backend(8192, 768, 32768, 32, fp32=True) == "dense"  # tf32x3: three passes
    assert pick_backend(256, 768, 32768, 32) == "dense"  # launches dominate
    assert pick_backend(8192, 768, 32768, 1024) == "dense"  # k_pad above MAX_FUSED_K
    assert pick_backend(8192, 768, 1024, 32) == "dense"  # tiny n


def test_dense_backend_for_large_k():
    """k above MAX_FUSED_K: "auto" uses the dense path, "fused" refuses."""
    B, d, n = 3, 8, 600
    _check(FNS["reference"], B, d, n, 300, torch.float32, 1e-5)
    _check(encode_topk, B, d, n, 300, torch.float32, 1e-5)
    with pytest.raises(ValueError, match="backend 'fused' needs k <= 256"):
        encode_topk_forward(*_inputs(B, d, n, torch.float32, DEVICE), 300, "fused")


@pytest.mark.parametrize("backend", ["dense", pytest.param("fused", marks=pytest.mark.gpu)])
def test_centring_in_fp32_under_autocast(backend):
    """x and b_dec stay fp32 under autocast; only W_enc is rounded: z must match fp32
    centring (rounding x and b_dec first would move x_c by up to 2^-8 relative)."""
    B, d, n, k = 4, 16, 64, 4
    x, W_enc, b_enc, b_dec = _inputs(B, d, n, torch.float32, DEVICE)
    x = x + 100.0
    b_dec = b_dec + 100.0  # x_c small next to x and b_dec: bf16 rounding first would show
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        values, indices = encode_topk(x, W_enc, b_enc, b_dec, k, backend=backend)
    assert values.dtype == torch.bfloat16
    z = _preactivations(x, W_enc.bfloat16(), b_enc, b_dec)
    assert_valid_selection(z, values.double(), indices, 1e-2)
    z_rounded_first = _preactivations(x.bfloat16(), W_enc.bfloat16(), b_enc, b_dec.bfloat16())
    assert rel_gap(z, z_rounded_first) > 1e-2  # the test distinguishes the two


def rel_gap(a, b):
    return ((a - b).norm() / a.norm()).item()


def _args(B=4, d=6, n=10):
    x, W_enc, b_enc, b_dec = _inputs(B, d, n, torch.float32, DEVICE)
    return {"x": x, "W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "k": 2}


@pytest.mark.parametrize(
    "change, match",
    [
        ({"x": lambda t: t[0]}, r"x must have shape \[B, d\]"),
        ({"W_enc": lambda t: t[:5].contiguous()}, r"W_enc must have shape \[d=6, n\]"),
        ({"W_enc": lambda t: t.double()}, "W_enc must have dtype float32"),
        ({"x": lambda t: t.bfloat16(), "W_enc": lambda t: t.half()}, "x must have dtype float32"),
        ({"W_enc": lambda t: t.t().contiguous().t()}, "W_enc must be contiguous"),
        ({"b_enc": lambda t: t[:9]}, r"b_enc must have shape \[n=10\]"),
        ({"b_dec": lambda t: t.double()}, "b_dec must have dtype"),
        ({"k": lambda k: 0}, r"k must be in \[1, n=10\], got 0"),
        ({"k": lambda k: 11}, r"k must be in \[1, n=10\], got 11"),
        ({"backend": lambda b: "cublas"}, "backend must be one of auto, fused, dense"),
    ],
)
def test_encode_topk_launcher_errors(change, match):
    args = {**_args(), "backend": "auto"}
    for name, fn in change.items():
        args[name] = fn(args[name])
    with pytest.raises(ValueError, match=match):
        encode_topk_forward(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fused", "dense"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "B, d, n, k",
    [
        (4096, 768, 32768, 32),
        (4096, 2048, 65536, 64),
        (16, 768, 32768, 32),  # few rows: one ragged row block
        (1000, 512, 20000, 128),  # ragged rows and latents, larger k
    ],
)
def test_encode_topk_gpu(backend, dtype, tol, B, d, n, k):
    _check(encode_topk, B, d, n, k, dtype, tol, device="cuda", backend=backend)


@pytest.mark.gpu
def test_encode_topk_gpu_adversarial():
    """Half the rows increasing with the column: they take the exact pass and must be exact."""
    B, d, n, k = 512, 768, 32768, 32
    x, W_enc, b_enc, b_dec = _inputs(B, d, n, torch.bfloat16, "cuda")
    W_enc[0] = (torch.arange(n, device="cuda") / n).bfloat16()
    x[::2, 0] = 50.0
    values, indices = encode_topk(x, W_enc, b_enc, b_dec, k, backend="fused")
    z = _preactivations(x, W_enc, b_enc, b_dec)
    assert_valid_selection(z, values.double(), indices, 1e-2)


@pytest.mark.gpu
def test_encode_topk_gpu_autocast():
    """fp32 master weights under bf16 autocast: bf16 outputs, fp32 gradients."""
    x, W_enc, b_enc, b_dec = _inputs(512, 768, 8192, torch.float32, "cuda")
    for t in (W_enc, b_enc, b_dec):
        t.requires_grad_()
    for backend in ("fused", "dense"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            values, indices = encode_topk(x, W_enc, b_enc, b_dec, 32, backend=backend)
        assert values.dtype == torch.bfloat16
        z = _preactivations(x, W_enc.detach().bfloat16(), b_enc.detach(), b_dec.detach())
        assert_valid_selection(z, values.detach().double(), indices, 1e-2)
        values.float().sum().backward()
        for t in (W_enc, b_enc, b_dec):
            assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
            t.grad = None
