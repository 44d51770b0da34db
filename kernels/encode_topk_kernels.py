# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""TopK SAE encoder: z = (x - b_dec) @ W_enc + b_enc, values, indices = ReLU(TopK_k(z)).

x [B, d], W_enc [d, n], b_enc [n], b_dec [d]. Returns values [B, k] (W_enc's dtype, sorted
descending per row) and indices [B, k] int32; the selected set is exactly torch.topk's on the
pre-activations z (up to ties). The centring x_c = x - b_dec is done in fp32 and rounded once to
W_enc's dtype for the MMA; z is accumulated in fp32.

Backends: "dense" (one GEMM, z materialised, torch.topk), "fused" (the Triton kernels below, z
never reaches memory) and "auto" (pick_backend: an estimate until a GPU measures it).

Fused forward, three kernels, no host sync:

1. _encode_candidates_kernel: each program owns BLOCK_M rows and a split of the latents and
   computes z tile by tile, each BLOCK_M × BLOCK_N tile as two column halves of H = BLOCK_N/2
   (two accumulators in one K-loop). Per row it keeps g[r, c] = max of z[r, j] over the
   columns j of the split seen so far in residue class c (mod BLOCK_N; the halves' g_a, g_b):
   BLOCK_N distinct entries, so any t_r with at least K_PAD of them >= t_r is a lower bound of
   the row's k-th best value. t_r is raised (_raise_threshold: bisection between max(t_r,
   min g) and max g, counting g >= mid; STEPS steps, no sort) on the first WARMUP tiles and
   every REFRESH-th tile after. Entries with z >= t_r are candidates, appended as packed int64
   keys (pack_keys: value and column in one store) to a per-row buffer of CAP slots: one
   atomic_add per row with candidates reserves their slots (offsets from a cumsum), so only
   rows with candidates pay the atomic (a per-element masked atomic_add fails Triton 3.9's
   layout pass for sm_90). After the first tiles few entries beat t_r: about k·BLOCK_N/n_seen
   per row and tile, k·(1 + ln(n/BLOCK_N)) per row in all for i.i.d. columns (more with the
   refresh schedule and the group maxima).
   Exact: an entry z_e < t_r has K_PAD >= k distinct entries (group maxima) above it, so every
   entry with z >= the final k-th value is a candidate.
   Registers (ptxas for sm_90, triton 3.9, B, d, n, CAP divisible by 16 as the launcher
   specialises them): the previous form (one 64×128 epilogue, tl.topk refresh inside the
   loop, value and column stored separately) used 255 registers and spilled 540-1250 bytes;
   the halves halve the epilogue's live set (the scatter stores' 64-bit addresses dominate),
   one key store halves the addresses again, and the bisection needs no sort network. Now
   251 registers in bf16 (BLOCK_K 64) and 241 in fp32 (tf32x3, BLOCK_K 16; 32 spills), no
   spills; 8 warps, so one CTA per SM (the bare 64×128 GEMM alone takes 114: 2 CTAs of 8
   warps, <= 128, is out of reach with a per-element scatter in the same loop).
   SASS per tile per thread, steady-state loop (the K-loop × D/BLOCK_K, refresh branch
   excluded), bf16, 64×128, 8 warps; "int" = SEL+ISETP+LOP3+IMAD+IADD3+SHF+LEA+PRMT+PLOP3+
   FSETP+FMNMX+P2R+POPC. ESTIMATE (no GPU measured it): int at 16 lanes/clk/SMSP, SHFL at 32
   lanes/clk/SM, MMA at 2048 bf16 MAC/clk/SM (3072 clk per tile at d = 768, 8192 at 2048):
       d, k      kernel                        HGMMA  int   SHFL  int+SHFL clk : MMA clk
       768, 32   48b9355 (tl.topk + merge)       48   4264   736   22.9k : 3.1k (7.5x)
       768, 32   this one                        96   2114   212   10.2k : 3.1k (3.3x)
       2048, 64  48b9355                        128   7173  1024   36.9k : 8.2k (4.5x)
       2048, 64  this one                       256   3174   212   14.4k : 8.2k (1.8x)
   (HGMMA here is m64n64k16 per half; 48b9355 issued m64n128k16.) About 640 of the int count
   at d = 768 is the K-loop's own address and pipeline bookkeeping.
2. _select_kernel: the exact top-k of each row's candidates (packed int64 keys, bitonic merge).
3. _overflow_kernel: rows whose counter exceeds CAP (adversarial inputs, e.g. z increasing with
   the column, make every tile beat t_r) are recomputed exactly by streaming all of z through
   the bitonic merge; a program with no overflowed row runs no tile.

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
from .topk_kernels import INT64_MIN, merge_topk, pack_keys, store_topk, topk_reference
from .utils import (
    FLOAT_DTYPES,
    autocast_inputs,
    check_same_device,
    check_tensor,
    is_interpreting,
    use_triton,
)

