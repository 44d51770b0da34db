import math

import pytest
import torch

from flashsae.kernels import encode_topk, encode_topk_kernels
from flashsae.kernels.encode_topk_kernels import encode_topk_forward, encode_topk_reference
from tests.kernel_checks import (
    DEVICE,
    assert_distinct_indices,
    assert_fp32_grads,
    assert_grads,
    assert_launcher_error,
    assert_rel,
    float64_leaves,
    kernel_and_reference,
    poison_outputs,
)

FNS = kernel_and_reference(encode_topk, encode_topk_reference)


def _inputs(B, d, n, n_dead, dtype, device, shift=0.0):
    x = torch.randn(B, d, device=device, dtype=dtype)
    W_enc = (torch.randn(d, n, device=device) / math.sqrt(d)).to(dtype)
    b_enc = (0.1 * torch.randn(n, device=device) + shift).to(dtype)
    b_dec = (0.1 * torch.randn(d, device=device)).to(dtype)
    dead_mask = torch.zeros(n, dtype=torch.bool, device=device)
    dead_mask[torch.randperm(n, device=device)[:n_dead]] = True
    return x, W_enc, b_enc, b_dec, dead_mask


def _oracle(x, W_enc, b_enc, b_dec, indices, aux_indices, k_live):
    """float64, differentiable: the outputs at the given indices (aux slots >= k_live are 0)."""
    z = torch.addmm(b_enc, x - b_dec, W_enc)
    values = z.gather(1, indices.long()).relu()
    aux = z.gather(1, aux_indices.long()).relu()
    live = torch.arange(aux.shape[1], device=aux.device) < k_live
    return values, torch.where(live, aux, 0.0)


def _preactivations(x, W_enc, b_enc, b_dec):
    """float64 z from the inputs, with x - b_dec rounded to the input dtype as the kernel does."""
    xc = (x - b_dec).double()
    return torch.addmm(b_enc.double(), xc, W_enc.double())


def assert_valid_selection(z, values, indices, tol):
    """indices pick a top-k of z (entries within tol of the k-th may swap), values = ReLU(z)."""
    k = indices.shape[1]
    assert_distinct_indices(indices, z.shape[1])
    picked = z.gather(1, indices.long())
    assert_rel(values, picked.relu(), tol, "values")
    gap = (picked.sort(dim=1, descending=True).values - z.topk(k, dim=1).values).abs().max()
    assert gap <= tol * z.abs().max(), f"not a top-k selection (gap {gap:.3e})"


