# ruff: noqa: ANN001 - Triton reads parameter annotations as type specializations
"""Activation capture: compact the kept rows, cast them, and gather statistics in one read.

For a hidden state h [N, d] (B·T rows) and a keep-mask [N]:

    rows  = h[keep].to(dtype)                   (kept rows, in order)
    sum   = Σ_{t kept} h_t          [d]        (fp32 partials per program, summed in fp64)
    sq    = Σ_{t kept} ||h_t||²                (likewise)

Each program handles BLOCK_R rows: it loads only the kept ones (a masked load, so dropped
rows are never read), stores them at their compacted position (an exclusive prefix sum of
the mask, computed by torch.cumsum), and writes its partial sums. The statistics are of the
values before the cast. Capture needs no gradient, so there is no autograd Function.
"""

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES, check_same_device, check_tensor, use_triton


@triton.jit
def _compact_rows_kernel(
    h_ptr, keep_ptr, dest_ptr, out_ptr, psum_ptr, psq_ptr, N, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < N
    keep = tl.load(keep_ptr + rows, mask=in_range, other=0) != 0
    dest = tl.load(dest_ptr + rows, mask=in_range, other=0).to(tl.int64)
    sq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        mask = (in_range & keep)[:, None] & col_ok[None, :]
        x = tl.load(h_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        tl.store(
            out_ptr + dest[:, None] * D + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask
        )
        tl.store(psum_ptr + pid * D + cols, tl.sum(x, axis=0), mask=col_ok)
        sq += tl.sum(x * x, axis=1)
    tl.store(psq_ptr + pid, tl.sum(sq, axis=0))


def _blocks(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): up to 256 columns a step, about 8K elements (at most 64 rows) each."""
    block_d = min(triton.next_power_of_2(d), 256)
    return max(1, min(64, 8192 // block_d)), block_d


def _launch_compact_rows(
    h: torch.Tensor,
    keep: torch.Tensor,
    dest: torch.Tensor,
    out: torch.Tensor,
    psum: torch.Tensor,
    psq: torch.Tensor,
) -> None:
    """Unchecked: run _compact_rows_kernel, the kept rows of h [N, d] into out at dest [N] and
    the per-program partial sums into psum [programs, d] and psq [programs]."""
    n, d = h.shape
    block_r, block_d = _blocks(d)
    _compact_rows_kernel[(psq.shape[0],)](
        h, keep, dest, out, psum, psq, n, d, BLOCK_R=block_r, BLOCK_D=block_d
    )


def compact_rows_forward(
    h: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked launcher: (rows [R, d] in ``dtype``, sum [d] fp64, sum of squared norms (0-d,
    fp64))."""
    check_tensor("h", h, (None, None), FLOAT_DTYPES, "[N, d]")
    n, d = h.shape
    check_tensor("keep", keep, (n,), (torch.bool,), f"[N={n}]")
    check_same_device(h=h, keep=keep)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a float dtype, got {dtype}")
    dest = torch.cumsum(keep, 0, dtype=torch.int32) - 1
    count = int(dest[-1].item()) + 1 if n else 0
    grid = triton.cdiv(n, _blocks(d)[0])
    out = torch.empty(count, d, dtype=dtype, device=h.device)
    psum = torch.empty(grid, d, dtype=torch.float32, device=h.device)
    psq = torch.empty(grid, dtype=torch.float32, device=h.device)
    if grid:
        _launch_compact_rows(h, keep, dest, out, psum, psq)
    return out, psum.double().sum(0), psq.double().sum()


def row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t x_t [d], Σ_t ||x_t||²) in fp64, from column sums and row norms in fp32 (torch
    reduces them pairwise)."""
    x = x.float()
    return x.sum(0).double(), torch.linalg.vector_norm(x, dim=1).double().square().sum()


def compact_rows_reference(
    h: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch: the CPU path and the test oracle."""
    kept = h[keep]
    return kept.to(dtype), *row_stats(kept)


def compact_rows(
    h: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept rows of ``h`` [N, d] cast to ``dtype``, their per-dimension sum and their sum of
    squared norms (both fp64), from one read of ``h``."""
    if use_triton(h):
        return compact_rows_forward(h.contiguous(), keep.contiguous(), dtype)
    return compact_rows_reference(h, keep, dtype)
