"""BatchTopK activation (Bussmann et al. 2024): keep the top B·k pre-activations of the batch.

f = ReLU(z) on the B·k largest entries of z [B, n] (over the whole batch, ties broken
arbitrarily), 0 elsewhere. Gradient: dL/dz = dL/df on the kept entries with z > 0, 0 elsewhere.

Torch only, on every device: the global selection is a radix select over B·n values, which
torch.topk already runs on the GPU; a Triton version would re-implement it, not fuse anything.
The result is dense [B, n] because rows keep different numbers of latents.
"""

import torch

from .utils import autocast_inputs


def batch_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK of z [B, n] with k per row on average: returns (f, min_kept).

    f [B, n] (z's dtype) holds ReLU(z) at the B·k largest entries of z and 0 elsewhere;
    differentiable w.r.t. z. min_kept is a 0-d tensor, the smallest kept positive activation
    (0 if none is positive), detached: the quantity whose EMA is the inference threshold θ.
    Under autocast z is cast to the autocast dtype first.
    """
    (z,) = autocast_inputs(z)
    if z.dim() != 2:
        raise ValueError(f"z must have shape [B, n], got {tuple(z.shape)}")
    B, n = z.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    values, flat = torch.topk(z.reshape(-1), B * k, sorted=False)
    values = values.relu()
    f = torch.zeros_like(z).reshape(-1).scatter(0, flat, values).view(B, n)
    kept = values.detach()
    positive = torch.where(kept > 0, kept, torch.inf).min()
    min_kept = torch.where(torch.isinf(positive), 0.0, positive).to(z.dtype)
    return f, min_kept
