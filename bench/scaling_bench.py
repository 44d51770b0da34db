"""Data-parallel scaling and the sweep's cost, on one activation cache.

- scaling: training tokens/s of one TopK SAE on 1, 2, ... processes (``--nproc``, each count
  launched with ``torchrun --standalone``; gloo on the CPU, NCCL with ``--device cuda``, one GPU
  per process), the global batch fixed, so every count trains the same SAE: the table shows
  the relative weight difference from the first count (fp32 rounding: about 1e-7). Floor:
  perfect scaling, tokens/s of one process x processes. On this 2-core CPU it is a correctness
  figure, not a speed one.
- sweep: the wall time of an 8-SAE sweep from one loader pass (``trainer.train_many``) against
  the sum of 8 separate runs over the same cache, and against the floor, the SAE steps alone
  (each SAE trained on batches already in memory). Goal: sweep <= floor + 5% (loading hidden,
  and the batch shared), i.e. separate / sweep at least what hiding the load gives.

The cache is ``--cache`` (with ``--site``), or a random one of ``--rows`` x ``--d-model``
written to a temporary directory. On the CPU every process uses ``OMP_NUM_THREADS`` threads
(default 1: two intra-op threads on a loaded 2-core machine made the same steps several times
slower, and erratically). Prints tables; appends JSON lines to bench/results/scaling.jsonl.

    python bench/scaling_bench.py                                   # this CPU
    python bench/scaling_bench.py --device cuda --nproc 1,2,4,8 --d-model 768 --n-latents 24576 \\
        --batch-size 4096 --steps 200 --rows 1000000               # a multi-GPU box
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import append_jsonl, environment, print_table
from safetensors.torch import load_file, save_file

from flashsae.cache.loader import ActivationLoader
from flashsae.cache.shards import ShardWriter, open_cache, site_stats
from flashsae.train import distributed
from flashsae.train.sae import make_sae
from flashsae.train.trainer import SAETraining, TrainConfig, train_many
from flashsae.train.wandb_log import NullLogger

RESULTS = Path(__file__).parent / "results" / "scaling.jsonl"
SITE = "blocks.0.hook_resid_post"
SWEEP = [("topk", k) for k in (8, 16, 32, 64)] + [("batchtopk", k) for k in (8, 16, 32, 64)]


def random_cache(folder: Path, rows: int, d: int) -> Path:
    """A finished cache of ``rows`` random rows (with a mean and a few strong directions)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(16, d, generator=gen)
    w = ShardWriter(folder, {"model": "random", "model_key": "random", "sites": [SITE], "d": d,
                             "dtype": "float32"}, 65536)  # fmt: skip
    for start in range(0, rows, 65536):
        n = min(65536, rows - start)
        x = torch.randn(n, d, generator=gen) + torch.randn(n, 16, generator=gen) @ basis + 0.5
        i = torch.arange(start, start + n)
        w.add({SITE: x}, {"tokens": i, "doc": i, "pos": i, "seq": i})
    w.finish()
    return folder


def new_member(args: argparse.Namespace, cache: Path, arch: str, k: int, steps: int,
               device: str) -> SAETraining:  # fmt: skip
    """A fresh SAE (seed 0) and its loop state for ``steps`` steps of the global batch."""
    mean, mean_sq_norm = site_stats(open_cache(cache, args.site), args.site)
    torch.manual_seed(0)
    sae = make_sae(arch, args.n_latents, mean, mean_sq_norm, k=k).to(device)
    cfg = TrainConfig(tokens=steps * args.batch_size, batch_size=args.batch_size,
                      log_every=10**9, dtype=args.dtype)  # fmt: skip
    return SAETraining(sae, cfg, NullLogger())


def loader(args: argparse.Namespace, cache: Path, device: str) -> ActivationLoader:
    world = distributed.world_size()
    return ActivationLoader(cache, args.site, args.batch_size // world, device=device,
                            rank=distributed.rank(), world_size=world, verify=False)  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """One rank of the scaling run: warm up, time ``--steps`` steps; rank 0 writes the result."""
    base = "cuda" if args.device == "cuda" else "cpu"
    with distributed.started(base):
        device = distributed.rank_device(base)
        cache = Path(args.cache)
        train_many([new_member(args, cache, "topk", 32, 3, device)], loader(args, cache, device))
        member = new_member(args, cache, "topk", 32, args.steps, device)
        sync(device)
        start = time.perf_counter()
        train_many([member], loader(args, cache, device))
        sync(device)
        seconds = time.perf_counter() - start
        if distributed.is_main():
            save_file({k: v.contiguous().cpu() for k, v in member.sae.state_dict().items()},
                      args.result + ".safetensors")  # fmt: skip
            Path(args.result).write_text(json.dumps({"seconds": seconds}))
        distributed.share(None)  # the others wait for rank 0's write


def scaling(args: argparse.Namespace, cache: Path, tmp: Path, env: dict) -> list[dict]:
    rows, first = [], None
    for n in [int(v) for v in args.nproc.split(",")]:
        result = tmp / f"scaling-{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", __file__, "--worker", "--result", str(result),
               "--cache", str(cache), *args.passthrough]  # fmt: skip
        threads = {"OMP_NUM_THREADS": str(env["threads_per_process"])}
        subprocess.run(cmd, check=True, env={**os.environ, **threads})
        seconds = json.loads(result.read_text())["seconds"]
        weights = load_file(str(result) + ".safetensors")
        first = first or (seconds, weights)
        diff = max(float((weights[k] - first[1][k]).norm() / first[1][k].norm().clamp_min(1e-30))
                   for k in weights)  # fmt: skip
        tokens_per_s = args.steps * args.batch_size / seconds
        rows.append({**env, "bench": "scaling", "device_kind": args.device, "processes": n,
                     "shape": f"d={args.d_model} n={args.n_latents} B={args.batch_size}",
                     "steps": args.steps, "seconds": seconds, "tokens_per_s": tokens_per_s,
                     "speedup": first[0] / seconds, "floor_speedup": n,
                     "measured_over_floor": first[0] / seconds / n,
                     "weight_rel_diff": diff})  # fmt: skip
    return rows


