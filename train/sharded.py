"""Latent-sharded TopK, BatchTopK and Matryoshka SAEs: one dictionary split over the N ranks of
a ``torch.distributed`` process group, for dictionaries too large for one device.

Rank r holds latents [r·n/N, (r+1)·n/N): their columns of W_enc, rows of W_dec and entries of
b_enc, so an optimizer built on ``parameters()`` keeps their Adam state there too. b_dec (and
BatchTopK's θ) is replicated. Every rank gets the same batch x and computes the same loss; the
math is that of the unsharded classes (``topk.py``, ``batchtopk.py``):

- TopK: each rank takes the top-k of its z_r = (x - b_dec) W_enc[:, r] + b_enc[r] with
  ``encode_topk``; the N·k candidates per row (values and global indices) are all-gathered, the
  global top-k of them is the row's code, and each rank keeps its own winners f_r. The global
  top-k is among the candidates because a latent in it is in its own shard's top-k.
- BatchTopK: the same with one "row", the batch: each rank's top B·k of its B·n/N entries of z,
  the global top B·k of the N·B·k candidates; θ's EMA uses the global smallest kept value.
- Matryoshka: BatchTopK's selection; the nested prefixes cut across shards, so each rank sums
  its part of every prefix group and one all-reduce adds the groups' partial reconstructions.
- x̂ = Σ_r f_r W_dec[r] + b_dec, the sum by an all-reduce (``sum_over_ranks``).
- AuxK: each rank gathers its own dead latents (``dead_columns`` on its slice of the mask, the
  same budget on every rank), takes the local top-k_aux, and the aux top-k is sharded like
  TopK's: ê = Σ_r (own aux winners) W_dec[r], all-reduced.

Gradients (the pattern of Megatron's tensor parallel layers): every rank holds dL/dx̂ since every
rank computes L from the same x̂, so the backward of the all-reduced sum is the identity per
rank; b_dec enters the rank-local encoders through ``replicated``, whose backward all-reduces
the encoders' contributions, so each rank ends with the whole gradient of b_dec (decoder part
plus Σ_r encoder parts) and applies the same Adam step to its copy. The selection itself has no
gradient. One all-reduce of d floats is the whole backward's communication. The decoder-norm
steps (``before_step`` / ``after_step``) act on rows, which are local: exact per shard.

The trainer's dead-latent counters stay replicated: ``training_loss`` takes the full [n] dead
mask and returns the full [n] fired mask, computed on every rank from the gathered winners, so
``SAETraining`` drives a ``ShardedSAE`` as it drives an ``SAE``. The AuxK budget the trainer
sets from the full dead count is then the same on every rank (a shard gathers min(budget, n/N)
columns, its dead ones first); ``dead_budget`` None (exact) takes the largest dead count of the
shards by an all-reduce, so the collectives' shapes agree. A budget that covers the dead latents
gives exactly the unsharded AuxK; a stale one (more latents died since the trainer set it) makes
the unsharded SAE take an arbitrary ``budget`` of its dead latents and a shard up to ``budget``
of its own, so the two differ then (both approximate the exact AuxK).

Checkpoints: ``gather_sae`` assembles the unsharded SAE on rank 0 (rank by rank, one shard in
flight), and ``save_sharded`` writes it with ``save_sae``: the one-file layout that ``load_sae``,
eval and export read. ``state_dict()`` is the rank's shard (same keys as the unsharded SAE) for
per-rank training states.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from flashsae.kernels import encode_topk, normalize_decoder_, remove_parallel_grad_, sparse_decode
from flashsae.kernels import topk as topk_rows

from .batchtopk import BatchTopKSAE, MatryoshkaSAE, ema_threshold_, matryoshka_prefixes
from .checkpoint import save_sae
from .sae import SAE, SAEConfig, dead_columns, fired_latents, input_scale, normalized_mse
from .topk import TopKSAE

# how each parameter splits over the ranks: the latent dimension, None when replicated
SHARD_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0, "b_dec": None, "threshold": None}


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        return grad, None


class _Replicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:  # noqa: ANN001
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """y = Σ_r x_r (an all-reduce); backward: dL/dx_r = dL/dy, the identity, for a loss that
    every rank computes alike from y."""
    return _SumOverRanks.apply(x, group)


def replicated(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """x itself, for a tensor held alike on every rank and used by rank-local computations;
    backward: the all-reduced sum of the ranks' gradients."""
    return _Replicated.apply(x, group)


