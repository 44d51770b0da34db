# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""JumpReLU activation with its L0 count (Rajamanoharan et al. 2024b), fused with the encoder bias.

Given the encoder GEMM output pre = x @ W_enc [B, n], b_enc [n] and thresholds θ > 0 [n]:

    z = pre + b_enc,   f = z · H(z - θ),   l0[b] = Σ_i H(z[b, i] - θ_i)

with H(u) = 1[u > 0]. f feeds the decoder, l0 [B] the penalty λ·mean_b l0[b], so the Heaviside
matrix never reaches memory. Backward: true gradients with respect to z (dz = df · H, and none
through l0), straight-through pseudo-derivatives with respect to θ only, rectangle kernel
K(u) = 1[|u| < 1/2] with bandwidth ε:

    ∂f/∂θ = -(θ/ε) K((z - θ)/ε),   ∂l0[b]/∂θ = -(1/ε) K((z - θ)/ε)
    grad pre = dz,   grad b_enc = Σ_b dz,   grad θ = Σ_b (df · ∂f/∂θ + dl0[b] · ∂l0[b]/∂θ)

Forward kernel: one program per BLOCK_M rows, looping over the latents (l0 is a row sum).
Backward kernel: one program per (BLOCK_N latents, split of the rows), looping over its rows
and writing per-split column sums ([splits, n], fp32) that torch adds up; no atomics, so the
result is deterministic. Both read pre once and compute in fp32.
"""

import torch
import triton
import triton.language as tl

from .utils import (
    FLOAT_DTYPES,
    autocast_inputs,
    check_same_device,
    check_tensor,
    column_splits,
    is_interpreting,
    use_triton,
)

BANDWIDTH = 1e-3  # ε, the rectangle kernel's width (the JumpReLU paper's; jumprelu_step's)


@triton.jit
def _jumprelu_fwd_kernel(
    pre_ptr, b_ptr, theta_ptr, f_ptr, l0_ptr, B, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    base = rows[:, None].to(tl.int64) * N
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        pre = tl.load(pre_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        theta = tl.load(theta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = pre + b[None, :]
        active = (z > theta[None, :]) & mask
        f = tl.where(active, z, 0.0).to(f_ptr.dtype.element_ty)
        tl.store(f_ptr + base + cols[None, :], f, mask=mask)
        l0 += tl.sum(active.to(tl.float32), axis=1)
    tl.store(l0_ptr + rows, l0, mask=row_mask)


@triton.jit
def _jumprelu_bwd_kernel(
    pre_ptr, b_ptr, theta_ptr, df_ptr, dl0_ptr, dpre_ptr, partial_ptr, B, N, ROWS_PER_SPLIT,
    INV_EPS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    col_mask = cols < N
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    theta = tl.load(theta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dtheta = tl.zeros([BLOCK_N], dtype=tl.float32)
    r_begin = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_begin + ROWS_PER_SPLIT, B)
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < r_end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        z = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        df = tl.load(df_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dl0 = tl.load(dl0_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        u = z - theta[None, :]
        dz = tl.where(u > 0, df, 0.0)
        in_window = (tl.abs(u) * INV_EPS < 0.5) & mask
        jump = tl.where(in_window, -(theta[None, :] * df + dl0[:, None]) * INV_EPS, 0.0)
        tl.store(dpre_ptr + offs, dz.to(dpre_ptr.dtype.element_ty), mask=mask)
        db += tl.sum(dz, axis=0)
        dtheta += tl.sum(jump, axis=0)
    tl.store(partial_ptr + split * 2 * N + cols, db, mask=col_mask)
    tl.store(partial_ptr + (split * 2 + 1) * N + cols, dtheta, mask=col_mask)


def _fwd_blocks() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the forward kernel; small tiles under the interpreter."""
    return (4, 32, 4) if is_interpreting() else (8, 512, 8)