class InMemory:
    """Batches already on the device: the SAE steps with no loading at all."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.list = batches

    def batches(self, start: int = 0):  # noqa: ANN201 - an iterator of batches
        return iter(self.list[start:])


def timed(members: list[SAETraining], source: object, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of training ``members``."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    train_many(members, source)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def sweep(args: argparse.Namespace, cache: Path, env: dict) -> dict:
    """Per member, its steps alone and its separate run, timed alternately (so that the load of
    a shared machine hits both alike); then the sweep of all of them."""
    device = args.device
    for arch, k in SWEEP[:: len(SWEEP) // 2]:  # warm-up (kernel compiles on a GPU)
        timed([new_member(args, cache, arch, k, 2, device)], loader(args, cache, device), device)
    batches = list(itertools.islice(loader(args, cache, device).batches(), args.steps))
    floor = separate = (0.0, 0.0)
    for i, (a, k) in enumerate(SWEEP):
        pair = {
            "floor": lambda a=a, k=k: timed([new_member(args, cache, a, k, args.steps, device)],
                                            InMemory(batches), device),
            "separate": lambda a=a, k=k: timed([new_member(args, cache, a, k, args.steps, device)],
                                               loader(args, cache, device), device),
        }  # fmt: skip
        times = {name: pair[name]() for name in (("floor", "separate")[:: 1 if i % 2 else -1])}
        floor = tuple(map(sum, zip(floor, times["floor"], strict=True)))
        separate = tuple(map(sum, zip(separate, times["separate"], strict=True)))
    members = [new_member(args, cache, a, k, args.steps, device) for a, k in SWEEP]
    together = timed(members, loader(args, cache, device), device)
    row = {**env, "bench": "sweep", "device_kind": device, "members": len(SWEEP),
           "shape": f"d={args.d_model} n={args.n_latents} B={args.batch_size}",
           "steps": args.steps}  # fmt: skip
    for j, clock in enumerate(("wall", "cpu")):
        row |= {f"floor_{clock}_s": floor[j], f"separate_{clock}_s": separate[j],
                f"sweep_{clock}_s": together[j],
                f"sweep_over_floor_{clock}": together[j] / floor[j],
                f"separate_over_sweep_{clock}": separate[j] / together[j]}  # fmt: skip
    # the goal, on the clock that the machine's other work disturbs least: CPU time on a CPU
    clock = "cpu" if device == "cpu" else "wall"
    return row | {"goal_clock": clock, "goal_met": row[f"sweep_over_floor_{clock}"] <= 1.05}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", default="1,2", help="process counts to compare (comma list)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-latents", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=1024, help="the global batch")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--cache", default=None, help="an existing cache (default: a random one)")
    p.add_argument("--site", default=SITE)
    p.add_argument("--only", choices=["scaling", "sweep"], default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("scaling_bench.py: unset TRITON_INTERPRET; interpreted timings mean nothing.")
    args.passthrough = [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in ("device", "d-model", "n-latents", "batch-size", "steps", "dtype", "site")
    ]
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    if args.device == "cpu":
        torch.set_num_threads(threads)
    env = environment() | {"threads_per_process": threads}
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = (
            Path(args.cache)
            if args.cache
            else random_cache(Path(tmp) / "c", args.rows, args.d_model)
        )
        records = []
        if args.only in (None, "scaling"):
            rows = scaling(args, cache, Path(tmp), env)
            records += rows
            print("\ndata parallel: one TopK SAE (k=32), the same global batch on every count")
            print_table(rows, [("processes", "procs", "d"), ("shape", "shape", "s"),
                               ("tokens_per_s", "tokens/s", ",.0f"), ("speedup", "speedup", ".2f"),
                               ("measured_over_floor", "/floor", ".2f"),
                               ("weight_rel_diff", "weights vs first", ".1e")])  # fmt: skip
        if args.only in (None, "sweep"):
            row = sweep(args, cache, env)
            records.append(row)
            print(f"\nsweep of {len(SWEEP)} SAEs (TopK and BatchTopK, k = 8..64), one process")
            table = [
                {
                    "shape": row["shape"],
                    "clock": c,
                    "floor": row[f"floor_{c}_s"],
                    "separate": row[f"separate_{c}_s"],
                    "sweep": row[f"sweep_{c}_s"],
                    "ratio": row[f"sweep_over_floor_{c}"],
                    "speedup": row[f"separate_over_sweep_{c}"],
                }
                for c in ("wall", "cpu")
            ]
            print_table(table, [("shape", "shape", "s"), ("clock", "clock", "s"),
                                ("floor", "steps alone s", ".2f"), ("separate", "8 runs s", ".2f"),
                                ("sweep", "sweep s", ".2f"), ("ratio", "sweep/floor", ".3f"),
                                ("speedup", "runs/sweep", ".2f")])  # fmt: skip
            print(f"goal sweep <= 1.05 x floor ({row['goal_clock']} time): "
                  f"{'met' if row['goal_met'] else 'NOT met'}")  # fmt: skip
    append_jsonl(RESULTS, records)


if __name__ == "__main__":
    main()
