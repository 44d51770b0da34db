# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Segment reduction by latent: out = Sᵀ x for a row-sparse S, the weight-gradient building block.

S [B, n] holds k entries per row: S[b, indices[b, j]] += coef[b, j]. Then
    out[i] = Σ_{(b, j): indices[b, j] = i} coef[b, j] · x[b]          (out [n, d], or [d, n])
    colsum[i] = Σ_{(b, j): indices[b, j] = i} coef[b, j]               (optional, [n])
This is grad W_dec of the sparse decoder (coef = values, x = grad x̂) and grad W_enc / grad b_enc
of the sparse encoder (coef = grad of the selected pre-activations, x = x - b_dec).

Layout. The P = B·k (row, slot) pairs are stably sorted by latent, so latent i owns the run
[seg[i], seg[i+1]) of the sorted pairs. A program owns BLOCK_N contiguous latents × BLOCK_D
columns and walks their runs in lockstep, BLOCK_J pairs of each latent a step: it gathers the
[BLOCK_N, BLOCK_J, BLOCK_D] x rows, adds coef · x into an fp32 accumulator of the same shape on
the FMA pipe, and sums the BLOCK_J axis once at the end. Every FMA belongs to a real pair: the
work is P·d multiply-adds, not the P·32·d of a one-hot tl.dot over 32-latent tiles, and there
is no MMA (so no tf32x3, whatever the dtype: IEEE fp32 products and fp32 accumulation). The
output tile is BLOCK_N latents wide, so fp32 [d, n] output is written in whole 32-byte sectors.

Load balance. A latent with more than CHUNK pairs (one that fires on most rows) is split into
chunks of CHUNK pairs that separate programs reduce into an fp32 scratch row each; a second
kernel adds a latent's chunk rows in chunk order. The longest serial walk is therefore CHUNK
pairs, whatever the skew. No atomics anywhere: the stable sort, the fixed lockstep order and
the fixed chunk order make the result bitwise deterministic. All bookkeeping (run bounds, the
program → (group, chunk) table) is computed on the device with sorts, cumsums and
searchsorted, without a host synchronisation; the grid is sized by the bound
cdiv(n, BLOCK_N) + P // CHUNK on the number of (group, chunk) items, and surplus programs exit.

Cost estimate at B = 8192, k = 32, n = 32768, d = 768 (P = 262,144 pairs, P·d = 2.0·10⁸
pair-columns; from sm_90 SASS compiled without a GPU, not a measurement):
  * one-hot tl.dot (before): P·32·d = 6.4·10⁹ MACs (12.9 GFLOP) as tf32x3, i.e. three tf32
    MMAs plus the hi/lo split of both operands (≥ 78 µs at the H100's 495 TFLOP/s dense tf32
    peak). Per 32-pair × 128-column step: 795 instructions per thread, 96 of them HMMA and
    ~300 the split and one-hot (FSETP/FADD/SEL): 0.78 warp-instructions per pair-column,
    ≈ 1.7·10⁸ in all, ≈ 190 µs of issue on 132 SMs.
  * lockstep (now): P·d FMAs. Per 8 × 8 × 64 step: 190 instructions per thread (4 LDG.128
    gathers, 32 FFMA, the rest addresses and bf16 unpacking), 0.19 warp-instructions per
    pair-column; with runs of ~8 pairs about half the lanes are busy (a step takes BLOCK_J
    pairs of each of BLOCK_N latents, a group walks as long as its longest run), ≈ 7.5·10⁷
    warp-instructions ≈ 80 µs of issue. The gather moves P·d·2 B = 403 MB of bf16 x rows
    from L2 (x, 12.6 MB, stays resident), ≈ 60-70 µs, overlapping the 101 MB fp32 write of
    out (≈ 30 µs at 3.35 TB/s): issue- and gather-bound at about 80 µs, no tensor cores.

