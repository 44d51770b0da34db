"""Latent-sharded SAEs (``flashsae.train.sharded``) on 2 gloo ranks against the unsharded SAE
built from the same weights: x̂, loss, fired latents and every gradient (gathered), a few
trainer steps, the gathered checkpoint. Each test spawns the ranks; a rank's assertion error
fails the test with its traceback. Inputs are fresh random draws (the seed is printed)."""

import json
import random
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashsae.train.checkpoint import load_sae, save_sae
from flashsae.train.sae import SAE_CLASSES, SAEConfig, input_scale
from flashsae.train.sharded import (
    SHARD_DIM,
    SHARDED_CLASSES,
    ShardedSAE,
    gather_sae,
    make_sharded_sae,
    save_sharded,
)
from flashsae.train.trainer import SAETraining, aux_budget, TrainConfig, train_many
from flashsae.train.wandb_log import NullLogger

WORLD = 2
D, N, B = 16, 64, 8
ARCHS = sorted(SHARDED_CLASSES)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _spawn(fn, tmp_path: Path) -> None:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    mp.spawn(_worker, args=(fn, str(tmp_path), seed), nprocs=WORLD, join=True)


def _worker(rank: int, fn, tmp: str, seed: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        fn(dist.new_group(list(range(WORLD))), Path(tmp), seed)
    finally:
        dist.destroy_process_group()


def _unsharded(arch: str, seed: int, k: int = 4) -> torch.nn.Module:
    """A random SAE with an untied encoder and biases, alike on every rank for ``seed``; shard
    1's latents get larger pre-activations, so the two shards win different shares."""
    torch.manual_seed(seed)
    sae = SAE_CLASSES[arch](SAEConfig(arch, D, N, k=k, k_aux=8))
    with torch.no_grad():
        sae.W_enc.add_(0.5 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.3)
        sae.b_enc[N // 2 :] += 0.3
        sae.b_dec.normal_()
    return sae


def _gathered(shard: ShardedSAE, name: str, t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which ``t`` is this rank's shard (all ranks get it)."""
    dim = SHARD_DIM[name]
    if dim is None:
        return t
    pieces = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(pieces, t.contiguous(), group=shard.group)
    return torch.cat(pieces, dim)


def _check_step(group, tmp: Path, seed: int) -> None:
    # AuxK's budget: exact (None), or the trainer's (``aux_budget`` of the dead count)
    cases = [(arch, 4, exact) for arch in ARCHS for exact in (True, False)] + [("topk", 40, False)]
    for arch, k, exact in cases:
        t0 = time.time()
        sae = _unsharded(arch, seed, k)
        shard = ShardedSAE.from_sae(sae, group)
        assert shard.W_dec.shape == (N // WORLD, D) and shard.W_enc.shape == (D, N // WORLD)
        gen = torch.Generator().manual_seed(seed + 1)
        x = 2 * torch.randn(B, D, generator=gen) + 1
        dead = torch.rand(N, generator=gen) < 0.5
        budget = None if exact else aux_budget(int(dead.sum()))
        sae.dead_budget = shard.dead_budget = budget
        results = []
        for model in (sae, shard):
            loss, parts, fired = model.training_loss(x, dead, 0.5)
            loss.backward()
            model.before_step()
            results.append((loss, parts, fired))
        (loss, parts, fired), (s_loss, s_parts, s_fired) = results
        case = f"{arch} k={k} budget={budget}"
        assert parts["aux"] > 0, case  # AuxK takes part
        torch.testing.assert_close(s_loss, loss, **TOL, msg=case)
        assert s_parts.keys() == parts.keys(), case
        for key in parts:
            torch.testing.assert_close(s_parts[key], parts[key], **TOL, msg=f"{case} {key}")
        assert torch.equal(s_fired, fired), case
        for name, p in shard.named_parameters():
            full = getattr(sae, name).grad
            torch.testing.assert_close(_gathered(shard, name, p.grad), full, **TOL, msg=name)
        if arch != "topk":  # BatchTopK's θ: the EMA of the global smallest kept value
            assert sae.threshold > 0, case
            torch.testing.assert_close(shard.threshold, sae.threshold, **TOL)
        with torch.no_grad():
            torch.testing.assert_close(shard(x), sae(x), **TOL, msg=f"{case} x̂")
        if arch == "topk":  # the global code is the unsharded one
            sb = shard.encode_sparse(x, shard.b_dec)
            vals, idx = sae.encode_sparse(x)
            torch.testing.assert_close(sb[2], vals, **TOL)
            assert torch.equal(torch.where(vals > 0, sb[3], -1), torch.where(vals > 0, idx, -1))
        print(case, time.time() - t0, flush=True)


def test_forward_loss_and_gradients_match(tmp_path):
    """TopK, BatchTopK, Matryoshka, exact and budgeted AuxK, and k > n/N (kernels run under the
    interpreter): loss and its parts, fired latents, every gradient after the decoder-norm
    gradient projection, BatchTopK's θ, inference x̂, the TopK code."""
    _spawn(_check_step, tmp_path)


class _Batches:
    """The trainer's loader: batch i is fixed by (seed, i)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def batches(self, start: int = 0):
        i = start
        while True:
            gen = torch.Generator().manual_seed(self.seed * 1009 + i)
            yield 3 * torch.randn(B, D, generator=gen) + 1
            i += 1


def _check_training(group, tmp: Path, seed: int) -> None:
    import os

    os.environ.pop("TRITON_INTERPRET", None)  # the torch path: 6 steps x 3 archs stay fast
    rank = dist.get_rank(group)
    cfg = TrainConfig(tokens=6 * B, batch_size=B, lr=1e-2, dead_window=2 * B, log_every=2)
    for arch in ARCHS:
        sae = _unsharded(arch, seed)
        shard = ShardedSAE.from_sae(sae, group)
        ref = SAETraining(sae, cfg, NullLogger())
        member = SAETraining(shard, cfg, NullLogger())
        train_many([ref], _Batches(seed))
        train_many([member], _Batches(seed))
        assert member.sae.dead_budget == ref.sae.dead_budget > 0, arch  # AuxK was on
        torch.testing.assert_close(member.last_fired, ref.last_fired, rtol=0, atol=0)
        assert member.opt.state[shard.W_enc]["exp_avg"].shape == (D, N // WORLD)  # local Adam
        gathered = gather_sae(shard)
        assert (gathered is None) == (rank != 0)
        folder = tmp / arch
        save_sharded(shard, folder / "sharded", "fp32")
        if rank == 0:
            assert type(gathered) is type(sae)
            for name, t in sae.state_dict().items():
                torch.testing.assert_close(gathered.state_dict()[name], t, rtol=1e-4, atol=1e-5)
            save_sae(sae, folder / "unsharded", "fp32")
            loaded, expected = load_sae(folder / "sharded"), load_sae(folder / "unsharded")
            cfgs = [json.loads((folder / f / "cfg.json").read_text()) for f in ("sharded", "unsharded")]
            assert cfgs[0] == cfgs[1]
            for name, t in expected.state_dict().items():
                torch.testing.assert_close(loaded.state_dict()[name], t, rtol=1e-4, atol=1e-5)
            x = next(_Batches(seed + 1).batches())
            torch.testing.assert_close(loaded(x), expected(x), rtol=1e-4, atol=1e-5)
        else:
            assert (folder / "sharded" / "sae.safetensors").exists()  # after save_sharded's barrier


def test_training_steps_and_gathered_checkpoint_match(tmp_path):
    """6 steps of the trainer (``SAETraining``, unchanged) on the sharded and the unsharded SAE
    of each arch, with a short dead window so that the budgeted AuxK is on: the same weights,
    θ and dead-latent counters; Adam state local to the shard; the checkpoint gathered on rank
    0 loads with ``load_sae``, equals the unsharded one and reconstructs as it does."""
    _spawn(_check_training, tmp_path)


def _check_new(group, tmp: Path, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    mean, msn = torch.randn(D, generator=gen), 20.0
    shard = make_sharded_sae("batchtopk", N, mean, msn, group, seed=seed, k=4)
    scale = input_scale(D, msn)
    assert shard.cfg.k_aux == D // 2 and shard.cfg.input_scale == pytest.approx(scale)
    torch.testing.assert_close(shard.b_dec, mean * scale)
    torch.testing.assert_close(shard.W_dec.norm(dim=1), torch.ones(N // WORLD))
    assert torch.equal(shard.W_enc, shard.W_dec.T)
    w = _gathered(shard, "W_dec", shard.W_dec)
    assert not torch.allclose(w[: N // 2], w[N // 2 :])  # each rank drew its own rows
    again = make_sharded_sae("batchtopk", N, mean, msn, group, seed=seed, k=4)
    assert torch.equal(again.W_dec, shard.W_dec)
    with pytest.raises(ValueError, match="not divisible"):
        make_sharded_sae("topk", N + 1, mean, msn, group, k=4)
    with pytest.raises(ValueError, match="supports"):
        make_sharded_sae("relu", N, mean, msn, group)


def test_make_sharded_sae(tmp_path):
    """A new sharded SAE is initialised as ``make_sae`` initialises one, each rank drawing its
    own rows (reproducibly); unsupported archs and indivisible sizes are refused."""
    _spawn(_check_new, tmp_path)
