# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""TopK SAE encoder: z = (x - b_dec) @ W_enc + b_enc, values, indices = ReLU(TopK_k(z)).

x [B, d], W_enc [d, n], b_enc [n], b_dec [d]. Returns values [B, k] (W_enc's dtype, sorted
descending per row) and indices [B, k] int32; the selected set is exactly torch.topk's on the
pre-activations z (up to ties). The centring x_c = x - b_dec is done in fp32 and rounded once to
W_enc's dtype for the MMA; z is accumulated in fp32.

Backends: "dense" (one GEMM, z materialised, torch.topk), "fused" (the Triton kernels below, z
never reaches memory) and "auto" (pick_backend: an estimate until a GPU measures it).

Fused forward, no host sync. Entries are compared as packed int64 keys (pack_keys: value, then
column), so ties are broken by the column and every key is distinct.

1. _encode_chunks_kernel: a plain GEMM tile (BLOCK_M x BLOCK_N of z, fp32 accumulator) whose
   epilogue, for each row and chunk of CHUNK columns, keeps the TOP largest entries as keys and
   the next largest value as the chunk's bound: TOP rounds of a max with its index over the
   chunk. No state crosses tiles (no running threshold, no atomics, no scatter): the integer
   work is a few compares per entry, and z never reaches memory; out go TOP keys and one bound
   per chunk ([B, TOP, n/CHUNK] int64 and [B, n/CHUNK] fp32: 1/4 of z's bf16 bytes at CHUNK 128).
2. _select_kernel: the top-k of each row's TOP·n/CHUNK keys (streaming bitonic merge). Exact
   unless some chunk holds more than TOP entries >= the k-th key: an entry missing from the keys
   is <= its chunk's bound, so when every bound is below the k-th key's value the keys hold the
   whole top-k. Otherwise (a bound >= that value, or fewer than k finite keys) the row is flagged
   and left. chunk_size picks CHUNK so that, for i.i.d. columns, about C(k, TOP+1)/n_chunks^TOP
   of the rows are flagged (<= MAX_OVERFLOW_RATE).
3. _overflow_kernel: the flagged rows, exactly: every column through the bitonic merge, in
   OVERFLOW_SPLITS column splits (so a few rows do not serialise on one SM) into partial top-ks;
   a program with no flagged row runs no tile. _select_kernel (OVERFLOW) merges the splits.

ESTIMATE (sm_90 SASS, no GPU measured it; bench/hopper_compile.py, cycle model in its md), bf16,
integer-pipe clocks over MMA clocks per tile:
    d, k      kernel                                          INT / MMA            CTAs/SM
    768, 32   before: running threshold + candidate appends   4.26                    1
    768, 32   chunks (128 x 128, CHUNK 128)                   0.30 K-loop + 0.58      2
    2048, 64  before                                          2.06                    1
    2048, 64  chunks                                          0.30 K-loop + 0.22      2
so the chunks kernel is MMA-bound (its integer work fits under its MMA, and with two CTAs per
SM one's epilogue overlaps the other's MMA); the select kernel adds about 0.35 (d 768) and 0.14
(d 2048) of the GEMM's time at peak.

Backward is sparse: with g the pre-activation gradients of the k selected slots per row
(dL/dvalue · 1[value > 0]),
    grad x[b]        = Σ_j g[b, j] W_enc[:, idx[b, j]]   (sparse_decode_forward, on W_encᵀ)
    grad W_enc[:, i] = Σ_{(b, j): idx[b, j] = i} g[b, j] (x[b] - b_dec)   (segment_matmul)
    grad b_enc[i]    = Σ_{(b, j): idx[b, j] = i} g[b, j]                  (same kernel)
    grad b_dec       = -Σ_b grad x[b].
"""

import math

import torch
import triton
import triton.language as tl

from .segment_matmul_kernels import segment_matmul
from .sparse_decode_kernels import sparse_decode_forward
from .topk_kernels import (
    INT64_MIN,
    merge_topk,
    pack_keys,
    store_topk,
    topk_reference,
    unpack_keys,
)
from .utils import (
    FLOAT_DTYPES,
    autocast_inputs,
    check_same_device,
    check_tensor,
    is_interpreting,
    use_triton,
)

BACKENDS = ("auto", "fused", "dense")
MAX_FUSED_K = 256  # k_pad above this: the select and exact passes' running top-k grows too large
TOP = 4  # candidates kept per chunk: its TOP largest entries; the next one is the chunk's bound
MAX_OVERFLOW_RATE = 2e-4  # chunk size: expected fraction of rows that need the exact pass
OVERFLOW_SPLITS = 16  # column splits of the exact pass (its latency for a few rows)
GPU_BLOCK_M, GPU_BLOCK_N = 128, 128  # the chunks kernel's tile on a GPU


@triton.jit
def _z_tile(
    xc_rows,
    row_mask,
    w_ptr,
    b_enc_ptr,
    cols,
    col_mask,
    D,
    N,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> tl.tensor:
    """fp32 z = x_c @ W[:, cols] + b_enc[cols] for BLOCK_M rows; -inf in masked columns. The
    pointers advance by BLOCK_K per step (no per-step 64-bit address products), and with EVEN_K
    (BLOCK_K divides D) the loads need no K mask."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = xc_rows + ks[None, :]
    w_ptrs = w_ptr + ks[:, None].to(tl.int64) * N + cols[None, :]
    w_step = tl.full([], BLOCK_K, tl.int64) * N  # N may be a constexpr (1)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            xc = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            k_mask = k0 + ks < D
            xc = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(xc, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += w_step
    acc += tl.load(b_enc_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def _encode_chunks_kernel(
    xc_ptr,
    w_ptr,
    b_enc_ptr,
    key_ptr,
    bound_ptr,
    B,
    D,
    N,
    N_CHUNKS,
    TOP: tl.constexpr,
    CHUNK: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of z; for each row r and chunk c (CHUNK columns) in it:
    key[r, t, c] (t < TOP) = the t-th largest entry as a packed key, bound[r, c] = the next one."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    z = _z_tile(xc_ptr + rows[:, None].to(tl.int64) * D, row_mask, w_ptr, b_enc_ptr, cols,
                cols < N, D, N, EVEN_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    C: tl.constexpr = BLOCK_N // CHUNK
    z3 = tl.reshape(z, [BLOCK_M, C, CHUNK])
    pos = tl.arange(0, CHUNK)[None, None, :]
    chunks = tl.program_id(1) * C + tl.arange(0, C)
    mask = row_mask[:, None] & (chunks < N_CHUNKS)[None, :]
    offs = rows[:, None].to(tl.int64) * (TOP * N_CHUNKS) + chunks[None, :]
    for t in tl.static_range(TOP):
        m, i = tl.max(z3, axis=2, return_indices=True)
        keys = pack_keys(m, chunks[None, :] * CHUNK + i)
        tl.store(key_ptr + offs + t * N_CHUNKS, keys, mask=mask)
        z3 = tl.where(pos == i[:, :, None], float("-inf"), z3)
    bound_offs = rows[:, None].to(tl.int64) * N_CHUNKS + chunks[None, :]
    tl.store(bound_ptr + bound_offs, tl.max(z3, axis=2), mask=mask)


@triton.jit
def _select_kernel(
    key_ptr,
    bound_ptr,
    flag_ptr,
    val_ptr,
    idx_ptr,
    B,
    N_KEYS,
    N_BOUND,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    OVERFLOW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """values/indices of the top-k of each row's N_KEYS keys (bitonic merge).

    First pass: every row; flag[r] = 1, and the row is left unwritten, when an entry outside the
    keys may belong to the top-k: some bound >= the k-th key's value, or no k finite keys.
    OVERFLOW pass: only the flagged rows, whose keys are the exact pass's partial top-ks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    if OVERFLOW:
        active = (tl.load(flag_ptr + rows, mask=row_mask, other=0) != 0) & row_mask
    else:
        active = row_mask
    n_stop = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, N_KEYS, 0)
    key_rows = key_ptr + rows[:, None].to(tl.int64) * N_KEYS
    run = tl.full([BLOCK_M, K_PAD], INT64_MIN, tl.int64)
    for c0 in range(0, n_stop, BLOCK_N):
        slots = c0 + tl.arange(0, BLOCK_N)
        mask = active[:, None] & (slots < N_KEYS)[None, :]
        run = merge_topk(run, tl.load(key_rows + slots[None, :], mask=mask, other=INT64_MIN), K_PAD)
    if OVERFLOW:
        write = active
    else:
        kth = tl.sum(tl.where(tl.arange(0, K_PAD)[None, :] == K - 1, run, 0), axis=1)
        v_k = unpack_keys(kth)[0]
        b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        bound_rows = bound_ptr + rows[:, None].to(tl.int64) * N_BOUND
        for c0 in range(0, N_BOUND, BLOCK_N):
            slots = c0 + tl.arange(0, BLOCK_N)
            mask = row_mask[:, None] & (slots < N_BOUND)[None, :]
            b = tl.load(bound_rows + slots[None, :], mask=mask, other=float("-inf"))
            b_max = tl.maximum(b_max, tl.max(b, axis=1))
        over = (kth == INT64_MIN) | (b_max >= v_k)
        tl.store(flag_ptr + rows, over.to(tl.int32), mask=row_mask)
        write = row_mask & ~over
    store_topk(run, tl.where(write, rows, B), B, val_ptr, idx_ptr, K, K_PAD)


@triton.jit
def _overflow_kernel(
    xc_ptr,
    w_ptr,
    b_enc_ptr,
    flag_ptr,
    part_ptr,
    B,
    D,
    N,
    TILES_PER_SPLIT,
    K_PAD: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The exact pass: part[r, s] = the top K_PAD keys of all of z[r] in column split s, for the
    flagged rows (streaming bitonic merge); a program with no flagged row runs no tile."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    flagged = (tl.load(flag_ptr + rows, mask=row_mask, other=0) != 0) & row_mask
    n_begin = split * TILES_PER_SPLIT * BLOCK_N
    n_end = tl.minimum(n_begin + TILES_PER_SPLIT * BLOCK_N, N)
    n_end = tl.where(tl.max(flagged.to(tl.int32), axis=0) > 0, n_end, n_begin)
    xc_rows = xc_ptr + rows[:, None].to(tl.int64) * D
    run = tl.full([BLOCK_M, K_PAD], INT64_MIN, tl.int64)
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        z = _z_tile(xc_rows, flagged, w_ptr, b_enc_ptr, cols, col_mask, D, N, EVEN_K,
                    DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        keys = tl.where(
            flagged[:, None] & col_mask[None, :], pack_keys(z, cols[None, :]), INT64_MIN
        )
        run = merge_topk(run, keys, K_PAD)
    slots = tl.arange(0, K_PAD)
    offs = (
        rows[:, None].to(tl.int64) * (tl.num_programs(1) * K_PAD) + split * K_PAD + slots[None, :]
    )
    tl.store(part_ptr + offs, run, mask=flagged[:, None])


def chunk_size(n: int, k: int, block_n: int) -> int:
    """Columns per chunk: the largest power of two (8 to BLOCK_N) whose expected share of rows
    with more than TOP of their top-k in one chunk, C(k, TOP+1) / n_chunks^TOP for i.i.d.
    columns, is at most MAX_OVERFLOW_RATE (128 at (n, k) = (32768, 32): 5e-5 of the rows)."""
    chunk = block_n
    while chunk > 8:
        n_chunks = triton.cdiv(n, chunk)
        if math.comb(k, TOP + 1) <= MAX_OVERFLOW_RATE * n_chunks**TOP:
            break
        chunk //= 2
    return chunk


def _fused_config(fp32: bool) -> tuple[int, int, int, int, int, int | None]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, maxnreg) of the chunks kernel."""
    if is_interpreting():  # small tiles: fast there, and several tiles and chunks per row
        return 16, 32, 16, 4, 1, None
    # sm_90 ptxas: 128 x 128 x 64 bf16, 8 warps, capped at 128 registers (138 uncapped) without
    # spills, 97 KiB of shared memory: two CTAs per SM, one's epilogue under the other's MMA.
    # fp32 (tf32x3, BLOCK_K 16) spills under the cap; its MMA time dwarfs the epilogue anyway.
    if fp32:
        return GPU_BLOCK_M, GPU_BLOCK_N, 16, 8, 3, None
    return GPU_BLOCK_M, GPU_BLOCK_N, 64, 8, 3, 128


def _select_config(k_pad: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the select kernel."""
    block_n = max(k_pad, 64 if is_interpreting() else 256)
    block_m = max(1, min(2048 // block_n, 8))
    return block_m, block_n, 4 if block_m * block_n <= 2048 else 8


def _overflow_config(k_pad: int, fp32: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the exact pass: 16 rows, since
    few rows are flagged; 8 warps from k_pad = 64 on (4 spill 24-32 bytes on sm_90)."""
    if is_interpreting():
        return 16, max(32, k_pad), 16, 4, 1
    return 16, max(128, k_pad), 16 if fp32 else 64, 4 if k_pad <= 32 else 8, 2


def _launch_encode_topk(
    xc: torch.Tensor,
    W: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    values: torch.Tensor,
    indices: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Fused top-k of xc @ W + b_enc into values/indices ([B, k]); xc [B, d] in W's dtype,
    W [d, N] contiguous, k_pad <= MAX_FUSED_K. ``chunk``: columns per chunk (default
    chunk_size). Returns the flags ([B] int32; 1: the row went through the exact pass)."""
    B, d = xc.shape
    N = W.shape[1]
    k_pad = triton.next_power_of_2(k)
    fp32 = W.dtype == torch.float32
    precision = "tf32x3" if fp32 else "tf32"
    block_m, block_n, block_k, num_warps, num_stages, maxnreg = _fused_config(fp32)
    chunk = chunk or chunk_size(N, k, block_n)
    n_chunks = triton.cdiv(N, chunk)
    keys = torch.empty(B, TOP * n_chunks, device=xc.device, dtype=torch.int64)
    bound = torch.empty(B, n_chunks, device=xc.device, dtype=torch.float32)
    _encode_chunks_kernel[(triton.cdiv(B, block_m), triton.cdiv(N, block_n))](
        xc, W, b_enc, keys, bound, B, d, N, n_chunks, TOP=TOP, CHUNK=chunk,
        EVEN_K=d % block_k == 0, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
    )  # fmt: skip
    flags = torch.empty(B, device=xc.device, dtype=torch.int32)
    sel_m, sel_n, sel_warps = _select_config(k_pad)
    select = _select_kernel[(triton.cdiv(B, sel_m),)]
    select(
        keys, bound, flags, values, indices, B, TOP * n_chunks, n_chunks, K=k, K_PAD=k_pad,
        OVERFLOW=False, BLOCK_M=sel_m, BLOCK_N=sel_n, num_warps=sel_warps,
    )  # fmt: skip
    fb_m, fb_n, fb_k, fb_warps, fb_stages = _overflow_config(k_pad, fp32)
    n_tiles = triton.cdiv(N, fb_n)
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, OVERFLOW_SPLITS))
    splits = triton.cdiv(n_tiles, tiles_per_split)
    part = torch.empty(B, splits * k_pad, device=xc.device, dtype=torch.int64)
    _overflow_kernel[(triton.cdiv(B, fb_m), splits)](
        xc, W, b_enc, flags, part, B, d, N, tiles_per_split, K_PAD=k_pad,
        EVEN_K=d % fb_k == 0, DOT_PRECISION=precision, BLOCK_M=fb_m, BLOCK_N=fb_n,
        BLOCK_K=fb_k, num_warps=fb_warps, num_stages=fb_stages,
    )  # fmt: skip
    select(
        part, bound, flags, values, indices, B, splits * k_pad, 0, K=k, K_PAD=k_pad,
        OVERFLOW=True, BLOCK_M=sel_m, BLOCK_N=sel_n, num_warps=sel_warps,
    )  # fmt: skip
    return flags


def pick_backend(B: int, d: int, n: int, k: int, fp32: bool = False) -> str:
    """ "fused" or "dense" for a shape and W_enc dtype: an ESTIMATE until a GPU measures both.

    Dense: one cuBLAS GEMM at ~700 TFLOP/s (TF32 at half that for fp32), plus writing z and
    torch.topk reading it (about three passes over B·n bf16 elements at ~2.5 TB/s). Fused: the
    chunks kernel's GEMM at ~80% of cuBLAS's rate (its integer work fits under its MMA on the
    sm_90 SASS estimate, bench/results/hopper_compile.md), tf32x3 (three passes) for fp32,
    plus the select kernel at ~18 ps per key (TOP keys per chunk; the same estimate). On it
    fused wins in bf16 at (768, 32768, 32) and (2048, 65536, 64) and dense in fp32; dense
    also where k_pad exceeds MAX_FUSED_K or n is small."""
    k_pad = triton.next_power_of_2(k)
    if k_pad > MAX_FUSED_K or n < 4096:
        return "dense"
    gemm_s = 2 * B * d * n / (350e12 if fp32 else 700e12)
    dense_s = gemm_s + 6 * B * n / 2.5e12 + 5e-6
    keys = TOP * triton.cdiv(n, chunk_size(n, k, GPU_BLOCK_N))
    fused_s = gemm_s / 0.8 * (6 if fp32 else 1) + B * keys * 18e-12 + 4 * 5e-6
    return "fused" if fused_s < dense_s else "dense"


def _check_inputs(x, W_enc, b_enc, b_dec, k: int, backend: str) -> None:
    check_tensor("x", x, (None, None), FLOAT_DTYPES, "[B, d]")
    d = x.shape[1]
    check_tensor("W_enc", W_enc, (d, None), FLOAT_DTYPES, f"[d={d}, n]")
    n = W_enc.shape[1]
    if x.dtype not in (torch.float32, W_enc.dtype):
        raise ValueError(f"x must have dtype float32 or W_enc's ({W_enc.dtype}), got {x.dtype}")
    check_tensor("b_enc", b_enc, (n,), FLOAT_DTYPES, f"[n={n}]")
    check_tensor("b_dec", b_dec, (d,), FLOAT_DTYPES, f"[d={d}]")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "fused" and triton.next_power_of_2(k) > MAX_FUSED_K:
        raise ValueError(f"backend 'fused' needs k <= {MAX_FUSED_K}, got {k}")
    check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)


def encode_topk_forward(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: checks the inputs, returns (values [B, k] in W_enc's dtype, indices int32)."""
    _check_inputs(x, W_enc, b_enc, b_dec, k, backend)
    B, d = x.shape
    n = W_enc.shape[1]
    if backend == "auto":
        backend = pick_backend(B, d, n, k, W_enc.dtype == torch.float32)
    xc = (x.float() - b_dec.float()).to(W_enc.dtype)
    if backend == "dense":
        z = torch.addmm(b_enc.to(W_enc.dtype), xc, W_enc)
        values, indices = topk_reference(z, k)
        return values, indices
    values = torch.empty(B, k, device=x.device, dtype=W_enc.dtype)
    indices = torch.empty(B, k, device=x.device, dtype=torch.int32)
    _launch_encode_topk(xc, W_enc, b_enc, k, values, indices)
    return values, indices


def encode_topk_backward(
    grad_values: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """(grad x, grad W_enc, grad b_enc, grad b_dec) from the k selected slots per row."""
    g = torch.where(values > 0, grad_values, 0).float()
    need_x, need_w, need_b_enc, need_b_dec = needs_input_grad[:4]
    grad_x = grad_w = grad_b_enc = grad_b_dec = None
    if need_x or need_b_dec:
        gx = sparse_decode_forward(g, indices, W_enc.t().contiguous(), None, torch.float32)
        grad_x = gx.to(x.dtype) if need_x else None
        grad_b_dec = -gx.sum(0).to(b_dec.dtype) if need_b_dec else None
    if need_w or need_b_enc:
        xc = x.float() - b_dec.float()
        grad_w, grad_b_enc = segment_matmul(
            g, indices, xc, W_enc.shape[1], W_enc.dtype, transpose_out=True, with_colsum=True
        )
        grad_b_enc = grad_b_enc.to(b_enc.dtype)
    return grad_x, grad_w, grad_b_enc, grad_b_dec


def encode_topk_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (dense z, torch.topk), differentiable; the CPU path. ``backend`` is checked
    and otherwise ignored."""
    _check_inputs(x, W_enc, b_enc, b_dec, k, backend)
    xc = (x.float() - b_dec.float()).to(W_enc.dtype)
    return topk_reference(torch.addmm(b_enc.to(W_enc.dtype), xc, W_enc), k)


class EncodeTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        k: int,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = encode_topk_forward(x, W_enc, b_enc, b_dec, k, backend)
        ctx.save_for_backward(x, W_enc, b_enc, b_dec, values, indices)
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _grad_indices: None) -> tuple:
        grads = encode_topk_backward(grad_values, *ctx.saved_tensors, ctx.needs_input_grad)
        return *grads, None, None


def encode_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK SAE encoder: (values [B, k], indices [B, k] int32), see the module docstring.

    values = ReLU(TopK_k(z)) of z = (x - b_dec) @ W_enc + b_enc, sorted descending.
    Differentiable w.r.t. x, W_enc, b_enc and b_dec. ``backend``: "auto", "fused" or "dense".
    Under autocast only W_enc is cast to the autocast dtype (x and b_dec stay as given and are
    centred in fp32; values come out in the autocast dtype).
    """
    if use_triton(x):
        (W_enc,) = autocast_inputs(W_enc)
        return EncodeTopKFunction.apply(x, W_enc, b_enc, b_dec, k, backend)
    return encode_topk_reference(x, W_enc, b_enc, b_dec, k, backend)
