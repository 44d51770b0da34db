# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Per-row TopK activation: values, indices = ReLU(TopK_k(z)) (Gao et al. 2024).

values[b] are the k largest pre-activations of row b, ReLU'd and sorted descending;
indices[b] their columns (int32). Ties: any of the tied columns may be chosen.
Gradient: dL/dz[b, indices[b, j]] = dL/dvalues[b, j] · 1[values[b, j] > 0], zero elsewhere.

Forward kernel: each program streams BLOCK_M rows through tiles of BLOCK_N columns and keeps a
running top-k of packed int64 keys (an order-preserving int32 image of the fp32 value in the high
half, the column in the low half), so n need not be a power of two nor fit in registers.
The key helpers are shared with the fused encoder (encode_topk_kernels.py).
"""

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, autocast_inputs, check_tensor, is_interpreting, use_triton

INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def pack_keys(z, idx) -> tl.tensor:
    """int64 keys ordered like (z, idx): fp32 bits made order-preserving, then the index."""
    bits = z.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | idx.to(tl.int64)


@triton.jit
def unpack_keys(keys) -> tuple[tl.tensor, tl.tensor]:
    """Inverse of pack_keys: (fp32 value, int32 index)."""
    key = (keys >> 32).to(tl.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), keys.to(tl.int32)


@triton.jit
def merge_topk(run, keys, K_PAD: tl.constexpr) -> tl.tensor:
    """Top K_PAD of run ([M, K_PAD], sorted descending) ∪ keys ([M, BLOCK], BLOCK >= K_PAD),
    sorted descending. Bitonic top-k: max(a, flip(b)) of two sorted lists is bitonic."""
    if K_PAD == 1:
        return tl.maximum(run, tl.max(keys, axis=1, keep_dims=True))
    top = tl.topk(keys, K_PAD, dim=1)
    return tl.bitonic_merge(tl.maximum(run, tl.flip(top, dim=1)), dim=1, descending=True)


@triton.jit
def store_topk(run, rows, B, val_ptr, idx_ptr, K: tl.constexpr, K_PAD: tl.constexpr) -> None:
    """Write the first K of the running keys as ReLU'd values and int32 indices ([B, K])."""
    z, idx = unpack_keys(run)
    slots = tl.arange(0, K_PAD)
    mask = (rows < B)[:, None] & (slots < K)[None, :]
    offs = rows[:, None].to(tl.int64) * K + slots[None, :]
    tl.store(val_ptr + offs, tl.maximum(z, 0.0).to(val_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + offs, idx, mask=mask)


@triton.jit
def _topk_kernel(
    z_ptr,
    val_ptr,
    idx_ptr,
    B,
    N,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    IS_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """z is [B, N] floats, or with IS_KEYS already-packed int64 keys (partial results)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    run = tl.full([BLOCK_M, K_PAD], INT64_MIN, tl.int64)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mask = row_mask[:, None] & (cols < N)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        if IS_KEYS:
            keys = tl.load(z_ptr + offs, mask=mask, other=INT64_MIN)
        else:
            z = tl.load(z_ptr + offs, mask=mask).to(tl.float32)
            keys = tl.where(mask, pack_keys(z, cols[None, :]), INT64_MIN)
        run = merge_topk(run, keys, K_PAD)
    store_topk(run, rows, B, val_ptr, idx_ptr, K, K_PAD)


def _launch_topk(
    z: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor, is_keys: bool
) -> None:
    """Unchecked: run _topk_kernel over the rows of z ([B, N] floats or int64 keys) into
    values/indices ([B, k])."""
    B, N = z.shape
    k_pad = triton.next_power_of_2(k)
    # Small tiles under the interpreter: fast there, and they exercise the streaming merge.
    block_n = max(k_pad, min(triton.next_power_of_2(N), 64 if is_interpreting() else 256))
    block_m = max(1, min(triton.next_power_of_2(B), 2048 // block_n, 8))
    grid = (triton.cdiv(B, block_m),)
    _topk_kernel[grid](
        z, values, indices, B, N, K=k, K_PAD=k_pad, IS_KEYS=is_keys, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=topk_num_warps(block_m, block_n),
    )  # fmt: skip


def topk_num_warps(block_m: int, block_n: int) -> int:
    """4 warps for tiles up to 1024 keys, else 8: a 4 x 512 tile (K_PAD = 512, AuxK's k_aux =
    384 at d = 768) spills 32 bytes with 4 warps on sm_90 and none with 8."""
    return 4 if block_m * block_n <= 1024 else 8


def topk_forward(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked launcher: z [B, n] float contiguous, 1 <= k <= n; returns (values, indices)."""
    check_tensor("z", z, (None, None), FLOAT_DTYPES, "[B, n]")
    B, n = z.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    values = torch.empty(B, k, device=z.device, dtype=z.dtype)
    indices = torch.empty(B, k, device=z.device, dtype=torch.int32)
    _launch_topk(z, k, values, indices, is_keys=False)
    return values, indices


def topk_backward(
    grad_values: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n: int
) -> torch.Tensor:
    """dL/dz: grad_values · 1[values > 0] scattered to the selected columns of a zero [B, n]."""
    grad = torch.where(values > 0, grad_values, 0).to(values.dtype)
    out = torch.zeros(values.shape[0], n, device=values.device, dtype=values.dtype)
    return out.scatter_(1, indices.long(), grad)


def topk_reference(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch: ReLU of torch.topk (sorted descending), int32 indices. Differentiable."""
    values, indices = torch.topk(z, k, dim=1)
    return values.relu(), indices.int()


class TopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = topk_forward(z, k)
        ctx.save_for_backward(values, indices)
        ctx.n = z.shape[1]
        ctx.mark_non_differentiable(indices)
        return values, indices

    @staticmethod
    def backward(ctx, grad_values: torch.Tensor, _grad_indices: None) -> tuple:
        values, indices = ctx.saved_tensors
        return topk_backward(grad_values, values, indices, ctx.n), None


def topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row TopK activation of pre-activations z [B, n].

    Returns (values [B, k], indices [B, k] int32) with values = ReLU(z[b, indices[b]]) sorted
    descending; all-negative rows give zeros. Differentiable w.r.t. z; under autocast z is cast
    to the autocast dtype first.
    """
    if use_triton(z):
        (z,) = autocast_inputs(z)
        return TopKFunction.apply(z, k)
    return topk_reference(z, k)