@torch.no_grad()
def global_topk(
    values: torch.Tensor, ids: torch.Tensor, k: int, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k per row over every rank's candidates: (keep, values [R, k], ids [R, k]).

    ``values`` [R, c] are this rank's candidates (c alike on every rank), ``ids`` [R, c] their
    global indices; both are all-gathered. The returned values (descending) and ids are the
    winners, alike on every rank; ``keep`` [R, c] bool marks this rank's candidates among them.
    k is capped at N·c."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    every_value = [torch.empty_like(values) for _ in range(world)]
    every_id = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(every_value, values.contiguous(), group=group)
    dist.all_gather(every_id, ids.contiguous(), group=group)
    all_values, all_ids = torch.cat(every_value, 1), torch.cat(every_id, 1)  # rank-major
    win_values, pos = torch.topk(all_values, min(k, all_values.shape[1]), dim=1)
    c = values.shape[1]
    won = torch.zeros_like(all_values, dtype=torch.bool).scatter_(1, pos, True)
    return won[:, rank * c : (rank + 1) * c], win_values, all_ids.gather(1, pos)


class ShardedSAE(nn.Module):
    """One rank's shard of a TopK-family SAE (see the module docstring); subclasses give the
    selection and the loss. Construct with ``from_sae`` (slices of an unsharded SAE) or
    ``make_sharded_sae`` (a fresh dictionary, each rank drawing its own rows).

    ``cfg`` is the whole SAE's config (``n_latents`` is n, not n/N); ``offset`` and ``n_local``
    locate this rank's latents."""

    base: type[SAE]  # the unsharded architecture: its name, optimizer settings, checkpoint class
    dead_budget: int | None = None  # AuxK columns per shard (``dead_columns``); set by the trainer
    # the trainer's clip_grad_norm_ would see one shard's gradients; none of these archs clips
    grad_clip: float | None = None

    def __init__(
        self,
        cfg: SAEConfig,
        group: dist.ProcessGroup | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Initialised as the unsharded class is (unit-norm random W_dec rows from
        ``generator``, W_enc = W_decᵀ, zero biases), on the CPU."""
        super().__init__()
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if cfg.arch != self.base.arch:
            raise ValueError(f"{type(self).__name__} shards {self.base.arch!r}, not {cfg.arch!r}")
        if cfg.n_latents % world:
            raise ValueError(f"n_latents {cfg.n_latents} is not divisible by {world} ranks")
        if not 1 <= cfg.k <= cfg.n_latents:
            raise ValueError(f"k must be in [1, n_latents={cfg.n_latents}], got {cfg.k}")
        self.cfg, self.group = cfg, group
        if self.base.grad_clip is not None:
            raise ValueError(f"{self.base.arch!r} clips gradients, which needs their global norm")
        self.adam_betas, self.lr_decay_frac = self.base.adam_betas, self.base.lr_decay_frac
        self.n_local = cfg.n_latents // world
        self.offset = rank * self.n_local
        w_dec = torch.randn(self.n_local, cfg.d, generator=generator)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=1, keepdim=True))
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d))

    @classmethod
    @torch.no_grad()
    def from_sae(cls, sae: SAE, group: dist.ProcessGroup | None = None) -> ShardedSAE:
        """This rank's shard of ``sae`` (on ``sae``'s device): the slices of its weights."""
        with torch.device("meta"):  # no init drawn: the weights are copied in
            shard = SHARDED_CLASSES[sae.cfg.arch](sae.cfg, group)
        shard = shard.to_empty(device=sae.W_dec.device)
        lo, hi = shard.offset, shard.offset + shard.n_local
        for name, tensor in shard.state_dict().items():
            full = sae.state_dict()[name]
            dim = SHARD_DIM[name]
            tensor.copy_(full if dim is None else full.narrow(dim, lo, hi - lo))
        return shard

    def _local(self, mask: torch.Tensor) -> torch.Tensor:
        return mask[self.offset : self.offset + self.n_local]

    def _aux_columns(self, dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``dead_columns`` of this shard's slice ``dead``, with as many columns on every rank."""
        budget = self.dead_budget
        if budget is None:  # exact: the most dead latents of any shard (a host sync)
            count = dead.sum().reshape(1)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
            budget = int(count)
        return dead_columns(dead, budget)

    def auxk_loss(
        self,
        xc: torch.Tensor,
        e: torch.Tensor,
        dead_mask: torch.Tensor,
        preacts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sharded AuxK (``sae.auxk_loss``): normalized MSE of reconstructing ``e`` from the
        global top-k_aux pre-activations of dead latents. ``dead_mask`` [n] is the whole mask;
        ``preacts`` [B, n/N] this shard's z when the caller has it."""
        cols, dead = self._aux_columns(self._local(dead_mask))
        c = min(self.cfg.k_aux, cols.numel())  # alike on every rank
        if c == 0:
            return torch.zeros((), device=xc.device)
        if preacts is None:
            z = torch.addmm(self.b_enc[cols], xc, self.W_enc[:, cols])
        else:
            z = preacts[:, cols]
        z = torch.where(dead, z, -torch.inf).contiguous()
        vals, slots = topk_rows(z, c)
        idx = cols[slots.long()]
        keep = global_topk(vals.detach(), idx + self.offset, self.cfg.k_aux, self.group)[0]
        e_hat = sparse_decode(
            torch.where(keep, vals, 0), idx.int(), self.W_dec, torch.zeros_like(self.W_dec[0])
        )
        return normalized_mse(e, sum_over_ranks(e_hat.float(), self.group)) * dead_mask.any()

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the decoder gradient component parallel to each (unit) row of the shard."""
        if self.W_dec.grad is not None:
            remove_parallel_grad_(self.W_dec, self.W_dec.grad)

    @torch.no_grad()
    def after_step(self) -> None:
        normalize_decoder_(self.W_dec)

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(loss, its detached parts, [n] bool of latents that fired), alike on every rank, as
        the unsharded ``training_loss``; ``dead_mask`` is the whole [n] mask."""
        raise NotImplementedError


class ShardedTopKSAE(ShardedSAE):
    """A shard of ``TopKSAE``: sharded top-k (see the module docstring)."""

    base = TopKSAE

    def encode_sparse(
        self, x: torch.Tensor, b_dec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values [B, k'], local int32 indices [B, k'], winners' values [B, k], their global
        indices [B, k]): this shard's top-k' (k' = min(k, n/N)) of z with the values of the
        non-winners zeroed, then the row's whole code, alike on every rank. ``b_dec`` is
        ``replicated(self.b_dec)``."""
        vals, idx = encode_topk(x, self.W_enc, self.b_enc, b_dec, min(self.cfg.k, self.n_local))
        keep, win_vals, win_ids = global_topk(
            vals.detach(), idx + self.offset, self.cfg.k, self.group
        )
        return torch.where(keep, vals, 0), idx, win_vals, win_ids

    def _decode(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        part = sparse_decode(vals, idx, self.W_dec, torch.zeros_like(self.W_dec[0]))
        return sum_over_ranks(part.float(), self.group) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ [B, d] (fp32), alike on every rank."""
        vals, idx = self.encode_sparse(x, replicated(self.b_dec, self.group))[:2]
        return self._decode(vals, idx)

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        b_dec = replicated(self.b_dec, self.group)  # one all-reduce of its encoder gradients
        vals, idx, win_vals, win_ids = self.encode_sparse(x, b_dec)
        x_hat = self._decode(vals, idx)
        mse = normalized_mse(x, x_hat)
        aux = self.auxk_loss(x - b_dec, (x - x_hat).detach(), dead_mask)
        loss = mse + self.cfg.aux_alpha * aux
        parts = {"mse": mse.detach(), "aux": aux.detach(), "fvu": mse.detach()}
        return loss, parts, fired_latents(win_ids, win_vals, self.cfg.n_latents)


class ShardedBatchTopKSAE(ShardedSAE):
    """A shard of ``BatchTopKSAE``: the batch's top B·k over all shards, θ replicated."""

    base = BatchTopKSAE

    def __init__(
        self,
        cfg: SAEConfig,
        group: dist.ProcessGroup | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(cfg, group, generator)
        self.register_buffer("threshold", torch.zeros(()))

    def batch_topk(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f [B, n/N], min_kept, fired [n]) of this shard's pre-activations z [B, n/N]:
        f = ReLU(z) at this shard's entries among the batch's global top B·k, 0 elsewhere;
        min_kept (the smallest kept positive value, 0 if none) and fired alike on every rank."""
        B = z.shape[0]
        flat = z.reshape(-1)
        vals, pos = torch.topk(flat, min(B * self.cfg.k, flat.numel()), sorted=False)
        ids = pos % self.n_local + self.offset
        keep, win_vals, win_ids = global_topk(
            vals.detach()[None], ids[None], B * self.cfg.k, self.group
        )
        kept = torch.where(keep[0], vals.relu(), 0)
        f = torch.zeros_like(flat).scatter(0, pos, kept).view_as(z)
        win_vals = win_vals.relu()
        positive = torch.where(win_vals > 0, win_vals, torch.inf).min()
        min_kept = torch.where(torch.isinf(positive), 0.0, positive)
        return f, min_kept, fired_latents(win_ids, win_vals, self.cfg.n_latents)

    def reconstruction_loss(
        self, x: torch.Tensor, f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(normalized MSE, x̂, extra logged parts) from this shard's latents f [B, n/N]."""
        x_hat = sum_over_ranks((f @ self.W_dec).float(), self.group) + self.b_dec
        return normalized_mse(x, x_hat), x_hat, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference x̂ [B, d] (fp32) with f = z ⊙ 1[z > θ], alike on every rank."""
        z = torch.addmm(self.b_enc, x - replicated(self.b_dec, self.group), self.W_enc)
        return self.reconstruction_loss(x, torch.where(z > self.threshold, z, 0))[1]

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        xc = x - replicated(self.b_dec, self.group)  # one all-reduce of its encoder gradients
        z = torch.addmm(self.b_enc, xc, self.W_enc)
        f, min_kept, fired = self.batch_topk(z)
        ema_threshold_(self.threshold, min_kept)
        rec, x_hat, extra = self.reconstruction_loss(x, f)
        aux = self.auxk_loss(xc, (x - x_hat).detach(), dead_mask, preacts=z)
        loss = rec + self.cfg.aux_alpha * aux
        fvu = normalized_mse(x, x_hat).detach()
        parts = {"mse": fvu, "aux": aux.detach(), "fvu": fvu, **extra}
        return loss, parts, fired


class ShardedMatryoshkaSAE(ShardedBatchTopKSAE):
    """A shard of ``MatryoshkaSAE``: BatchTopK's selection, the nested-prefix loss."""

    base = MatryoshkaSAE

    def reconstruction_loss(
        self, x: torch.Tensor, f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Mean over the nested prefixes of the normalized MSE of their reconstructions: this
        shard's part of each prefix group, [G, B, d], all-reduced once, then summed up."""
        parts, start = [], 0
        for end in matryoshka_prefixes(self.cfg.n_latents):
            lo = min(max(start - self.offset, 0), self.n_local)
            hi = min(max(end - self.offset, 0), self.n_local)
            parts.append(f[:, lo:hi] @ self.W_dec[lo:hi])
            start = end
        groups = sum_over_ranks(torch.stack(parts).float(), self.group)
        x_hats = groups.cumsum(0) + self.b_dec
        loss = torch.stack([normalized_mse(x, x_hat) for x_hat in x_hats]).mean()
        return loss, x_hats[-1], {"prefix_mse": loss.detach()}


SHARDED_CLASSES: dict[str, type[ShardedSAE]] = {
    cls.base.arch: cls for cls in (ShardedTopKSAE, ShardedBatchTopKSAE, ShardedMatryoshkaSAE)
}


def make_sharded_sae(
    arch: str,
    n_latents: int,
    mean: torch.Tensor,
    mean_sq_norm: float,
    group: dist.ProcessGroup | None = None,
    seed: int = 0,
    **cfg: object,
) -> ShardedSAE:
    """This rank's shard of a new ``arch`` SAE, as ``make_sae`` makes one (input scale
    s = sqrt(d / E||x||²), k_aux = d/2, b_dec = s · mean) without building the whole dictionary:
    rank r draws its n/N decoder rows from a generator seeded with seed·N + r, so the weights
    depend on the seed and the number of ranks. On the CPU."""
    if arch not in SHARDED_CLASSES:
        raise ValueError(f"latent sharding supports {sorted(SHARDED_CLASSES)}, not {arch!r}")
    d = mean.shape[0]
    config = SAEConfig(
        arch=arch,
        d=d,
        n_latents=n_latents,
        **{"k_aux": d // 2, **cfg, "input_scale": input_scale(d, mean_sq_norm)},
    )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    generator = torch.Generator().manual_seed(seed * world + rank)
    shard = SHARDED_CLASSES[arch](config, group, generator)
    with torch.no_grad():
        shard.b_dec.copy_(mean.float() * config.input_scale)
    return shard


@torch.no_grad()
def gather_state_dict(shard: ShardedSAE) -> dict[str, torch.Tensor] | None:
    """The unsharded SAE's state dict (CPU tensors) on the group's rank 0, None on the others.
    Each shard travels to rank 0 by itself (point to point), so rank 0's device holds at most
    one other shard at a time; rank 0's host memory holds the whole SAE."""
    group = shard.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out = {}
    for name, tensor in shard.state_dict().items():
        dim = SHARD_DIM[name]
        if dim is None:
            out[name] = tensor.cpu().clone()
            continue
        if rank != 0:
            dist.send(tensor.contiguous(), dst=_global(group, 0), group=group)
            continue
        pieces = [tensor.cpu()]
        for src in range(1, world):
            piece = torch.empty_like(tensor)
            dist.recv(piece, src=_global(group, src), group=group)
            pieces.append(piece.cpu())
        out[name] = torch.cat(pieces, dim)
    return out if rank == 0 else None


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def gather_sae(shard: ShardedSAE) -> SAE | None:
    """The unsharded SAE (``shard.base``, on the CPU) on the group's rank 0, None elsewhere."""
    state = gather_state_dict(shard)
    if state is None:
        return None
    with torch.device("meta"):
        sae = shard.base(shard.cfg)
    sae.load_state_dict(state, assign=True)
    return sae


def save_sharded(shard: ShardedSAE, folder: Path, train_dtype: str | None = None) -> None:
    """Write the gathered SAE to ``folder`` from rank 0 (``save_sae``: ``sae.safetensors`` +
    ``cfg.json``); every rank returns once the files exist."""
    sae = gather_sae(shard)
    if sae is not None:
        save_sae(sae, folder, train_dtype)
    dist.barrier(group=shard.group)