def _check(fn, B, d, n, k, k_aux, n_dead, dtype, tol, device=DEVICE, shift=0.0):
    x, W_enc, b_enc, b_dec, dead_mask = _inputs(B, d, n, n_dead, dtype, device, shift)
    leaves = [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    with poison_outputs():
        values, indices, aux_values, aux_indices = fn(
            *leaves, k, k_aux, dead_mask if k_aux else None
        )
    assert values.shape == (B, k) and aux_values.shape == (B, k_aux)
    assert values.dtype == aux_values.dtype == dtype
    assert indices.dtype == aux_indices.dtype == torch.int32

    z = _preactivations(*(t.detach() for t in leaves))
    assert_valid_selection(z, values.detach(), indices, tol)
    k_live = min(k_aux, n_dead)
    if k_live:
        live_idx = aux_indices[:, :k_live]
        assert dead_mask[live_idx.long()].all(), "aux index of a live latent"
        among_dead = (dead_mask.cumsum(0) - 1)[live_idx.long()]  # column in z[:, dead_mask]
        assert_valid_selection(z[:, dead_mask], aux_values[:, :k_live].detach(), among_dead, tol)
    assert (aux_values[:, k_live:] == 0).all()
    assert ((aux_indices >= 0) & (aux_indices < n)).all()

    g, g_aux = torch.randn_like(values), torch.randn_like(aux_values)
    loss = (values.float() * g.float()).sum() + (aux_values.float() * g_aux.float()).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = float64_leaves(leaves)
    ref_values, ref_aux = _oracle(*ref_leaves, indices, aux_indices, k_live)
    ref_loss = (ref_values * g.double()).sum() + (ref_aux * g_aux.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    assert_grads(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads, leaves, tol)


@FNS
@pytest.mark.parametrize(
    "B, d, n, k, k_aux, n_dead, shift",
    [
        (6, 40, 200, 8, 4, 60, 0.0),  # several latent tiles and splits, d not a block multiple
        (5, 20, 64, 1, 6, 2, 0.0),  # k = 1; fewer dead latents than k_aux
        (3, 16, 48, 48, 0, 0, 0.0),  # k = n, not a power of two; no aux
        (4, 24, 40, 4, 3, 0, 0.0),  # k_aux > 0 but no dead latent
        (4, 24, 40, 4, 3, 10, -100.0),  # every pre-activation negative
    ],
)
def test_encode_topk_fp32(fn, B, d, n, k, k_aux, n_dead, shift):
    _check(fn, B, d, n, k, k_aux, n_dead, torch.float32, 1e-5, shift=shift)


def test_encode_topk_large_k_chunked(monkeypatch):
    """k above MAX_FUSED_K (k_aux = d/2 in practice) computes z in row chunks."""
    calls = []
    chunked = encode_topk_kernels._launch_chunked
    monkeypatch.setattr(encode_topk_kernels, "MAX_FUSED_K", 4)
    monkeypatch.setattr(encode_topk_kernels, "CHUNK_BYTES", 2 * 70 * 4)  # two rows per chunk
    monkeypatch.setattr(
        encode_topk_kernels, "_launch_chunked", lambda *a: calls.append(1) or chunked(*a)
    )
    _check(encode_topk, 5, 20, 70, 8, 6, 30, torch.float32, 1e-5)
    assert len(calls) == 2  # main and aux top-k


@FNS
def test_aux_gradient_reaches_encoder(fn):
    """AuxK revives dead latents only if the gradient of aux_values reaches W_enc, b_enc, x and
    b_dec; an implementation that drops the aux pre-activation gradients fails here."""
    B, d, n, k, k_aux = 4, 12, 40, 4, 3
    x, W_enc, b_enc, b_dec, _ = _inputs(B, d, n, 0, torch.float32, DEVICE)
    dead_mask = torch.arange(n, device=DEVICE) < 10
    b_enc = torch.where(dead_mask, 2.0, 4.0)  # dead latents positive, mostly outside the top-k
    leaves = [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    values, indices, aux_values, aux_indices = fn(*leaves, k, k_aux, dead_mask)
    assert (aux_values > 0).all() and dead_mask[aux_indices.long()].all()
    grads = torch.autograd.grad(aux_values.sum(), leaves, allow_unused=True)
    assert all(g is not None for g in grads), "aux outputs are not connected to the inputs"

    ref_leaves = float64_leaves(leaves)
    _, ref_aux = _oracle(*ref_leaves, indices, aux_indices, k_aux)
    ref_grads = torch.autograd.grad(ref_aux.sum(), ref_leaves)
    for name, grad, ref in zip(("x", "W_enc", "b_enc", "b_dec"), grads, ref_grads, strict=True):
        assert ref.abs().sum() > 0
        assert_rel(grad, ref, 1e-5, f"grad {name}")
    counts = torch.bincount(aux_indices.reshape(-1).long(), minlength=n).float()
    torch.testing.assert_close(grads[2], counts, rtol=0, atol=0)


def _args(B=4, d=6, n=10):
    x, W_enc, b_enc, b_dec, dead_mask = _inputs(B, d, n, 3, torch.float32, DEVICE)
    return {"x": x, "W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "k": 2, "k_aux": 2,
            "dead_mask": dead_mask}  # fmt: skip


@pytest.mark.parametrize(
    "change, match",
    [
        ({"x": lambda t: t[0]}, r"x must have shape \[B, d\]"),
        ({"W_enc": lambda t: t[:5].contiguous()}, r"W_enc must have shape \[d=6, n\]"),
        ({"W_enc": lambda t: t.bfloat16()}, "W_enc must have dtype float32"),
        ({"W_enc": lambda t: t.t().contiguous().t()}, "W_enc must be contiguous"),
        ({"b_enc": lambda t: t[:9]}, r"b_enc must have shape \[n=10\]"),
        ({"b_dec": lambda t: t.double()}, "b_dec must have dtype"),
        ({"k": lambda k: 0}, r"k must be in \[1, n=10\], got 0"),
        ({"k": lambda k: 11}, r"k must be in \[1, n=10\], got 11"),
        ({"k_aux": lambda k: 11}, r"k_aux must be in \[0, n=10\], got 11"),
        ({"dead_mask": lambda m: None}, "k_aux > 0 needs dead_mask"),
        ({"dead_mask": lambda m: m.float()}, "dead_mask must have dtype bool"),
        ({"dead_mask": lambda m: m[:9]}, r"dead_mask must have shape \[n=10\]"),
    ],
)
def test_encode_topk_launcher_errors(change, match):
    assert_launcher_error(encode_topk_forward, _args(), change, match)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "B, d, n, k, k_aux, n_dead",
    [
        (4096, 768, 32768, 32, 384, 1638),  # 5% dead
        (4096, 2048, 65536, 64, 1024, 200),  # fewer dead latents than k_aux, large k_aux
        (16, 768, 32768, 32, 384, 100),  # few rows: many latent splits; fewer dead than k_aux
    ],
)
def test_encode_topk_gpu(dtype, tol, B, d, n, k, k_aux, n_dead):
    _check(encode_topk, B, d, n, k, k_aux, n_dead, dtype, tol, device="cuda")


@pytest.mark.gpu
def test_encode_topk_gpu_autocast():
    """fp32 master weights under bf16 autocast: bf16 outputs, fp32 gradients."""
    x, W_enc, b_enc, b_dec, dead_mask = _inputs(512, 768, 8192, 100, torch.float32, "cuda")
    for t in (W_enc, b_enc, b_dec):
        t.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        values, _, aux_values, _ = encode_topk(x, W_enc, b_enc, b_dec, 32, 64, dead_mask)
    assert values.dtype == aux_values.dtype == torch.bfloat16
    (values.float().sum() + aux_values.float().sum()).backward()
    assert_fp32_grads(W_enc, b_enc, b_dec)
