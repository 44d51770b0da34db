"""Activation cache throughput: capture, shard writing and loading, each against its own floor.

- capture: tokens/s of a cache build (forward to the site, compaction, cast, statistics,
  background shard writing) over a bare forward pass stopped at the same layer, same
  batches, same run. Goal: >= 0.95 of bare on a GPU, >= 0.90 on a CPU.
- write: bytes/s of ShardWriter (safetensors, checksum, fsync, rename, manifest) over a raw
  sequential write + fsync of the same bytes to the same disk. Goal: >= 0.8. The row
  statistics are handed in precomputed, as the capture kernel does in a build.
- read: rows/s of the shuffling loader over a raw read of the same shard files into one
  reused buffer (page cache warm for both after the warm-up round). Goal: >= 0.7.
  Unverified (``verify=False``); "read-verified" times the same first epoch with each
  shard's sha256 and finiteness checked on first map, over the unverified one. It is the
  cost of checking when the loader is the bottleneck; in training the checks run in the
  prefetch thread. Goal: >= 0.5.
- feed: rows/s of the loader as the trainer uses it (prefetch thread, pinned memory, on
  the device) over rows/s the TopK trainer consumes at d=768 (--d). Goal: > 1, on a GPU.

Each pair is timed alternately over ``--repeats`` rounds after a warm-up round; the table
shows median throughputs and the median per-round ratio.

Runs on the CPU or a GPU (``--device``); prints a table and appends to
bench/results/cache.jsonl.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import append_jsonl, environment, print_table

from flashsae.cache.build import build_cache, cache_settings
from flashsae.cache.hooks import capture
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.models.subjects import get_subject
from flashsae.cache.shards import ShardWriter
from flashsae.kernels.capture_kernels import row_stats
from flashsae.train.sae import SAEConfig
from flashsae.train.topk import TopKSAE
from flashsae.train.trainer import TrainConfig, train_sae
from flashsae.train.wandb_log import NullLogger

RESULTS = Path(__file__).parent / "results" / "cache.jsonl"


def paired(ours, baseline, repeats: int, reset=lambda: None) -> tuple[float, float, float]:
    """Median wall times (s) of ``ours`` and ``baseline`` and the median of their per-round
    ratio (baseline time / our time), over ``repeats`` rounds after a warm-up round. The two
    alternate, each round starting with the other one, so drift and after-effects on a noisy
    machine hit both alike; ``reset`` runs, untimed, before each."""
    rounds = []
    for i in range(repeats + 1):
        times = {}
        for fn in (ours, baseline) if i % 2 else (baseline, ours):
            reset()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[fn] = time.perf_counter() - start
        rounds.append((times[ours], times[baseline]))
    t_ours, t_base = (statistics.median(t[i] for t in rounds[1:]) for i in (0, 1))
    return t_ours, t_base, statistics.median(b / o for o, b in rounds[1:])


def bench_capture(args: argparse.Namespace, work: Path) -> dict:
    subject = get_subject(args.model, args.seq_len)
    site = args.site or subject.default_site
    model = subject.load(args.device)
    packed = subject.sequences("train", args.tokens, args.seq_len, seed=0)
    settings = cache_settings(subject, [site], None, args.tokens, args.seq_len, 0)
    batches = packed.tokens.split(args.batch_size)

    def bare() -> None:
        with torch.no_grad():
            for batch in batches:
                capture(model, batch.to(args.device), [site])

    def build() -> None:
        build_cache(model, packed, [site], work / "capture", settings, args.batch_size)

    def reset() -> None:
        shutil.rmtree(work / "capture", ignore_errors=True)

    t_build, t_bare, ratio = paired(build, bare, args.repeats, reset)
    tokens = packed.tokens.numel()
    return {
        "bench": "capture",
        "shape": f"{args.model} {site} d={subject.d_model} tokens={tokens} batch={args.batch_size}",
        "baseline": "bare forward to the site",
        "value": tokens / t_build,
        "unit": "tok/s",
        "baseline_value": tokens / t_bare,
        "ratio": ratio,
        "goal": 0.95 if args.device.startswith("cuda") else 0.90,
    }


def bench_write_read(args: argparse.Namespace, work: Path) -> list[dict]:
    rows, d = args.rows, args.d
    x = torch.randn(rows, d).to(torch.bfloat16)
    meta = {k: torch.arange(rows, dtype=torch.int32) for k in ("tokens", "doc", "pos", "seq")}
    settings = {"model": "bench", "sites": ["x"], "d": d, "dtype": "bfloat16"}

    chunks = [slice(i, i + 8192) for i in range(0, rows, 8192)]
    stats = [{"x": row_stats(x[c])} for c in chunks]

    def write() -> None:
        writer = ShardWriter(work / "cache", settings, args.shard_rows)
        for c, s in zip(chunks, stats, strict=True):
            writer.add({"x": x[c]}, {k: v[c] for k, v in meta.items()}, s)
        writer.finish()

    def reset() -> None:  # both write new files: neither pays for deleting the last ones
        shutil.rmtree(work / "cache", ignore_errors=True)
        for f in work.glob("raw-*"):
            f.unlink()

    reset()
    write()
    files = sorted((work / "cache").glob("shard-*.safetensors"))
    blobs = [f.read_bytes() for f in files]
    n_bytes = sum(len(b) for b in blobs)

    def raw_write() -> None:  # in 8 MiB writes, like a copy tool: one huge write is slower
        for i, blob in enumerate(blobs):
            with open(work / f"raw-{i}", "wb", buffering=0) as fh:
                view = memoryview(blob)
                for start in range(0, len(view), 2**23):
                    fh.write(view[start : start + 2**23])
                os.fsync(fh.fileno())

    t_write, t_raw_write, write_ratio = paired(write, raw_write, args.repeats, reset)
    write()  # the last reset deleted the cache that the read benchmark reads

    def read(verify: bool = False) -> None:
        loader = ActivationLoader(work / "cache", "x", 4096, device=args.device, verify=verify)
        for batch in loader.epoch_batches(0):
            batch.to(args.device)

    into = bytearray(max(len(b) for b in blobs))

    def raw_read() -> None:
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                fh.readinto(into)

    t_read, t_raw_read, read_ratio = paired(read, raw_read, args.repeats)
    t_checked, t_unchecked, checked_ratio = paired(lambda: read(True), read, args.repeats)
    shape = f"rows={rows} d={d} bf16 shard_rows={args.shard_rows} ({n_bytes / 2**20:.0f} MiB)"
    return [
        {
            "bench": "write",
            "shape": shape,
            "baseline": "raw sequential write (8 MiB writes) + fsync",
            "value": n_bytes / t_write / 2**20,
            "unit": "MiB/s",
            "baseline_value": n_bytes / t_raw_write / 2**20,
            "ratio": write_ratio,
            "goal": 0.8,
        },
        {
            "bench": "read",
            "shape": shape,
            "baseline": "raw read of the shard files into one reused buffer",
            "value": rows / t_read,
            "unit": "rows/s",
            "baseline_value": rows / t_raw_read,
            "ratio": read_ratio,
            "goal": 0.7,
        },
        {
            "bench": "read-verified",
            "shape": shape,
            "baseline": "the same first epoch unverified (--no-verify)",
            "value": rows / t_checked,
            "unit": "rows/s",
            "baseline_value": rows / t_unchecked,
            "ratio": checked_ratio,
            "goal": 0.5,
        },
    ]


class _OneBatch:
    """A stand-in loader that hands the trainer the same device batch forever."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def batches(self, start: int = 0):
        while True:
            yield self.x