This is a backward building block, so it has no autograd Function; on the CPU (interpreter off)
it runs the float64 reference.
"""

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, check_same_device, check_tensor, use_triton

BLOCK_N = 8  # latents per program: 8 fp32 latents fill a 32-byte sector of [d, n]
BLOCK_J = 8  # pairs of each latent per lockstep step
CHUNK = 128  # pairs of one latent per program; a multiple of BLOCK_J


@triton.jit
def _segment_matmul_kernel(
    row_ptr,
    coef_ptr,
    seg_ptr,
    item_group_ptr,
    group_end_ptr,
    group_chunks_ptr,
    part_base_ptr,
    x_ptr,
    out_ptr,
    colsum_ptr,
    part_ptr,
    part_colsum_ptr,
    N,
    D,
    stride_on,
    stride_od,
    HAS_COLSUM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (group of BLOCK_N latents, chunk) item × BLOCK_D columns: for each latent i of the
    group, Σ coef · x over its pairs c·CHUNK .. (c+1)·CHUNK - 1, written to out (latents with at
    most CHUNK pairs, by chunk 0) or to its scratch row part_base[i] + c (longer latents)."""
    item = tl.program_id(0)
    pid_d = tl.program_id(1)
    group = tl.load(item_group_ptr + item)
    if group * BLOCK_N >= N:  # past the last item: the grid is sized by a bound
        return
    n_chunks = tl.load(group_chunks_ptr + group)
    chunk = item - (tl.load(group_end_ptr + group) - n_chunks)
    lats = group * BLOCK_N + tl.arange(0, BLOCK_N)
    lat_mask = lats < N
    start = tl.load(seg_ptr + lats, mask=lat_mask, other=0)
    count = tl.load(seg_ptr + lats + 1, mask=lat_mask, other=0) - start
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    slots = tl.arange(0, BLOCK_J)

    acc = tl.zeros([BLOCK_N, BLOCK_J, BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([BLOCK_N, BLOCK_J], dtype=tl.float32)
    j_begin = chunk * CHUNK
    j_end = tl.minimum(j_begin + CHUNK, tl.max(count, axis=0))
    for j0 in range(j_begin, j_end, BLOCK_J):
        slot = j0 + slots
        valid = slot[None, :] < count[:, None]  # [BLOCK_N, BLOCK_J]; slot < (chunk+1)·CHUNK
        p = start[:, None] + slot[None, :]
        row = tl.load(row_ptr + p, mask=valid, other=0)
        coef = tl.load(coef_ptr + p, mask=valid, other=0.0).to(tl.float32)
        xg = tl.load(
            x_ptr + row[:, :, None].to(tl.int64) * D + cols[None, None, :],
            mask=valid[:, :, None] & col_mask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += coef[:, :, None] * xg
        if HAS_COLSUM:
            csum += coef
    tile = tl.sum(acc, axis=1)  # [BLOCK_N, BLOCK_D]

    first = tl.full([BLOCK_N], 0, tl.int32) + chunk == 0  # a tensor: the interpreter rejects
    to_out = lat_mask & (count <= CHUNK) & first  # masks from scalar & tensor
    to_part = (count > CHUNK) & (j_begin < count)
    part_row = tl.load(part_base_ptr + lats, mask=to_part, other=0) + chunk
    out_offs = lats[:, None].to(tl.int64) * stride_on + cols[None, :].to(tl.int64) * stride_od
    tl.store(
        out_ptr + out_offs,
        tile.to(out_ptr.dtype.element_ty),
        mask=to_out[:, None] & col_mask[None, :],
    )
    tl.store(
        part_ptr + part_row[:, None].to(tl.int64) * D + cols[None, :],
        tile,
        mask=to_part[:, None] & col_mask[None, :],
    )
    if HAS_COLSUM:
        if pid_d == 0:
            colsum = tl.sum(csum, axis=1)
            tl.store(colsum_ptr + lats, colsum.to(colsum_ptr.dtype.element_ty), mask=to_out)
            tl.store(part_colsum_ptr + part_row, colsum, mask=to_part)


@triton.jit
def _segment_matmul_chunks_kernel(
    long_lat_ptr,
    seg_ptr,
    part_base_ptr,
    part_ptr,
    part_colsum_ptr,
    out_ptr,
    colsum_ptr,
    N,
    D,
    stride_on,
    stride_od,
    HAS_COLSUM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[i] = Σ_c part[part_base[i] + c] over the chunks of latent i = long_lat[program],
    in chunk order (and colsum[i] from part_colsum likewise)."""
    lat = tl.load(long_lat_ptr + tl.program_id(0))
    if lat >= N:  # fewer long latents than the bound the grid is sized by
        return
    pid_d = tl.program_id(1)
    n_chunks = tl.cdiv(tl.load(seg_ptr + lat + 1) - tl.load(seg_ptr + lat), CHUNK)
    base = tl.load(part_base_ptr + lat)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(part_ptr + (base + c).to(tl.int64) * D + cols, mask=col_mask, other=0.0)
    offs = lat.to(tl.int64) * stride_on + cols.to(tl.int64) * stride_od
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=col_mask)
    if HAS_COLSUM:
        if pid_d == 0:
            total = tl.load(part_colsum_ptr + base)
            for c in range(1, n_chunks):
                total += tl.load(part_colsum_ptr + base + c)
            tl.store(colsum_ptr + lat, total.to(colsum_ptr.dtype.element_ty))


def _launch_segment_matmul(
    coef: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    colsum: torch.Tensor | None,
    transpose_out: bool,
) -> None:
    """Unchecked: sort the pairs by latent, build the (group, chunk) tables on the device and
    run both kernels into out ([n, d], or [d, n] with transpose_out) and colsum ([n], not
    written when None)."""
    B, k = indices.shape
    d = x.shape[1]
    n = out.shape[1] if transpose_out else out.shape[0]
    if n == 0:
        return
    P, dev, i32 = B * k, x.device, torch.int32
    lat, perm = torch.sort(indices.reshape(-1), stable=True)
    rows = torch.div(perm, max(k, 1), rounding_mode="floor").to(i32)
    coef_sorted = coef.reshape(-1)[perm].contiguous()
    seg = torch.searchsorted(lat, torch.arange(n + 1, device=dev, dtype=i32), out_int32=True)
    count = seg.diff()

    # (group, chunk) items: a group of BLOCK_N latents takes as many chunks as its longest run
    n_groups = triton.cdiv(n, BLOCK_N)
    longest = torch.nn.functional.pad(count, (0, n_groups * BLOCK_N - n)).view(n_groups, -1)
    group_chunks = triton.cdiv(longest.amax(1), CHUNK).clamp_min(1).to(i32)
    group_end = group_chunks.cumsum(0, dtype=i32)
    max_items = n_groups + P // CHUNK  # Σ_g (chunks_g - 1) ≤ Σ_g (longest_g - 1) // CHUNK
    items = torch.arange(max_items, device=dev, dtype=i32)
    item_group = torch.searchsorted(group_end, items, right=True, out_int32=True)

    # scratch rows for latents longer than CHUNK: at most P // (CHUNK + 1) such latents
    long_run = count > CHUNK
    lat_chunks = torch.where(long_run, triton.cdiv(count, CHUNK), 0)
    part_base = (lat_chunks.cumsum(0, dtype=i32) - lat_chunks).to(i32)
    max_long = min(n, P // (CHUNK + 1))
    max_rows = max(1, max_long + P // CHUNK)  # Σ_long cdiv(c, CHUNK) ≤ #long + P / CHUNK
    part = torch.empty(max_rows if max_long else 1, d, device=dev, dtype=torch.float32)
    part_colsum = torch.empty(part.shape[0], device=dev, dtype=torch.float32)

    stride_on, stride_od = (1, n) if transpose_out else (d, 1)
    has_colsum = colsum is not None
    colsum_arg = out if colsum is None else colsum
    block_d = min(64, triton.next_power_of_2(max(d, 1)))
    grid = (max_items, max(1, triton.cdiv(d, block_d)))
    _segment_matmul_kernel[grid](
        rows, coef_sorted, seg, item_group, group_end, group_chunks, part_base, x, out,
        colsum_arg, part, part_colsum, n, d, stride_on, stride_od, HAS_COLSUM=has_colsum,
        CHUNK=CHUNK, BLOCK_N=BLOCK_N, BLOCK_J=BLOCK_J, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    if max_long:
        long_rank_end = long_run.to(i32).cumsum(0, dtype=i32)
        ranks = torch.arange(max_long, device=dev, dtype=i32)
        long_lat = torch.searchsorted(long_rank_end, ranks, right=True, out_int32=True)
        block_d = min(256, triton.next_power_of_2(max(d, 1)))
        grid = (max_long, max(1, triton.cdiv(d, block_d)))
        _segment_matmul_chunks_kernel[grid](
            long_lat, seg, part_base, part, part_colsum, out, colsum_arg, n, d, stride_on,
            stride_od, HAS_COLSUM=has_colsum, CHUNK=CHUNK, BLOCK_D=block_d, num_warps=4,
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