BACKENDS = ("auto", "fused", "dense")
MAX_FUSED_K = 256  # k_pad above this: the running top-k no longer fits next to the z tile
WARMUP, REFRESH = 8, 16  # threshold refreshed on the first WARMUP tiles, then every REFRESH-th
STEPS = 8  # bisection steps per refresh


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
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> tl.tensor:
    """fp32 z = x_c @ W[:, cols] + b_enc[cols] for BLOCK_M rows; -inf in masked columns."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        xc = tl.load(xc_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(
            w_ptr + ks[:, None].to(tl.int64) * N + cols[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(xc, w, acc, input_precision=DOT_PRECISION)
    acc += tl.load(b_enc_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_mask[None, :], acc, float("-inf"))


@triton.jit
def _z_halves(
    xc_rows,
    row_mask,
    w_ptr,
    b_enc_ptr,
    cols_a,
    cols_b,
    D,
    N,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    H: tl.constexpr,
    BLOCK_K: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:
    """fp32 z of two column sets (H each) in one K-loop; -inf in columns >= N. Two accumulators
    of one layout: the halves' epilogues run one after the other (half the live registers of
    one BLOCK_M x 2H epilogue) and their elementwise max needs no data movement."""
    acc_a = tl.zeros([BLOCK_M, H], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, H], dtype=tl.float32)
    mask_a = cols_a < N
    mask_b = cols_b < N
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D
        xc = tl.load(xc_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_rows = w_ptr + ks[:, None].to(tl.int64) * N
        w_a = tl.load(w_rows + cols_a[None, :], mask=k_mask[:, None] & mask_a[None, :], other=0.0)
        w_b = tl.load(w_rows + cols_b[None, :], mask=k_mask[:, None] & mask_b[None, :], other=0.0)
        acc_a = tl.dot(xc, w_a, acc_a, input_precision=DOT_PRECISION)
        acc_b = tl.dot(xc, w_b, acc_b, input_precision=DOT_PRECISION)
    acc_a += tl.load(b_enc_ptr + cols_a, mask=mask_a, other=0.0).to(tl.float32)[None, :]
    acc_b += tl.load(b_enc_ptr + cols_b, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    z_a = tl.where(mask_a[None, :], acc_a, float("-inf"))
    return z_a, tl.where(mask_b[None, :], acc_b, float("-inf"))


@triton.jit
def _append_candidates(z, t, cols, rows, row_mask, key_rows, count_ptr, CAP) -> None:
    """Append the entries z[r, j] >= t[r] as packed keys to row r's buffer: one atomic per row
    with entries reserves their slots, a cumsum numbers them within the tile."""
    hit = (z >= t[:, None]) & row_mask[:, None] & (z > float("-inf"))
    n_hit = tl.sum(hit.to(tl.int32), axis=1)
    base = tl.atomic_add(count_ptr + rows, n_hit, mask=n_hit > 0, sem="relaxed")
    slot = base[:, None] + tl.cumsum(hit.to(tl.int32), axis=1) - 1
    tl.store(key_rows + slot, pack_keys(z, cols[None, :]), mask=hit & (slot < CAP))


@triton.jit
def _raise_threshold(g_a, g_b, t, K_PAD: tl.constexpr, STEPS: tl.constexpr) -> tl.tensor:
    """[M] a value lo >= t with at least K_PAD entries of the group maxima g_a, g_b >= lo, by
    STEPS bisection steps between max(t, min g) and max g (no sort: compares and row sums).
    Needs count(g >= t) >= K_PAD already (true for t = -inf, and g only grows)."""
    lo = tl.maximum(t, tl.minimum(tl.min(g_a, axis=1), tl.min(g_b, axis=1)))
    hi = tl.maximum(tl.max(g_a, axis=1), tl.max(g_b, axis=1))
    for _ in tl.static_range(STEPS):
        mid = lo + (hi - lo) * 0.5  # NaN while lo = -inf: no compare holds, lo stays
        above = (g_a >= mid[:, None]).to(tl.int32)
        n_above = tl.sum(above, axis=1) + tl.sum((g_b >= mid[:, None]).to(tl.int32), axis=1)
        ok = n_above >= K_PAD
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo


@triton.jit
def _encode_candidates_kernel(
    xc_ptr,
    w_ptr,
    b_enc_ptr,
    cand_key_ptr,
    count_ptr,
    B,
    D,
    N,
    TILES_PER_SPLIT,
    CAP,
    K_PAD: tl.constexpr,
    WARMUP: tl.constexpr,
    REFRESH: tl.constexpr,
    STEPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Append every z[r, j] >= t_r of this program's rows and split to the candidate buffer."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    xc_rows = xc_ptr + rows[:, None].to(tl.int64) * D
    key_rows = cand_key_ptr + rows[:, None].to(tl.int64) * CAP
    H: tl.constexpr = BLOCK_N // 2
    g_a = tl.full([BLOCK_M, H], float("-inf"), tl.float32)
    g_b = tl.full([BLOCK_M, H], float("-inf"), tl.float32)
    t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    n_begin = split * TILES_PER_SPLIT * BLOCK_N
    n_end = tl.minimum(n_begin + TILES_PER_SPLIT * BLOCK_N, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols_a = n0 + tl.arange(0, H)
        cols_b = cols_a + H
        z_a, z_b = _z_halves(xc_rows, row_mask, w_ptr, b_enc_ptr, cols_a, cols_b, D, N,
                             DOT_PRECISION, BLOCK_M, H, BLOCK_K)  # fmt: skip
        _append_candidates(z_a, t, cols_a, rows, row_mask, key_rows, count_ptr, CAP)
        g_a = tl.maximum(g_a, z_a)
        _append_candidates(z_b, t, cols_b, rows, row_mask, key_rows, count_ptr, CAP)
        g_b = tl.maximum(g_b, z_b)
        tile = (n0 - n_begin) // BLOCK_N
        if (tile < WARMUP) | (tile % REFRESH == 0):  # for the next tile; z is dead here
            t = _raise_threshold(g_a, g_b, t, K_PAD, STEPS)


@triton.jit
def _select_kernel(
    cand_key_ptr,
    count_ptr,
    val_ptr,
    idx_ptr,
    B,
    CAP,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """values/indices of the exact top-k of each row's candidates; overflowed rows are left."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    count = tl.load(count_ptr + rows, mask=row_mask, other=0)
    n_valid = tl.minimum(count, CAP)
    cand_rows = rows[:, None].to(tl.int64) * CAP
    run = tl.full([BLOCK_M, K_PAD], INT64_MIN, tl.int64)
    for c0 in range(0, tl.max(n_valid, axis=0), BLOCK_N):
        slots = c0 + tl.arange(0, BLOCK_N)
        mask = slots[None, :] < n_valid[:, None]
        keys = tl.load(cand_key_ptr + cand_rows + slots[None, :], mask=mask, other=INT64_MIN)
        run = merge_topk(run, keys, K_PAD)
    store_topk(run, tl.where(count > CAP, B, rows), B, val_ptr, idx_ptr, K, K_PAD)


