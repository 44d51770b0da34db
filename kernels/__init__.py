"""Triton kernels for sparse autoencoders, each with a plain-torch reference.

CUDA tensors run Triton; CPU tensors run the torch reference, unless TRITON_INTERPRET=1.
Each operation <op> lives in <op>_kernels.py: its @triton.jit kernels, ``_launch_<op>`` (an
unchecked launch into preallocated outputs), ``<op>_forward`` / ``<op>_backward`` (checked
launchers that validate shapes, dtypes and devices and allocate), ``<op>_reference`` (plain
torch), ``<Op>Function`` (the autograd Function, where there is a gradient) and ``<op>``.
"""

from .batch_topk_kernels import batch_topk
from .capture_kernels import compact_rows
from .decoder_norm_kernels import normalize_decoder_, remove_parallel_grad_
from .encode_topk_kernels import encode_topk
from .gated_kernels import gated
from .jumprelu_kernels import BANDWIDTH, jumprelu
from .segment_matmul_kernels import segment_matmul
from .sparse_decode_kernels import sparse_decode
from .topk_kernels import topk

__all__ = [
    "BANDWIDTH",
    "batch_topk",
    "compact_rows",
    "encode_topk",
    "gated",
    "jumprelu",
    "normalize_decoder_",
    "remove_parallel_grad_",
    "segment_matmul",
    "sparse_decode",
    "topk",
]
