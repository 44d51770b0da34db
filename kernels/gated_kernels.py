# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Gated SAE activation (Rajamanoharan et al. 2024) with r_mag weight tying: the fused epilogue
of the one encoder GEMM pre = (x - b_dec) @ W_gate [B, n] that serves both paths.

    π_gate = pre + b_gate,   π_mag = exp(r_mag) ⊙ pre + b_mag
    f = 1[π_gate > 0] ⊙ ReLU(π_mag),   g = ReLU(π_gate)

f feeds the decoder, g the L1 penalty and the frozen-decoder auxiliary reconstruction.
Backward, with A = 1[π_gate > 0] 1[π_mag > 0] and G = 1[π_gate > 0]:

    grad pre   = df · A · exp(r_mag) + dg · G,      grad b_gate = Σ_b dg · G
    grad b_mag = Σ_b df · A,   grad r_mag = Σ_b df · A · exp(r_mag) · pre

Forward kernel: one program per BLOCK_M × BLOCK_N tile. Backward kernel: one program per
(BLOCK_N latents, split of the rows), looping over its rows and writing per-split column sums
([splits, 3, n], fp32) that torch adds up; no atomics, so the result is deterministic. Saved for
backward is pre alone (the GEMM output, needed anyway); the only [B, n] the backward writes is
grad pre, and not even that when pre needs no gradient (a frozen encoder, as in rescale & shift).
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


