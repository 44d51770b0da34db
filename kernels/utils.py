"""Helpers shared by the kernel files: dispatch, autocast, input checks, grid splits."""

import os

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_interpreting() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``), read at call time."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Dispatch rule: CUDA tensors run the Triton kernels, CPU tensors the torch reference,
    unless the interpreter is on, in which case the Triton code runs on the CPU too."""
    return t.is_cuda or is_interpreting()


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast floating tensors to the autocast dtype when autocast is on for their device.

    Custom autograd Functions bypass autocast; casting before ``apply`` keeps the casts in the
    autograd graph, so fp32 master weights receive fp32 gradients. Every differentiable public
    function calls it; the in-place decoder updates, compact_rows and segment_matmul do not (they
    write in place or take an explicit dtype).
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def check_tensor(
    name: str,
    t: torch.Tensor,
    shape: tuple[int | None, ...],
    dtypes: tuple[torch.dtype, ...],
    layout: str,
) -> None:
    """Raise ValueError unless ``t`` is contiguous with ``shape`` (None: any size) and a dtype
    in ``dtypes``; ``layout`` names the expected shape in the message, e.g. ``"[n, d]"``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor {layout}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(
        s is not None and s != ts for s, ts in zip(shape, t.shape, strict=False)
    ):
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(dt).removeprefix("torch.") for dt in dtypes)
        raise ValueError(
            f"{name} must have dtype {names}, got {str(t.dtype).removeprefix('torch.')}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")


def check_same_device(**tensors: torch.Tensor) -> None:
    """Raise ValueError unless all tensors share one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device, got {listed}")


def column_splits(
    B: int, n: int, block_m: int, block_n: int, device: torch.device
) -> tuple[int, int]:
    """How a column-reduction kernel splits its B rows: (splits, rows_per_split).

    Each program owns BLOCK_N columns and one split of rows_per_split rows (a multiple of
    BLOCK_M), so splits × cdiv(n, BLOCK_N) programs run: about 4 per SM (2 per column block when
    interpreting), at most one split per BLOCK_M rows, and no split is empty."""
    col_blocks = triton.cdiv(n, block_n)
    if is_interpreting():
        target = 2 * col_blocks
    else:
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(B, block_m), triton.cdiv(target, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(B, splits), block_m) * block_m
    return triton.cdiv(B, rows_per_split), rows_per_split
