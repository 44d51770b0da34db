"""``python -m flashsae.cache {build,info,verify}``: build, describe and check activation caches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .build import build, cache_settings, check_sites
from .errors import UserError, report_errors
from .models.subjects import get_subject, pick_device
from .shards import DTYPES, check_shard, damaged_shards, read_manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashsae.cache", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="capture activations into a sharded cache (resumable)")
    b.add_argument("--model", default="bytelm", help="bytelm, bytelm-tiny, or a HF model id/path")
    b.add_argument("--sites", required=True, help="comma-separated, e.g. blocks.1.hook_resid_post")
    b.add_argument(
        "--text", default=None, help="file, directory, .jsonl or dataset (default: stdlib)"
    )
    b.add_argument("--text-field", default="text", help="the text field of .jsonl and datasets")
    b.add_argument("--tokens", type=int, required=True, help="tokens to capture (after BOS)")
    b.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, BOS included")
    b.add_argument("--out", type=Path, required=True, help="cache directory")
    b.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="storage dtype")
    b.add_argument("--shard-rows", type=int, default=65536, help="rows per shard")
    b.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    b.add_argument("--seed", type=int, default=0, help="seed of the sequence order")
    b.add_argument("--drop-tokens", default="", help="comma-separated token ids not to cache")
    b.add_argument(
        "--verify",
        action="store_true",
        help="on an existing cache, check every shard's checksum too (not just its size)",
    )
    for name, text in (
        ("info", "describe a cache"),
        ("verify", "recompute every checksum, look for NaN/inf"),
    ):
        sub.add_parser(name, help=text).add_argument("dir", type=Path)
    return p.parse_args(argv)


def run_build(args: argparse.Namespace) -> None:
    for flag in ("tokens", "shard_rows", "batch_size"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (BOS and one token), not {args.seq_len}")
    sites = [s.strip() for s in args.sites.split(",")]
    check_sites(sites)
    args.device = pick_device(args.device)
    subject = get_subject(args.model, args.seq_len)
    for site in sites:
        subject.check_site(site)
    try:
        drop = tuple(int(t) for t in args.drop_tokens.split(",") if t.strip())
    except ValueError as e:
        raise UserError(f"--drop-tokens must be comma-separated integers: {e}") from e
    settings = cache_settings(
        subject,
        sites,
        args.text,
        args.tokens,
        args.seq_len,
        args.seed,
        args.dtype,
        drop,
        text_field=args.text_field,
    )
    model = subject.load(args.device)
    manifest = build(
        subject, model, settings, args.out, args.batch_size, args.shard_rows, args.verify
    )
    print(f"{args.out}: {manifest['total_rows']} rows in {len(manifest['shards'])} shards")


def run_info(folder: Path) -> int:
    m = read_manifest(folder)
    s = m["settings"]
    size = sum(
        (folder / e["file"]).stat().st_size for e in m["shards"] if (folder / e["file"]).exists()
    )
    bad = damaged_shards(folder, m)
    if bad:
        state = f"DAMAGED: {len(bad)} of {len(m['shards'])} shards missing or bad; rerun build"
    else:
        state = "complete" if m["complete"] else "UNFINISHED: rerun build"
    print(f"cache      {folder} ({state})")
    for reason in bad.values():
        print(f"error: {reason}", file=sys.stderr)
    print(f"model      {s['model']}  sites {', '.join(s['sites'])}  d {s['d']}  dtype {s['dtype']}")
    print(f"text       {s.get('dataset')}  seq_len {s.get('seq_len')}  seed {s.get('seed')}")
    if "packing" in m:
        pk = m["packing"]
        start = f"{pk['start_token']} ({pk['start_token_id']})" if pk["start_token"] else "none"
        sep = pk["separator_token"]
        sep = f"{sep} ({pk['separator_token_id']})" if sep else "none"
        print(f"packing    start token {start}, separator {sep}; held out: {pk['held_out']}")
    print(f"rows       {m['total_rows']} in {len(m['shards'])} shards, {size / 2**20:.1f} MiB")
    for site in s["sites"]:
        st = m["stats"][site]
        count = max(st["count"], 1)
        mean_norm = torch.tensor(st["sum"]).div(count).norm().item()
        print(f"{site}: |mean| {mean_norm:.4g}, E||x||² {st['sum_sq_norm'] / count:.4g}")
    return 1 if bad else 0


def run_verify(folder: Path) -> int:
    m = read_manifest(folder)
    bad = []
    for entry in tqdm(m["shards"], desc="verifying", unit="shard"):
        try:
            check_shard(folder, entry, m["settings"]["sites"], verify=True)
        except UserError as e:
            bad.append(str(e))
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    if not m["complete"]:
        print(f"error: {folder} is unfinished; rerun the build to complete it", file=sys.stderr)
    ok = not bad and m["complete"]
    print(json.dumps({"shards": len(m["shards"]), "bad": len(bad), "complete": m["complete"]}))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commands = {
        "build": lambda: run_build(args),
        "info": lambda: run_info(args.dir),
        "verify": lambda: run_verify(args.dir),
    }
    return report_errors(commands[args.command])


if __name__ == "__main__":
    sys.exit(main())
