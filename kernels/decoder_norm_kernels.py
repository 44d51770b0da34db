# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Decoder-norm maintenance, in place, one row (latent) per program lane:

    normalize_decoder_(W_dec):           w_i ← w_i / ||w_i||
    remove_parallel_grad_(W_dec, grad):  g_i ← g_i - (g_i · w_i) w_i / ||w_i||²

W_dec [n, d] (row i = latent i's decoder vector). Each kernel reads a row once, reduces it in
fp32 and writes it back (remove_parallel_grad_ fuses both reductions and the update into one
pass over w and g). Zero rows are left unchanged. These are optimizer-side updates without
gradients, so there is no autograd Function; the version counter of the updated tensor is bumped
so that autograd notices the in-place change.
"""

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, check_same_device, check_tensor, use_triton


@triton.jit
def _normalize_rows_kernel(w_ptr, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    ptrs = w_ptr + rows[:, None].to(tl.int64) * D + cols[None, :]
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(w * w, axis=1))
    scale = 1.0 / tl.where(norm > 0, norm, 1.0)
    tl.store(ptrs, (w * scale[:, None]).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _remove_parallel_grad_kernel(w_ptr, g_ptr, N, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    norm_sq = tl.sum(w * w, axis=1)
    coef = tl.sum(g * w, axis=1) / tl.where(norm_sq > 0, norm_sq, 1.0)  # w = 0: g · w = 0
    tl.store(g_ptr + offs, (g - coef[:, None] * w).to(g_ptr.dtype.element_ty), mask=mask)


def _blocks(n: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_D, grid size, num_warps): whole rows, ~4K elements (or one row) each."""
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(triton.next_power_of_2(n), 4096 // block_d))
    num_warps = min(16, max(4, block_m * block_d // 1024))
    return block_m, block_d, triton.cdiv(n, block_m), num_warps


def _launch_normalize_decoder(W_dec: torch.Tensor) -> None:
    """Unchecked: run _normalize_rows_kernel on W_dec [n, d] in place."""
    n, d = W_dec.shape
    block_m, block_d, grid, num_warps = _blocks(n, d)
    _normalize_rows_kernel[(grid,)](
        W_dec, n, d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps
    )


def _launch_remove_parallel_grad(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """Unchecked: run _remove_parallel_grad_kernel on grad [n, d] in place."""
    n, d = W_dec.shape
    block_m, block_d, grid, num_warps = _blocks(n, d)
    _remove_parallel_grad_kernel[(grid,)](
        W_dec, grad, n, d, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps
    )


def normalize_decoder_forward(W_dec: torch.Tensor) -> None:
    """Checked launcher: normalise the rows of W_dec [n, d] in place."""
    check_tensor("W_dec", W_dec, (None, None), FLOAT_DTYPES, "[n, d]")
    _launch_normalize_decoder(W_dec)


def remove_parallel_grad_forward(W_dec: torch.Tensor, grad: torch.Tensor) -> None:
    """Checked launcher: remove from each row of grad [n, d] its component along W_dec's row, in
    place."""
    check_tensor("W_dec", W_dec, (None, None), FLOAT_DTYPES, "[n, d]")
    n, d = W_dec.shape
    check_tensor("grad", grad, (n, d), FLOAT_DTYPES, f"[n={n}, d={d}] (as W_dec)")
    check_same_device(W_dec=W_dec, grad=grad)
    _launch_remove_parallel_grad(W_dec, grad)


def normalize_decoder_reference(W_dec: torch.Tensor) -> torch.Tensor:
    """Plain torch, out of place: W_dec with unit rows (zero rows unchanged), fp32 math."""
    w = W_dec.float()
    norm = w.norm(dim=1, keepdim=True)
    return (w / torch.where(norm > 0, norm, 1.0)).to(W_dec.dtype)


def remove_parallel_grad_reference(W_dec: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Plain torch, out of place: grad minus its per-row projection onto W_dec, fp32 math."""
    w, g = W_dec.float(), grad.float()
    norm_sq = (w * w).sum(1, keepdim=True)
    coef = (g * w).sum(1, keepdim=True) / torch.where(norm_sq > 0, norm_sq, 1.0)
    return (g - coef * w).to(grad.dtype)


@torch.no_grad()
def normalize_decoder_(W_dec: torch.Tensor) -> torch.Tensor:
    """Unit-normalise each row of W_dec [n, d] in place (zero rows unchanged); returns W_dec."""
    if use_triton(W_dec):
        normalize_decoder_forward(W_dec)
        torch.autograd.graph.increment_version(W_dec)
    else:
        W_dec.copy_(normalize_decoder_reference(W_dec))
    return W_dec


@torch.no_grad()
def remove_parallel_grad_(W_dec: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad_i -= (grad_i · w_i) w_i / ||w_i||² for each row i, in place; returns grad."""
    if use_triton(W_dec):
        remove_parallel_grad_forward(W_dec, grad)
        torch.autograd.graph.increment_version(grad)
    else:
        grad.copy_(remove_parallel_grad_reference(W_dec, grad))
    return grad
