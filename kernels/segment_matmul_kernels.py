# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Segment reduction by latent: out = Sᵀ x for a row-sparse S, the weight-gradient building block.

S [B, n] holds k entries per row: S[b, indices[b, j]] += coef[b, j]. Then
    out[i] = Σ_{(b, j): indices[b, j] = i} coef[b, j] · x[b]          (out [n, d], or [d, n])
    colsum[i] = Σ_{(b, j): indices[b, j] = i} coef[b, j]               (optional, [n])
This is grad W_dec of the sparse decoder (coef = values, x = grad x̂) and grad W_enc / grad b_enc
of the sparse encoder (coef = grad of the selected pre-activations, x = x - b_dec).

The (row, slot) pairs are sorted by latent (torch.sort), and each program owns BLOCK_N latents
× BLOCK_D columns: it walks its contiguous run of sorted pairs, gathers the x rows, and
accumulates a one-hot-weighted tl.dot, so there are no atomics (the result is deterministic) and
no B×k×d intermediate. This is a backward building block, so it has no autograd Function; on
the CPU (interpreter off) it runs the float64 reference.
"""

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, check_same_device, check_tensor, use_triton


@triton.jit
def _segment_matmul_kernel(
    lat_ptr,
    row_ptr,
    coef_ptr,
    tile_start_ptr,
    x_ptr,
    out_ptr,
    colsum_ptr,
    N,
    D,
    stride_on,
    stride_od,
    HAS_COLSUM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(tile_start_ptr + pid_n)
    end = tl.load(tile_start_ptr + pid_n + 1)
    lat0 = pid_n * BLOCK_N
    lats = tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    colsum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < end
        lat = tl.load(lat_ptr + p, mask=p_mask, other=-1) - lat0
        row = tl.load(row_ptr + p, mask=p_mask, other=0)
        coef = tl.load(coef_ptr + p, mask=p_mask, other=0.0).to(tl.float32)
        # a[q, i] = coef[q] if pair q belongs to latent lat0 + i
        a = tl.where(lat[:, None] == lats[None, :], coef[:, None], 0.0)
        xg = tl.load(
            x_ptr + row[:, None].to(tl.int64) * D + cols[None, :],
            mask=p_mask[:, None] & col_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(tl.trans(a), xg, acc, input_precision="tf32x3")
        if HAS_COLSUM:
            colsum += tl.sum(a, axis=0)

    out_lat = lat0 + lats
    lat_mask = out_lat < N
    out_offs = out_lat[:, None].to(tl.int64) * stride_on + cols[None, :].to(tl.int64) * stride_od
    tl.store(
        out_ptr + out_offs,
        acc.to(out_ptr.dtype.element_ty),
        mask=lat_mask[:, None] & col_mask[None, :],
    )
    if HAS_COLSUM:
        if pid_d == 0:
            tl.store(colsum_ptr + out_lat, colsum.to(colsum_ptr.dtype.element_ty), mask=lat_mask)


def _launch_segment_matmul(
    coef: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    colsum: torch.Tensor | None,
    transpose_out: bool,
) -> None:
    """Unchecked: sort the pairs by latent and run _segment_matmul_kernel into out ([n, d], or
    [d, n] with transpose_out) and colsum ([n], not written when None)."""
    B, k = indices.shape
    d = x.shape[1]
    n = out.shape[1] if transpose_out else out.shape[0]
    block_n, block_p = 32, 32
    block_d = max(16, min(triton.next_power_of_2(d), 128))  # tl.dot needs >= 16
    n_tiles = triton.cdiv(n, block_n)

    lat, perm = torch.sort(indices.reshape(-1))
    rows = torch.div(perm, k, rounding_mode="floor").to(torch.int32)
    coef_sorted = coef.reshape(-1)[perm].contiguous()
    bounds = torch.arange(0, n_tiles + 1, device=x.device, dtype=torch.int32) * block_n
    tile_start = torch.searchsorted(lat, bounds, out_int32=True)

    stride_on, stride_od = (1, n) if transpose_out else (d, 1)
    grid = (n_tiles, triton.cdiv(d, block_d))
    _segment_matmul_kernel[grid](
        lat, rows, coef_sorted, tile_start, x, out, out if colsum is None else colsum, n, d,
        stride_on, stride_od, HAS_COLSUM=colsum is not None, BLOCK_P=block_p, BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip


def segment_matmul_forward(
    coef: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    n: int,
    out_dtype: torch.dtype,
    transpose_out: bool = False,
    with_colsum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checked launcher: (out, colsum) = (Sᵀ x, Sᵀ 1) as in segment_matmul."""
    check_tensor("indices", indices, (None, None), (torch.int32,), "[B, k]")
    B, k = indices.shape
    check_tensor("coef", coef, (B, k), FLOAT_DTYPES, f"[B={B}, k={k}]")
    check_tensor("x", x, (B, None), FLOAT_DTYPES, f"[B={B}, d]")
    check_same_device(coef=coef, indices=indices, x=x)
    d = x.shape[1]
    shape = (d, n) if transpose_out else (n, d)
    out = torch.empty(shape, device=x.device, dtype=out_dtype)
    colsum = torch.empty(n, device=x.device, dtype=out_dtype) if with_colsum else None
    _launch_segment_matmul(coef, indices, x, out, colsum, transpose_out)
    return out, colsum


def segment_matmul_reference(
    coef: torch.Tensor, indices: torch.Tensor, x: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch in float64 via a dense S: (Sᵀ x [n, d], Sᵀ 1 [n])."""
    S = torch.zeros(x.shape[0], n, dtype=torch.float64, device=x.device)
    S.scatter_add_(1, indices.long(), coef.double())
    return S.T @ x.double(), S.sum(0)


def segment_matmul(
    coef: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    n: int,
    out_dtype: torch.dtype,
    transpose_out: bool = False,
    with_colsum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, colsum) = (Sᵀ x, Sᵀ 1) as in the module docstring.

    coef [B, k] float, indices [B, k] int32 in [0, n), x [B, d] float. out is [n, d] in out_dtype,
    or [d, n] with transpose_out; colsum is [n] in out_dtype, or None without with_colsum.
    Not differentiable (a backward building block).
    """
    if use_triton(x):
        return segment_matmul_forward(coef, indices, x, n, out_dtype, transpose_out, with_colsum)
    out, colsum = segment_matmul_reference(coef, indices, x, n)
    out = (out.T if transpose_out else out).to(out_dtype).contiguous()
    return out, colsum.to(out_dtype) if with_colsum else None