@triton.jit
def _overflow_kernel(
    xc_ptr,
    w_ptr,
    b_enc_ptr,
    count_ptr,
    val_ptr,
    idx_ptr,
    B,
    D,
    N,
    CAP,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Exact top-k (streaming bitonic merge over all of z) of the rows whose buffer overflowed;
    runs no tile when none of its rows did."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    over = (tl.load(count_ptr + rows, mask=row_mask, other=0) > CAP) & row_mask
    n_stop = tl.where(tl.max(over.to(tl.int32), axis=0) > 0, N, 0)
    xc_rows = xc_ptr + rows[:, None].to(tl.int64) * D
    run = tl.full([BLOCK_M, K_PAD], INT64_MIN, tl.int64)
    for n0 in range(0, n_stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        z = _z_tile(xc_rows, over, w_ptr, b_enc_ptr, cols, col_mask, D, N,
                    DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
        keys = tl.where(over[:, None] & col_mask[None, :], pack_keys(z, cols[None, :]), INT64_MIN)
        run = merge_topk(run, keys, K_PAD)
    store_topk(run, tl.where(over, rows, B), B, val_ptr, idx_ptr, K, K_PAD)


def _expected_candidates(n_split: int, k_pad: int, block_n: int) -> float:
    """Candidates per row and split for i.i.d. columns: k·(1 + ln(n_split / BLOCK_N))."""
    return k_pad * (1 + math.log(max(1.0, n_split / block_n)))


def _fused_config(k_pad: int, fp32: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the candidate kernel."""
    if is_interpreting():  # small tiles: fast there, and they exercise refreshes and splits
        return 16, max(32, k_pad), 16, 4, 1
    # 64 x 128 with 8 warps spills least under ptxas for sm_90 (ptxas -v).
    return 64, max(128, k_pad), 16 if fp32 else 64, 8, 3


def _launch_encode_topk(
    xc: torch.Tensor,
    W: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    values: torch.Tensor,
    indices: torch.Tensor,
    capacity: int | None = None,
    warmup: int = WARMUP,
    refresh: int = REFRESH,
) -> torch.Tensor:
    """Fused top-k of xc @ W + b_enc into values/indices ([B, k]); xc [B, d] in W's dtype,
    W [d, N] contiguous, k_pad <= MAX_FUSED_K. ``capacity``: candidate slots per row (default
    about three times the expected count). Returns the candidates per row ([B] int32; a row
    with more than ``capacity`` went through the overflow kernel)."""
    B, d = xc.shape
    N = W.shape[1]
    k_pad = triton.next_power_of_2(k)
    fp32 = W.dtype == torch.float32
    block_m, block_n, block_k, num_warps, num_stages = _fused_config(k_pad, fp32)
    precision = "tf32x3" if fp32 else "tf32"
    n_tiles = triton.cdiv(N, block_n)
    row_blocks = triton.cdiv(B, block_m)
    if is_interpreting():
        splits = min(2, n_tiles)
    else:  # two programs per SM
        sms = torch.cuda.get_device_properties(xc.device).multi_processor_count
        splits = min(n_tiles, max(1, triton.cdiv(2 * sms, row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    if capacity is None:
        per_split = _expected_candidates(tiles_per_split * block_n, k_pad, block_n)
        capacity = min(N, triton.next_power_of_2(int(3 * splits * per_split)))
    counts = torch.zeros(B, device=xc.device, dtype=torch.int32)
    cand_key = torch.empty(B, capacity, device=xc.device, dtype=torch.int64)
    _encode_candidates_kernel[(row_blocks, splits)](
        xc, W, b_enc, cand_key, counts, B, d, N, tiles_per_split, capacity, K_PAD=k_pad,
        WARMUP=warmup, REFRESH=refresh, STEPS=STEPS, DOT_PRECISION=precision, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    sel_n = max(k_pad, 64 if is_interpreting() else 256)
    sel_m = max(1, min(triton.next_power_of_2(B), 2048 // sel_n, 8))
    _select_kernel[(triton.cdiv(B, sel_m),)](
        cand_key, counts, values, indices, B, capacity, K=k, K_PAD=k_pad,
        BLOCK_M=sel_m, BLOCK_N=sel_n, num_warps=4 if sel_m * sel_n <= 2048 else 8,
    )  # fmt: skip
    fb_m = 16 if is_interpreting() else 64
    fb_n = max(block_n, k_pad) if is_interpreting() else max(128, k_pad)
    _overflow_kernel[(triton.cdiv(B, fb_m),)](
        xc,
        W,
        b_enc,
        counts,
        values,
        indices,
        B,
        d,
        N,
        capacity,
        K=k,
        K_PAD=k_pad,
        DOT_PRECISION=precision,
        BLOCK_M=fb_m,
        BLOCK_N=fb_n,
        BLOCK_K=block_k,
        num_warps=4 if is_interpreting() else 8,
        num_stages=2 if fp32 else num_stages,
    )  # fmt: skip  (3 stages spill 12 bytes in fp32 at k_pad = 64 under ptxas for sm_90)
    return counts


def pick_backend(B: int, d: int, n: int, k: int) -> str:
    """ "fused" or "dense" for a shape: an ESTIMATE until a GPU measures both paths.

    Dense: one cuBLAS GEMM at ~700 TFLOP/s, plus writing z and torch.topk reading it (about
    three passes over B·n bf16 elements at ~2.5 TB/s). Fused: its GEMM at ~80% of cuBLAS's rate,
    stretched by the integer work of the selection, which the sm_90 SASS of the candidates
    kernel puts at (0.74 + 2700/d) times the MMA clocks per tile in bf16
    (bench/results/hopper_compile.md: 4.3x at d = 768, 2.1x at d = 2048), with no overlap of
    the two assumed. On that estimate dense wins at every d (fused would need the ratio under
    ~1.1), so "auto" picks dense; fused stays selectable, and dense is forced where k_pad
    exceeds MAX_FUSED_K."""
    k_pad = triton.next_power_of_2(k)
    if k_pad > MAX_FUSED_K or n < 4096:
        return "dense"
    gemm_s = 2 * B * d * n / 700e12
    fused_s = gemm_s / 0.8 * max(1.0, 0.74 + 2700 / d) + 3 * 5e-6
    dense_s = gemm_s + 6 * B * n / 2.5e12 + 5e-6
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
        backend = pick_backend(B, d, n, k)
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
