"""Latent-sharded SAEs (``flashsae.train.sharded``) on 2 gloo ranks against the unsharded SAE
built from the same weights: x̂, loss, fired latents and every gradient (gathered), a few
trainer steps and a resume, the gathered checkpoint. The tests share one pool of spawned ranks
(``_Ranks``); a rank's assertion error fails the test with its traceback. Inputs are fresh
random draws (the seed is printed)."""

import contextlib
import json
import os
import queue
import random
import traceback
from dataclasses import replace
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
from flashsae.train.trainer import SAETraining, TrainConfig, aux_budget, train_many
from flashsae.train.wandb_log import NullLogger

WORLD = 2
D, N, B = 16, 64, 8
ARCHS = sorted(SHARDED_CLASSES)
TOL = {"rtol": 1e-5, "atol": 1e-5}


class _Ranks:
    """WORLD spawned processes in one gloo group, kept for the module's tests (starting them is
    most of a test's time): ``run(fn, tmp)`` calls ``fn(group, tmp, seed)`` on every rank with a
    fresh seed and fails with the first rank's traceback. After a failure the processes are
    replaced (their group may be mid-collective)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []

    def start(self) -> None:
        ctx = mp.get_context("spawn")
        rendezvous = self.tmp / f"rendezvous-{random.SystemRandom().randrange(2**31)}"
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        args = [(r, rendezvous, self.tasks[r], self.results) for r in range(WORLD)]
        self.procs = [ctx.Process(target=_serve, args=a, daemon=True) for a in args]
        for p in self.procs:
            p.start()

    def run(self, fn, tmp: Path) -> None:
        if not self.procs:
            self.start()
        seed = random.SystemRandom().randrange(2**31)
        print(f"seed {seed}")
        for q in self.tasks:
            q.put((fn, tmp, seed))
        try:
            errors = [self.results.get(timeout=180) for _ in range(WORLD)]
        except queue.Empty:
            errors = ["a rank gave no result within 180 s"]
        errors = [e for e in errors if e]
        if errors:
            self.stop()
            pytest.fail(errors[0], pytrace=False)

    def stop(self) -> None:
        for q in self.tasks if self.procs else ():
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.procs = []


def _serve(rank: int, rendezvous: Path, tasks, results) -> None:
    """A rank's loop: run the tasks of ``_Ranks.run`` until None; report "" or a traceback."""
    timeout = timedelta(seconds=60)  # a rank left waiting by a failed one errs out
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD, timeout=timeout
    )
    group = dist.new_group(list(range(WORLD)), timeout=timeout)
    while (task := tasks.get()) is not None:
        fn, tmp, seed = task
        try:
            fn(group, tmp, seed)
            results.put("")
        except BaseException:
            results.put(f"rank {rank}:\n{traceback.format_exc()}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pool = _Ranks(tmp_path_factory.mktemp("ranks"))
    yield pool
    pool.stop()


@contextlib.contextmanager
def _torch_path():
    """Kernels dispatch to their torch references (the interpreter is slow); the sharding logic
    around them is the same."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


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
    # (arch, k, exact AuxK or the trainer's budget, Triton kernels: under the interpreter on a
    # CPU, slow, so once; the other cases run the kernels' torch references)
    cases = [(arch, 4, exact, False) for arch in ARCHS for exact in (True, False)]
    cases += [("topk", 4, False, True), ("topk", 40, False, False)]  # k > n/N
    for arch, k, exact, kernels in cases:
        with contextlib.nullcontext() if kernels else _torch_path():
            _check_case(group, seed, arch, k, exact)


def _check_case(group, seed: int, arch: str, k: int, exact: bool) -> None:
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
        *_, win_vals, win_ids = shard.encode_sparse(x, shard.b_dec)
        vals, idx = sae.encode_sparse(x)
        torch.testing.assert_close(win_vals, vals, **TOL)
        assert torch.equal(torch.where(vals > 0, win_ids, -1), torch.where(vals > 0, idx, -1))


def test_forward_loss_and_gradients_match(ranks, tmp_path):
    """TopK, BatchTopK, Matryoshka, exact and budgeted AuxK, k > n/N, the Triton kernels once:
    loss and its parts, fired latents, every gradient after the decoder-norm gradient
    projection, BatchTopK's θ, inference x̂, the TopK code."""
    ranks.run(_check_step, tmp_path)


class _Crash(Exception):
    pass


class _Batches:
    """The trainer's loader: batch i is fixed by (seed, i); with ``crash_at``, a crash there."""

    def __init__(self, seed: int, crash_at: int | None = None) -> None:
        self.seed, self.crash_at = seed, crash_at

    def batches(self, start: int = 0):
        i = start
        while True:
            if i == self.crash_at:
                raise _Crash
            gen = torch.Generator().manual_seed(self.seed * 1009 + i)
            yield 3 * torch.randn(B, D, generator=gen) + 1
            i += 1


def _check_training(group, tmp: Path, seed: int) -> None:
    with _torch_path():  # 6 steps x 3 archs x 2 SAEs
        for arch in ARCHS:
            _check_training_of(group, tmp, seed, arch)


def _check_training_of(group, tmp: Path, seed: int, arch: str) -> None:
    # log_every=1: the AuxK budget is refreshed every step, so it covers the dead latents (a
    # stale one makes the unsharded SAE pick an arbitrary subset of them, see sharded.py)
    cfg = TrainConfig(tokens=6 * B, batch_size=B, lr=1e-2, dead_window=2 * B, log_every=1)
    sae = _unsharded(arch, seed)
    shard = ShardedSAE.from_sae(sae, group)
    ref, member = SAETraining(sae, cfg, NullLogger()), SAETraining(shard, cfg, NullLogger())
    train_many([ref], _Batches(seed))
    train_many([member], _Batches(seed))
    assert member.sae.dead_budget == ref.sae.dead_budget > 0, arch  # AuxK was on
    assert torch.equal(member.last_fired, ref.last_fired), arch
    assert member.opt.state[shard.W_enc]["exp_avg"].shape == (D, N // WORLD)  # local Adam
    # the trainer's resume, one state file per rank: crash after step 4's save, resume, finish
    state = tmp / arch / f"train_state.rank{dist.get_rank(group)}.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    saving = replace(cfg, checkpoint_every=4)
    crashed = SAETraining(
        ShardedSAE.from_sae(_unsharded(arch, seed), group), saving, NullLogger(), state
    )
    with pytest.raises(_Crash):
        train_many([crashed], _Batches(seed, crash_at=5))
    resumed = SAETraining(
        ShardedSAE.from_sae(_unsharded(arch, seed), group), saving, NullLogger(), state
    )
    assert resumed.first == 4
    train_many([resumed], _Batches(seed))
    for name, t in member.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], t), f"{arch} resumed {name}"
    gathered = gather_sae(shard)
    folder = tmp / arch
    save_sharded(shard, folder / "sharded", "fp32")
    if dist.get_rank(group) != 0:
        assert gathered is None
        assert (folder / "sharded" / "sae.safetensors").exists()  # save_sharded waited
        return
    assert type(gathered) is type(sae)
    for name, t in sae.state_dict().items():  # the weights (and θ) after 6 steps
        torch.testing.assert_close(gathered.state_dict()[name], t, rtol=1e-4, atol=1e-5)
    save_sae(sae, folder / "unsharded", "fp32")
    loaded, expected = load_sae(folder / "sharded"), load_sae(folder / "unsharded")
    cfgs = [json.loads((folder / f / "cfg.json").read_text()) for f in ("sharded", "unsharded")]
    assert cfgs[0] == cfgs[1]
    for name, t in expected.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], t, rtol=1e-4, atol=1e-5)
    x = next(_Batches(seed + 1).batches())
    torch.testing.assert_close(loaded(x), expected(x), rtol=1e-4, atol=1e-5)


def test_training_steps_and_gathered_checkpoint_match(ranks, tmp_path):
    """6 steps of the trainer (``SAETraining``, unchanged) on the sharded and the unsharded SAE
    of each arch, with a short dead window so that the budgeted AuxK is on: the same weights,
    θ and dead-latent counters; Adam state local to the shard; the checkpoint gathered on rank
    0 loads with ``load_sae``, equals the unsharded one and reconstructs as it does."""
    ranks.run(_check_training, tmp_path)


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


def test_make_sharded_sae(ranks, tmp_path):
    """A new sharded SAE is initialised as ``make_sae`` initialises one, each rank drawing its
    own rows (reproducibly); unsupported archs and indivisible sizes are refused."""
    ranks.run(_check_new, tmp_path)