def bench_feed(args: argparse.Namespace, work: Path) -> dict:
    """Rows/s the loader delivers on the device (prefetch thread, pinned memory) against
    rows/s the TopK trainer consumes at the same d (16·d latents, k 32, AuxK, batch 4096)."""
    d, batch, steps = args.d, 4096, args.feed_steps
    sae = TopKSAE(SAEConfig("topk", d, 16 * d, k=32, k_aux=512)).to(args.device)
    x = torch.randn(batch, d, device=args.device).to(torch.bfloat16)
    cfg = TrainConfig(tokens=(steps + 1) * batch, batch_size=batch, log_every=10**9)

    def train() -> None:
        train_sae(sae, _OneBatch(x), cfg, NullLogger())

    loader = ActivationLoader(work / "cache", "x", batch, device=args.device)

    def load() -> None:
        batches = loader.batches()
        for _ in range(steps + 1):
            next(batches)

    t_load, t_train, ratio = paired(load, train, max(1, args.repeats // 3))
    return {
        "bench": "feed",
        "shape": f"TopK d={d} n={16 * d} k=32 batch={batch}, {steps + 1} steps",
        "baseline": "rows/s the TopK trainer consumes",
        "value": (steps + 1) * batch / t_load,
        "unit": "rows/s",
        "baseline_value": (steps + 1) * batch / t_train,
        "ratio": ratio,
        "goal": 1.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="bytelm")
    p.add_argument("--site", default=None)
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows for the write/read benchmark")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--shard-rows", type=int, default=65536)
    p.add_argument(
        "--feed-steps", type=int, default=None, help="trainer steps timed (default 100, 3 on CPU)"
    )
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--dir", type=Path, default=None, help="scratch directory on the disk to test")
    p.add_argument(
        "--skip-capture", action="store_true", help="no capture row (needs no subject model)"
    )
    args = p.parse_args()
    if args.feed_steps is None:
        args.feed_steps = 100 if args.device.startswith("cuda") else 3
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        capture = [] if args.skip_capture else [bench_capture(args, work)]
        results = [*capture, *bench_write_read(args, work), bench_feed(args, work)]
    env = environment()
    for r in results:
        r.update(env)
    append_jsonl(RESULTS, results)
    print(f"device: {env['device']}")
    print_table(
        results,
        [
            ("bench", "bench", "s"),
            ("value", "flashsae", ",.0f"),
            ("baseline_value", "baseline", ",.0f"),
            ("unit", "unit", "s"),
            ("ratio", "ratio", ".3f"),
            ("goal", "goal", ".2f"),
            ("shape", "shape", "s"),
        ],
    )


if __name__ == "__main__":
    main()
