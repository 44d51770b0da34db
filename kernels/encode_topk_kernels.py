# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Fused TopK encoder: z = (x - b_dec) @ W_enc + b_enc, values, indices = ReLU(TopK_k(z)).

x [B, d], W_enc [d, n], b_enc [n], b_dec [d]. With k_aux > 0 it also returns the top-k_aux
pre-activations among latents with dead_mask True (ReLU'd, for AuxK); when fewer than k_aux
latents are dead, the remaining slots hold value 0 and index 0. With k_aux = 0 the aux outputs
are empty [B, 0] tensors. Values are sorted descending per row, indices are int32.

Forward kernel: each program owns BLOCK_M rows and a split of the latents; it computes z tile by
tile (BLOCK_M × BLOCK_N, K-loop over d) and merges each tile into a running top-k of packed keys
in registers, so the B×n pre-activation matrix never reaches memory. With several splits per row
block (to fill the GPU when B is small) each split writes its top-k keys ([B, splits, K_PAD]) and
the topk kernel merges them. The aux top-k reruns the same kernel on the dead columns of W_enc
(gathered; finding them costs one host sync). For k > MAX_FUSED_K (typically k_aux = d/2) the
running top-k no longer fits in registers, and z is materialised in row chunks instead.

Backward is sparse: with g the pre-activation gradients of the k + k_aux selected slots per
row (dL/dvalue · 1[value > 0]),
    grad x[b]        = Σ_j g[b, j] W_enc[:, idx[b, j]]   (sparse_decode_forward on a W_encᵀ copy)
    grad W_enc[:, i] = Σ_{(b, j): idx[b, j] = i} g[b, j] (x[b] - b_dec)   (segment_matmul)
    grad b_enc[i]    = Σ_{(b, j): idx[b, j] = i} g[b, j]                  (same kernel)
    grad b_dec       = -Σ_b grad x[b].
"""

import torch
import triton
import triton.language as tl

from .segment_matmul_kernels import segment_matmul
from .sparse_decode_kernels import sparse_decode_forward
from .topk_kernels import INT64_MIN, _launch_topk, merge_topk, pack_keys, store_topk, topk_reference
from .utils import (
    FLOAT_DTYPES,
    autocast_inputs,
    check_same_device,
    check_tensor,
    is_interpreting,
    use_triton,
)


@triton.jit
def _encode_topk_kernel(
    x_ptr,
    w_ptr,
    b_enc_ptr,
    b_dec_ptr,
    val_ptr,
    idx_ptr,
    keys_ptr,
    B,
    D,
    N,
    TILES_PER_SPLIT,
    NUM_SPLITS,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    WRITE_KEYS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    x_rows = x_ptr + rows[:, None].to(tl.int64) * D
    run = tl.full([BLOCK_M, K_PAD], INT64_MIN, tl.int64)
    n_begin = split * TILES_PER_SPLIT * BLOCK_N
    n_end = tl.minimum(n_begin + TILES_PER_SPLIT * BLOCK_N, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < D
            x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b_dec = tl.load(b_dec_ptr + ks, mask=k_mask, other=0.0)
            xc = (x.to(tl.float32) - b_dec.to(tl.float32)[None, :]).to(w_ptr.dtype.element_ty)
            w = tl.load(
                w_ptr + ks[:, None].to(tl.int64) * N + cols[None, :],
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            acc = tl.dot(xc, w, acc, input_precision=DOT_PRECISION)
        acc += tl.load(b_enc_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        keys = pack_keys(acc, cols[None, :])
        keys = tl.where(row_mask[:, None] & col_mask[None, :], keys, INT64_MIN)
        run = merge_topk(run, keys, K_PAD)
    if WRITE_KEYS:
        slots = tl.arange(0, K_PAD)
        offs = (rows[:, None].to(tl.int64) * NUM_SPLITS + split) * K_PAD + slots[None, :]
        tl.store(keys_ptr + offs, run, mask=row_mask[:, None])
    else:
        store_topk(run, rows, B, val_ptr, idx_ptr, K, K_PAD)


# Above this (next power of two of) k, e.g. AuxK's k_aux = d/2, the running top-k no longer fits
# in registers next to the z tile; z is then computed in row chunks with cuBLAS instead.
MAX_FUSED_K = 256
CHUNK_BYTES = 1 << 28


def _launch_encode_topk(
    x: torch.Tensor,
    W: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    values: torch.Tensor,
    indices: torch.Tensor,
) -> None:
    """Top-k of (x - b_dec) @ W + b_enc into values/indices ([B, k]); W is [d, N] contiguous."""
    B, d = x.shape
    N = W.shape[1]
    k_pad = triton.next_power_of_2(k)
    if k_pad > MAX_FUSED_K:
        _launch_chunked(x, W, b_enc, b_dec, k, values, indices)
        return
    fp32 = x.dtype == torch.float32
    if is_interpreting():
        # Small tiles keep the interpreter fast and exercise the streaming merge and the splits.
        block_m = min(16, triton.next_power_of_2(B))
        block_n, block_k, num_warps, num_stages = 32, 32, 4, 1
    elif k_pad <= 64:
        block_m, block_n, block_k, num_warps, num_stages = 64, 128, 32 if fp32 else 64, 8, 3
    elif k_pad <= 128:
        block_m, block_n, block_k, num_warps, num_stages = 32, 128, 32 if fp32 else 64, 8, 3
    else:
        block_m, block_n, block_k, num_warps, num_stages = 16, 256, 32 if fp32 else 64, 8, 3
    block_n = max(block_n, k_pad)
    n_tiles = triton.cdiv(N, block_n)
    row_blocks = triton.cdiv(B, block_m)
    if is_interpreting():
        splits = min(2, n_tiles)
    else:  # enough programs for one wave over the SMs
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = min(n_tiles, max(1, triton.cdiv(sms, row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    keys = (
        torch.empty(B, splits * k_pad, device=x.device, dtype=torch.int64) if splits > 1 else None
    )
    _encode_topk_kernel[(row_blocks, splits)](
        x, W, b_enc, b_dec, values, indices, keys, B, d, N, tiles_per_split, splits, K=k,
        K_PAD=k_pad, WRITE_KEYS=splits > 1, DOT_PRECISION="tf32x3" if fp32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        _launch_topk(keys, k, values, indices, is_keys=True)


def _launch_chunked(
    x: torch.Tensor,
    W: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    values: torch.Tensor,
    indices: torch.Tensor,
) -> None:
    """Large k: z for CHUNK_BYTES of rows at a time (torch matmul, z in x's dtype), then topk."""
    B, N = x.shape[0], W.shape[1]
    chunk = max(1, CHUNK_BYTES // (N * x.element_size()))
    b_enc = b_enc.to(x.dtype)
    for r0 in range(0, B, chunk):
        xc = (x[r0 : r0 + chunk].float() - b_dec.float()).to(x.dtype)
        z = torch.addmm(b_enc, xc, W)
        _launch_topk(z, k, values[r0 : r0 + chunk], indices[r0 : r0 + chunk], is_keys=False)


def _check_k(n: int, k: int, k_aux: int, dead_mask: torch.Tensor | None) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if not 0 <= k_aux <= n:
        raise ValueError(f"k_aux must be in [0, n={n}], got {k_aux}")
    if k_aux > 0 and dead_mask is None:
        raise ValueError("k_aux > 0 needs dead_mask (a [n] bool tensor)")


def encode_topk_forward(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    k_aux: int,
    dead_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launcher: checks the inputs, returns (values, indices, aux_values, aux_indices)."""
    check_tensor("x", x, (None, None), FLOAT_DTYPES, "[B, d]")
    B, d = x.shape
    check_tensor("W_enc", W_enc, (d, None), (x.dtype,), f"[d={d}, n] with x's dtype")
    n = W_enc.shape[1]
    check_tensor("b_enc", b_enc, (n,), FLOAT_DTYPES, f"[n={n}]")
    check_tensor("b_dec", b_dec, (d,), FLOAT_DTYPES, f"[d={d}]")
    _check_k(n, k, k_aux, dead_mask)
    check_same_device(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec)
    values = torch.empty(B, k, device=x.device, dtype=x.dtype)
    indices = torch.empty(B, k, device=x.device, dtype=torch.int32)
    _launch_encode_topk(x, W_enc, b_enc, b_dec, k, values, indices)

    aux_values = torch.zeros(B, k_aux, device=x.device, dtype=x.dtype)
    aux_indices = torch.zeros(B, k_aux, device=x.device, dtype=torch.int32)
    if k_aux > 0:
        check_tensor("dead_mask", dead_mask, (n,), (torch.bool,), f"[n={n}]")
        check_same_device(x=x, dead_mask=dead_mask)
        dead = dead_mask.nonzero().squeeze(1)
        k_live = min(k_aux, dead.numel())
        if k_live > 0:
            dead_values = torch.empty(B, k_live, device=x.device, dtype=x.dtype)
            dead_slots = torch.empty(B, k_live, device=x.device, dtype=torch.int32)
            W_dead = W_enc.index_select(1, dead)
            _launch_encode_topk(x, W_dead, b_enc[dead], b_dec, k_live, dead_values, dead_slots)
            aux_values[:, :k_live] = dead_values
            aux_indices[:, :k_live] = dead.int()[dead_slots.long()]
    return values, indices, aux_values, aux_indices


def encode_topk_backward(
    grad_values: torch.Tensor,
    grad_aux_values: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_dec: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    aux_values: torch.Tensor,
    aux_indices: torch.Tensor,
    needs_input_grad: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """(grad x, grad W_enc, grad b_enc, grad b_dec) from the k + k_aux selected slots per row."""
    g = torch.cat(
        [torch.where(values > 0, grad_values, 0), torch.where(aux_values > 0, grad_aux_values, 0)],
        dim=1,
    ).float()
    idx = torch.cat([indices, aux_indices], dim=1)
    need_x, need_w, need_b_enc, need_b_dec = needs_input_grad[:4]
    grad_x = grad_w = grad_b_enc = grad_b_dec = None
    if need_x or need_b_dec:
        gx = sparse_decode_forward(g, idx, W_enc.t().contiguous(), None, torch.float32)
        grad_x = gx.to(x.dtype) if need_x else None
        grad_b_dec = -gx.sum(0).to(b_dec.dtype) if need_b_dec else None
    if need_w or need_b_enc:
        xc = x.float() - b_dec.float()
        grad_w, grad_b_enc = segment_matmul(
            g, idx, xc, W_enc.shape[1], W_enc.dtype, transpose_out=True, with_colsum=True
        )
    return grad_x, grad_w, grad_b_enc, grad_b_dec


def encode_topk_reference(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    k_aux: int = 0,
    dead_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch (dense z, torch.topk, topk over the dead columns), differentiable; the CPU
    path. Aux slots beyond the number of dead latents hold value 0 and index 0, as in Triton."""
    _check_k(W_enc.shape[1], k, k_aux, dead_mask)
    z = torch.addmm(b_enc, x - b_dec, W_enc)
    values, indices = topk_reference(z, k)
    B = x.shape[0]
    aux_values, aux_indices = z.new_zeros(B, 0), indices.new_zeros(B, 0)
    if k_aux > 0:
        dead = dead_mask.nonzero().squeeze(1)
        k_live = min(k_aux, dead.numel())
        if k_live > 0:
            aux_values, dead_slots = topk_reference(z[:, dead], k_live)
            aux_indices = dead.int()[dead_slots.long()]
        aux_values = torch.cat([aux_values, z.new_zeros(B, k_aux - k_live)], dim=1)
        aux_indices = torch.cat([aux_indices, indices.new_zeros(B, k_aux - k_live)], dim=1)
    return values, indices, aux_values, aux_indices


class EncodeTopKFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        b_dec: torch.Tensor,
        k: int,
        k_aux: int,
        dead_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        outs = encode_topk_forward(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask)
        values, indices, aux_values, aux_indices = outs
        ctx.save_for_backward(x, W_enc, b_dec, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return outs

    @staticmethod
    def backward(
        ctx,
        grad_values: torch.Tensor,
        _grad_indices: None,
        grad_aux_values: torch.Tensor,
        _grad_aux_indices: None,
    ) -> tuple:
        grads = encode_topk_backward(
            grad_values, grad_aux_values, *ctx.saved_tensors, ctx.needs_input_grad
        )
        return *grads, None, None, None


def encode_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    k: int,
    k_aux: int = 0,
    dead_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK SAE encoder: (values, indices, aux_values, aux_indices), see the module docstring.

    values/indices [B, k]: ReLU(TopK_k(z)) of z = (x - b_dec) @ W_enc + b_enc; aux_values/
    aux_indices [B, k_aux]: the same over the latents with dead_mask True. Differentiable w.r.t.
    x, W_enc, b_enc and b_dec through both outputs; under autocast the float inputs are cast to
    the autocast dtype first.
    """
    if use_triton(x):
        x, W_enc, b_enc, b_dec = autocast_inputs(x, W_enc, b_enc, b_dec)
        return EncodeTopKFunction.apply(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask)
    return encode_topk_reference(x, W_enc, b_enc, b_dec, k, k_aux, dead_mask)
