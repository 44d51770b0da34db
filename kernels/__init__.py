"""Triton kernels for sparse autoencoders, each with a plain-torch reference.

CUDA tensors run Triton; CPU tensors run the torch reference, unless TRITON_INTERPRET=1.
"""

from .batch_topk import batch_topk
from .decoder_norm import normalize_decoder_, remove_parallel_grad_
from .encode_topk_kernels import encode_topk
from .gated import gated
from .jumprelu import jumprelu
from .sparse_decode import sparse_decode
from .topk import topk

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