@triton.jit
def _gated_fwd_kernel(
    pre_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, f_ptr, g_ptr, B, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    mask = (rows < B)[:, None] & col_mask[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b_gate = tl.load(b_gate_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = tl.exp(tl.load(r_mag_ptr + cols, mask=col_mask, other=0.0).to(tl.float32))
    b_mag = tl.load(b_mag_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    gate = pre + b_gate[None, :]
    mag = pre * scale[None, :] + b_mag[None, :]
    f = tl.where((gate > 0) & (mag > 0), mag, 0.0)
    tl.store(f_ptr + offs, f.to(f_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + offs, tl.maximum(gate, 0.0).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    pre_ptr, b_gate_ptr, r_mag_ptr, b_mag_ptr, df_ptr, dg_ptr, dpre_ptr, partial_ptr, B, N,
    ROWS_PER_SPLIT, WRITE_DPRE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    col_mask = cols < N
    b_gate = tl.load(b_gate_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    scale = tl.exp(tl.load(r_mag_ptr + cols, mask=col_mask, other=0.0).to(tl.float32))
    b_mag = tl.load(b_mag_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    d_b_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    d_b_mag = tl.zeros([BLOCK_N], dtype=tl.float32)
    d_r_mag = tl.zeros([BLOCK_N], dtype=tl.float32)
    r_begin = split * ROWS_PER_SPLIT
    r_end = tl.minimum(r_begin + ROWS_PER_SPLIT, B)
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < r_end)[:, None] & col_mask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        pre = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        df = tl.load(df_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dg = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        open_gate = pre + b_gate[None, :] > 0
        dg = tl.where(open_gate, dg, 0.0)
        dmag = tl.where(open_gate & (pre * scale[None, :] + b_mag[None, :] > 0), df, 0.0)
        if WRITE_DPRE:
            dpre = dmag * scale[None, :] + dg
            tl.store(dpre_ptr + offs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
        d_b_gate += tl.sum(dg, axis=0)
        d_b_mag += tl.sum(dmag, axis=0)
        d_r_mag += tl.sum(dmag * pre, axis=0)
    out = partial_ptr + split * 3 * N + cols
    tl.store(out, d_b_gate, mask=col_mask)
    tl.store(out + N, d_r_mag * scale, mask=col_mask)
    tl.store(out + 2 * N, d_b_mag, mask=col_mask)


def _blocks() -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of both kernels; small tiles under the interpreter."""
    return (4, 32, 4) if is_interpreting() else (16, 256, 8)


def _launch_gated(
    pre: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
) -> None:
    """Unchecked: run _gated_fwd_kernel into f and g ([B, n])."""
    B, n = pre.shape
    block_m, block_n, num_warps = _blocks()
    grid = (triton.cdiv(B, block_m), triton.cdiv(n, block_n))
    _gated_fwd_kernel[grid](
        pre, b_gate, r_mag, b_mag, f, g, B, n, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )  # fmt: skip


def _launch_gated_backward(
    grad_f: torch.Tensor,
    grad_g: torch.Tensor,
    pre: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    grad_pre: torch.Tensor | None,
    partial: torch.Tensor,
    rows_per_split: int,
) -> None:
    """Unchecked: run _gated_bwd_kernel, grad pre into grad_pre ([B, n], not written when None)
    and per-split column sums (grad b_gate, grad r_mag, grad b_mag) into partial [splits, 3, n]."""
    B, n = pre.shape
    block_m, block_n, num_warps = _blocks()
    grid = (triton.cdiv(n, block_n), partial.shape[0])
    _gated_bwd_kernel[grid](
        pre, b_gate, r_mag, b_mag, grad_f, grad_g, grad_pre, partial, B, n, rows_per_split,
        WRITE_DPRE=grad_pre is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )  # fmt: skip


def _check_inputs(
    pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor
) -> None:
    check_tensor("pre", pre, (None, None), FLOAT_DTYPES, "[B, n]")
    n = pre.shape[1]
    for name, t in (("b_gate", b_gate), ("r_mag", r_mag), ("b_mag", b_mag)):
        check_tensor(name, t, (n,), FLOAT_DTYPES, f"[n={n}]")
    check_same_device(pre=pre, b_gate=b_gate, r_mag=r_mag, b_mag=b_mag)


def gated_forward(
    pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked launcher: returns (f, g), both [B, n] in pre's dtype."""
    _check_inputs(pre, b_gate, r_mag, b_mag)
    f, g = torch.empty_like(pre), torch.empty_like(pre)
    _launch_gated(pre, b_gate, r_mag, b_mag, f, g)
    return f, g


def gated_backward(
    grad_f: torch.Tensor,
    grad_g: torch.Tensor,
    pre: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    need_pre: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked launcher: (grad pre or None, grad b_gate, grad r_mag, grad b_mag)."""
    _check_inputs(pre, b_gate, r_mag, b_mag)
    B, n = pre.shape
    grad_f, grad_g = grad_f.contiguous(), grad_g.contiguous()
    check_tensor("grad_f", grad_f, (B, n), FLOAT_DTYPES, f"[B={B}, n={n}] (as pre)")
    check_tensor("grad_g", grad_g, (B, n), FLOAT_DTYPES, f"[B={B}, n={n}] (as pre)")
    check_same_device(pre=pre, grad_f=grad_f, grad_g=grad_g)
    grad_pre = torch.empty_like(pre) if need_pre else None
    block_m, block_n, _ = _blocks()
    splits, rows_per_split = column_splits(B, n, block_m, block_n, pre.device)
    partial = torch.empty(splits, 3, n, device=pre.device, dtype=torch.float32)
    _launch_gated_backward(
        grad_f, grad_g, pre, b_gate, r_mag, b_mag, grad_pre, partial, rows_per_split
    )
    d_b_gate, d_r_mag, d_b_mag = partial.sum(0)
    return grad_pre, d_b_gate.to(b_gate.dtype), d_r_mag.to(r_mag.dtype), d_b_mag.to(b_mag.dtype)


def gated_reference(
    pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, fp32 math (fp64 for fp64 inputs), differentiable: (f, g) in pre's dtype.
    The CPU path."""
    dtype = torch.promote_types(pre.dtype, torch.float32)
    p = pre.to(dtype)
    gate = p + b_gate.to(dtype)
    mag = p * r_mag.to(dtype).exp() + b_mag.to(dtype)
    f = torch.where(gate > 0, mag.relu(), 0.0)
    return f.to(pre.dtype), gate.relu().to(pre.dtype)


class GatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        f, g = gated_forward(pre, b_gate, r_mag, b_mag)
        ctx.save_for_backward(pre, b_gate, r_mag, b_mag)
        return f, g

    @staticmethod
    def backward(ctx, grad_f: torch.Tensor, grad_g: torch.Tensor) -> tuple:
        return gated_backward(grad_f, grad_g, *ctx.saved_tensors, ctx.needs_input_grad[0])


def gated(
    pre: torch.Tensor, b_gate: torch.Tensor, r_mag: torch.Tensor, b_mag: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated SAE activation of the encoder GEMM output pre [B, n]: returns (f, g), [B, n] each.

    f = 1[pre + b_gate > 0] ⊙ ReLU(exp(r_mag) ⊙ pre + b_mag) (the latents) and
    g = ReLU(pre + b_gate) (for the L1 and auxiliary terms), in pre's dtype. Differentiable
    w.r.t. all four inputs; under autocast pre is cast to the autocast dtype, the [n] vectors
    keep theirs (the math is fp32 either way).
    """
    if use_triton(pre):
        (pre,) = autocast_inputs(pre)
        return GatedFunction.apply(pre, b_gate, r_mag, b_mag)
    return gated_reference(pre, b_gate, r_mag, b_mag)
