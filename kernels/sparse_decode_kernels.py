# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Sparse decoder: x̂ = Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec.

values [B, k], indices [B, k] int32 in [0, n), W_dec [n, d] (row i = latent i's decoder vector),
b_dec [d]. Backward:
    grad values[b, j] = grad_x̂[b] · W_dec[indices[b, j]]        (gather-dot)
    grad W_dec[i]     = Σ_{(b, j): indices[b, j] = i} values[b, j] · grad_x̂[b]   (segment_matmul)
    grad b_dec        = Σ_b grad_x̂[b]
The forward kernel (a gather-sum, an embedding bag) also computes grad x = Σ_j g_j W_enc[:, idx_j]
in the sparse encoder backward, through ``sparse_decode_forward`` without a bias.
"""

import torch
import triton
import triton.language as tl

from .segment_matmul_kernels import segment_matmul
from .utils import FLOAT_DTYPES, autocast_inputs, check_same_device, check_tensor, use_triton


@triton.jit
def _gather_sum_kernel(
    val_ptr,
    idx_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    K,
    D,
    HAS_BIAS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, cols] = Σ_j val[b, j] · w[idx[b, j], cols] (+ bias[cols])."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        slots = k0 + tl.arange(0, BLOCK_K)
        slot_mask = slots < K
        idx = tl.load(idx_ptr + row * K + slots, mask=slot_mask, other=0)
        val = tl.load(val_ptr + row * K + slots, mask=slot_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None].to(tl.int64) * D + cols[None, :],
            mask=slot_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(val[:, None] * w, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _gather_dot_kernel(
    grad_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    K,
    D,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, j] = grad[b] · w[idx[b, j]] for the BLOCK_K slots j of this program."""
    row = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_mask = slots < K
    idx = tl.load(idx_ptr + row * K + slots, mask=slot_mask, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        g = tl.load(grad_ptr + row * D + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + idx[:, None].to(tl.int64) * D + cols[None, :],
            mask=slot_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + row * K + slots, acc.to(out_ptr.dtype.element_ty), mask=slot_mask)


def _blocks(k: int, d: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D) of both kernels: up to 16 slots by 256 columns a step."""
    return min(triton.next_power_of_2(k), 16), min(triton.next_power_of_2(d), 256)


def _launch_gather_sum(
    values: torch.Tensor,
    indices: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Unchecked: out [B, d] = Σ_j values[:, j] · W[indices[:, j]] (+ bias)."""
    B, k = indices.shape
    d = W.shape[1]
    block_k, block_d = _blocks(k, d)
    grid = (B, triton.cdiv(d, block_d))
    _gather_sum_kernel[grid](
        values, indices, W, W if bias is None else bias, out, k, d, HAS_BIAS=bias is not None,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


def _launch_gather_dot(
    grad: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, out: torch.Tensor
) -> None:
    """Unchecked: out [B, k] = grad[b] · W[indices[b, j]]."""
    B, k = indices.shape
    d = W.shape[1]
    block_k, block_d = _blocks(k, d)
    grid = (B, triton.cdiv(k, block_k))
    _gather_dot_kernel[grid](grad, indices, W, out, k, d, BLOCK_K=block_k, BLOCK_D=block_d)


def _check_inputs(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> None:
    check_tensor("indices", indices, (None, None), (torch.int32,), "[B, k]")
    B, k = indices.shape
    check_tensor("values", values, (B, k), FLOAT_DTYPES, f"[B={B}, k={k}] (as indices)")
    check_tensor("W_dec", W_dec, (None, None), FLOAT_DTYPES, "[n, d]")
    check_same_device(values=values, indices=indices, W_dec=W_dec)


def sparse_decode_forward(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Checked launcher: x̂ [B, d] = Σ_j values[:, j] · W_dec[indices[:, j]] (+ b_dec unless
    None), in out_dtype. Without b_dec and with W_encᵀ as W_dec it is the sparse encoder's
    grad x = Σ_j g_j W_enc[:, idx_j]."""
    _check_inputs(values, indices, W_dec)
    d = W_dec.shape[1]
    if b_dec is not None:
        check_tensor("b_dec", b_dec, (d,), FLOAT_DTYPES, f"[d={d}]")
        check_same_device(W_dec=W_dec, b_dec=b_dec)
    out = torch.empty(indices.shape[0], d, device=W_dec.device, dtype=out_dtype)
    _launch_gather_sum(values, indices, W_dec, b_dec, out)
    return out


def sparse_decode_backward(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Checked launcher: (grad values, grad W_dec, grad b_dec), None where not needed
    (needs_input_grad as for (values, indices, W_dec, b_dec))."""
    _check_inputs(values, indices, W_dec)
    B, k = indices.shape
    d = W_dec.shape[1]
    grad_out = grad_out.contiguous()
    check_tensor("grad_out", grad_out, (B, d), FLOAT_DTYPES, f"[B={B}, d={d}]")
    check_same_device(W_dec=W_dec, grad_out=grad_out)
    grad_values = grad_W = grad_b = None
    if needs_input_grad[0]:
        grad_values = torch.empty(B, k, device=W_dec.device, dtype=values.dtype)
        _launch_gather_dot(grad_out, indices, W_dec, grad_values)
    if needs_input_grad[2]:
        grad_W, _ = segment_matmul(values, indices, grad_out, W_dec.shape[0], W_dec.dtype)
    if needs_input_grad[3]:
        grad_b = grad_out.sum(0, dtype=torch.float32).to(W_dec.dtype)
    return grad_values, grad_W, grad_b


def sparse_decode_reference(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """Plain torch (an embedding bag), differentiable; the CPU path."""
    out = torch.nn.functional.embedding_bag(
        indices.long(), W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )
    return out + b_dec


class SparseDecodeFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        values: torch.Tensor,
        indices: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
    ) -> torch.Tensor:
        out = sparse_decode_forward(values, indices, W_dec, b_dec, W_dec.dtype)
        ctx.save_for_backward(values, indices, W_dec)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        values, indices, W_dec = ctx.saved_tensors
        grad_values, grad_W, grad_b = sparse_decode_backward(
            grad_out, values, indices, W_dec, ctx.needs_input_grad
        )
        return grad_values, None, grad_W, grad_b


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor
) -> torch.Tensor:
    """x̂ [B, d] = Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec, in W_dec's dtype.

    values [B, k] float, indices [B, k] int32 in [0, n) (not range-checked on the GPU), W_dec
    [n, d], b_dec [d]. Differentiable w.r.t. values, W_dec and b_dec; under autocast the float
    inputs are cast to the autocast dtype first.
    """
    if use_triton(W_dec):
        values, W_dec, b_dec = autocast_inputs(values, W_dec, b_dec)
        return SparseDecodeFunction.apply(values, indices, W_dec, b_dec)
    return sparse_decode_reference(values, indices, W_dec, b_dec)
