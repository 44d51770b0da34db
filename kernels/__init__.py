"""Triton kernels for sparse autoencoders, each with a plain-torch reference.

CUDA tensors run Triton; CPU tensors run the torch reference, unless TRITON_INTERPRET=1.
"""

from .batch_topk_kernels import batch_topk
from .decoder_norm_kernels import normalize_decoder_, remove_parallel_grad_
from .encode_topk_kernels import encode_topk
from .gated_kernels import gated
from .jumprelu_kernels import jumprelu
from .sparse_decode_kernels import sparse_decode
from .topk_kernels import topk

__all__ = [
    "batch_topk",
    "encode_topk",
    "gated",
    "jumprelu",
    "normalize_decoder_",
    "remove_parallel_grad_",
    "sparse_decode",
    "topk",
]