def _bwd_blocks() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the backward kernel; small tiles under the interpreter."""
    return (4, 32, 4) if is_interpreting() else (16, 256, 8)


def _launch_jumprelu(
    pre: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    f: torch.Tensor,
    l0: torch.Tensor,
) -> None:
    """Unchecked: run _jumprelu_fwd_kernel into f [B, n] and l0 [B]."""
    B, n = pre.shape
    block_m, block_n, num_warps = _fwd_blocks()
    grid = (triton.cdiv(B, block_m),)
    _jumprelu_fwd_kernel[grid](
        pre, b_enc, threshold, f, l0, B, n, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps
    )


def _launch_jumprelu_backward(
    grad_f: torch.Tensor,
    grad_l0: torch.Tensor,
    pre: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float,
    grad_pre: torch.Tensor,
    partial: torch.Tensor,
    rows_per_split: int,
) -> None:
    """Unchecked: run _jumprelu_bwd_kernel, grad pre into grad_pre [B, n] and per-split column
    sums (grad b_enc, grad θ) into partial [splits, 2, n]."""
    B, n = pre.shape
    block_m, block_n, num_warps = _bwd_blocks()
    grid = (triton.cdiv(n, block_n), partial.shape[0])
    _jumprelu_bwd_kernel[grid](
        pre, b_enc, threshold, grad_f, grad_l0, grad_pre, partial, B, n, rows_per_split,
        1.0 / bandwidth, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip


def _check_inputs(pre: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor) -> None:
    check_tensor("pre", pre, (None, None), FLOAT_DTYPES, "[B, n]")
    n = pre.shape[1]
    check_tensor("b_enc", b_enc, (n,), FLOAT_DTYPES, f"[n={n}]")
    check_tensor("threshold", threshold, (n,), FLOAT_DTYPES, f"[n={n}]")
    check_same_device(pre=pre, b_enc=b_enc, threshold=threshold)


def jumprelu_forward(
    pre: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked launcher: returns (f [B, n] in pre's dtype, l0 [B] fp32)."""
    _check_inputs(pre, b_enc, threshold)
    f = torch.empty_like(pre)
    l0 = torch.empty(pre.shape[0], device=pre.device, dtype=torch.float32)
    _launch_jumprelu(pre, b_enc, threshold, f, l0)
    return f, l0


def jumprelu_backward(
    grad_f: torch.Tensor,
    grad_l0: torch.Tensor,
    pre: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked launcher: (grad pre, grad b_enc, grad θ), see the module docstring."""
    _check_inputs(pre, b_enc, threshold)
    B, n = pre.shape
    grad_f, grad_l0 = grad_f.contiguous(), grad_l0.contiguous()
    check_tensor("grad_f", grad_f, (B, n), FLOAT_DTYPES, f"[B={B}, n={n}] (as pre)")
    check_tensor("grad_l0", grad_l0, (B,), FLOAT_DTYPES, f"[B={B}]")
    check_same_device(pre=pre, grad_f=grad_f, grad_l0=grad_l0)
    grad_pre = torch.empty_like(pre)
    block_m, block_n, _ = _bwd_blocks()
    splits, rows_per_split = column_splits(B, n, block_m, block_n, pre.device)
    partial = torch.empty(splits, 2, n, device=pre.device, dtype=torch.float32)
    _launch_jumprelu_backward(
        grad_f, grad_l0, pre, b_enc, threshold, bandwidth, grad_pre, partial, rows_per_split
    )
    db, dtheta = partial.sum(0)
    return grad_pre, db.to(b_enc.dtype), dtheta.to(threshold.dtype)


def jumprelu_reference(
    pre: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor, bandwidth: float = BANDWIDTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, fp32 math (fp64 for fp64 inputs), differentiable with the same
    pseudo-derivatives: the straight-through terms (θ - sg(θ)) · sg(∂/∂θ) add zero to the values
    and give θ its pseudo-gradient, while sg(H) gives z its true one. The CPU path."""
    dtype = torch.promote_types(pre.dtype, torch.float32)
    z = pre.to(dtype) + b_enc.to(dtype)
    theta = threshold.to(dtype)
    step = (z > theta).to(dtype)
    window = ((z - theta).abs() < bandwidth / 2).to(dtype) / bandwidth
    shift = theta - theta.detach()
    f = z * step + shift * (-theta * window).detach()
    l0 = (step + shift * (-window).detach()).sum(1)
    return f.to(pre.dtype), l0


class JumpReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, pre: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor, bandwidth: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f, l0 = jumprelu_forward(pre, b_enc, threshold)
        ctx.save_for_backward(pre, b_enc, threshold)
        ctx.bandwidth = bandwidth
        return f, l0

    @staticmethod
    def backward(ctx, grad_f: torch.Tensor, grad_l0: torch.Tensor) -> tuple:
        grads = jumprelu_backward(grad_f, grad_l0, *ctx.saved_tensors, ctx.bandwidth)
        return *grads, None


def jumprelu(
    pre: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor, bandwidth: float = BANDWIDTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU of z = pre + b_enc with thresholds θ: returns (f [B, n], l0 [B] fp32).

    f = z · H(z - θ) in pre's dtype; l0[b] = Σ_i H(z[b, i] - θ_i), the L0 count. Differentiable
    w.r.t. pre and b_enc (true gradients) and θ (rectangle-kernel pseudo-derivatives of width
    ``bandwidth``), see the module docstring. Under autocast pre is cast to the autocast dtype;
    b_enc and θ keep theirs (fp32 thresholds resolve the ε-wide window).
    """
    if use_triton(pre):
        (pre,) = autocast_inputs(pre)
        return JumpReLUFunction.apply(pre, b_enc, threshold, bandwidth)
    return jumprelu_reference(pre, b_enc, threshold, bandwidth)
