"""Sparsity/fidelity frontiers of the SAE architectures on the bundled model, at equal budgets.

Every run trains on the same cached activations (the bundled byte LM's default site, the same
shuffled order), for the same number of tokens, batch size and learning rate, with n latents,
then is evaluated as ``python -m flashsae.train`` does (held-out text, SAE spliced in):

  relu, gated, jumprelu   λ swept (``--sparsity-coeff`` of the CLI)
  topk, batchtopk         k swept
  matryoshka              k swept (fewer points)
  rescale_shift           each trained relu SAE, frozen, with only r_mag and b_mag trained
                          (``flashsae.train.gated.rescale_shift``) for another budget of tokens

Writes bench/results/arch_sweep.jsonl (one line per run: settings, metrics including γ, r_mag
quantiles for Gated SAEs, time), arch_sweep.md (the table) and arch_sweep.fvu.png /
arch_sweep.ce.png (FVU and CE loss recovered against L0, one frontier per architecture);
``--tag`` changes the stem, ``--arch`` and ``--param`` select runs (diagnostics).
The bundled model and the activation cache are built on first use (as the CLI does) under
FLASHSAE_HOME.
"""

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from common import append_jsonl, environment

from flashsae.cache.build import build, cache_settings, default_cache_dir
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.models.subjects import get_subject
from flashsae.cache.shards import site_stats
from flashsae.train.checkpoint import SAE_CLASSES
from flashsae.train.eval import evaluate
from flashsae.train.gated import GatedSAE, rescale_shift
from flashsae.train.metrics import METRIC_KEYS
from flashsae.train.plots import frontier_plot
from flashsae.train.sae import SAE, SAEConfig
from flashsae.train.trainer import TrainConfig, train_sae

RESULTS = Path(__file__).parent / "results"
# λ for the penalized architectures, k for the TopK family, chosen before the sweep from one
# pilot run per λ architecture (ReLU λ = 2: L0 40, Gated λ = 2: L0 51, JumpReLU λ = 0.2: L0 47)
# to span L0 from about 10 to 100
GRID = {
    "relu": [1.0, 2.0, 4.0, 8.0],
    "gated": [1.0, 2.0, 4.0, 8.0],
    "jumprelu": [0.1, 0.2, 0.4, 0.8],
    "topk": [8, 16, 32, 64],
    "batchtopk": [8, 16, 32, 64],
    "matryoshka": [16, 64],
}


class _NoLog:
    """train_sae's logger, discarding the records (the sweep keeps only final metrics)."""

    def log(self, record: dict, step: int) -> None:
        pass


class Context:
    """What every run shares: model, site, cache, input scale, evaluation text, settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.subject = get_subject(args.model, args.seq_len)
        self.site = self.subject.default_site
        self.model = self.subject.load("cpu")
        settings = cache_settings(
            self.subject, [self.site], None, args.tokens, args.seq_len, args.seed
        )
        self.cache = default_cache_dir(settings)
        manifest = build(self.subject, self.model, settings, self.cache)
        mean, mean_sq_norm = site_stats(manifest, self.site)
        self.scale = math.sqrt(self.subject.d_model / mean_sq_norm)  # E||x||² = d
        self.mean = mean.float() * self.scale
        self.eval_seqs = self.subject.sequences(
            "val", args.eval_tokens, args.seq_len, args.seed
        ).tokens

    def config(self, arch: str, value: float) -> SAEConfig:
        d = self.subject.d_model
        topk = arch in ("topk", "batchtopk", "matryoshka")
        return SAEConfig(
            arch=arch, d=d, n_latents=self.args.n_latents, k=int(value) if topk else 0,
            k_aux=d // 2 if topk else 0, sparsity_coeff=0.0 if topk else value,
            site=self.site, model=self.args.model, input_scale=self.scale,
        )  # fmt: skip

    def train_and_evaluate(self, sae: SAE) -> dict:
        args = self.args
        if args.adam_beta1 is not None:
            sae.adam_betas = (args.adam_beta1, sae.adam_betas[1])
        cfg = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, lr=args.lr)
        loader = ActivationLoader(self.cache, self.site, args.batch_size, seed=args.seed)
        start = time.time()
        summary = train_sae(sae, loader, cfg, _NoLog())
        sae.eval()
        results, _ = evaluate(sae, self.model, self.eval_seqs)
        metrics = {k: results[k] for k in METRIC_KEYS} | summary
        return metrics | magnitude_stats(sae) | {"seconds": time.time() - start}


def magnitude_stats(sae: SAE) -> dict:
    """For Gated SAEs (rescale & shift included): quantiles over latents of the learned
    log-rescale r_mag and shift b_mag - b_gate of the magnitude path relative to the gate."""
    if not isinstance(sae, GatedSAE):
        return {}
    probs = torch.tensor([0.1, 0.5, 0.9])
    out = {}
    for name, v in (("r_mag", sae.r_mag), ("shift", sae.b_mag - sae.b_gate)):
        for p, q in zip((10, 50, 90), v.detach().quantile(probs).tolist(), strict=True):
            out[f"{name}_p{p}"] = q
    return out


def run_one(ctx: Context, arch: str, value: float) -> tuple[dict, SAE]:
    torch.manual_seed(ctx.args.seed)
    sae = SAE_CLASSES[arch](ctx.config(arch, value))
    sae.init_b_dec(ctx.mean)
    return ctx.train_and_evaluate(sae), sae


def markdown(records: list[dict], command: str) -> str:
    head = records[0]
    lines = [
        "# Architecture sweep: sparsity/fidelity frontiers on the bundled model",
        "",
        f"Command: `{command}`  ",
        f"Device: {head['device']}, torch {head['torch']}, commit {head['commit']}  ",
        f"Model {head['model']}, site {head['site']}, n = {head['n_latents']} latents, "
        f"{head['tokens']:,} training tokens per run, batch {head['batch_size']}, "
        f"lr {head['lr']}; evaluated on {head['eval_tokens']:,} held-out tokens.",
        "",
        "| arch | λ or k | L0 | FVU | CE loss recovered | γ | dead | dense | train+eval s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["arch"], r["param"])):
        lines.append(
            f"| {r['arch']} | {r['param']:g} | {r['l0']:.1f} | {r['fvu']:.4f} | "
            f"{r['ce_loss_recovered']:.4f} | {r['gamma']:.4f} | {r['dead_frac']:.3f} | "
            f"{r['dense_frac']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bytelm", help="bundled subject model")
    parser.add_argument("--n-latents", type=int, default=2048, help="latents per SAE")
    parser.add_argument("--tokens", type=int, default=2**20, help="training tokens per run")
    parser.add_argument(
        "--batch-size", type=int, default=1024, help="tokens per step (1024 steps of 1M tokens)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (all runs)")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0, help="data order and SAE init")
    parser.add_argument(
        "--arch", action="append", choices=[*GRID, "rescale_shift"], help="default: all"
    )
    parser.add_argument(
        "--param", type=float, action="append", help="λ or k for every --arch (default: GRID)"
    )
    parser.add_argument(
        "--adam-beta1", type=float, default=None, help="override every architecture's Adam β1"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--tag", default="arch_sweep", help="stem of the result files")
    args = parser.parse_args()
    archs = args.arch or [*GRID, "rescale_shift"]
    command = shlex.join(["python", "bench/arch_sweep.py", *sys.argv[1:]])

    ctx = Context(args)
    env = environment()
    meta = {
        **env, "model": args.model, "site": ctx.site, "n_latents": args.n_latents,
        "tokens": args.tokens, "batch_size": args.batch_size, "lr": args.lr,
        "eval_tokens": args.eval_tokens, "seed": args.seed, "input_scale": ctx.scale,
        "adam_beta1": args.adam_beta1,
    }  # fmt: skip
    records = []
    for arch, values in GRID.items():
        for value in args.param or values:
            if arch not in archs and not (arch == "relu" and "rescale_shift" in archs):
                continue
            metrics, sae = run_one(ctx, arch, value)
            runs = [(arch, metrics)] if arch in archs else []
            if arch == "relu" and "rescale_shift" in archs:
                rs = rescale_shift(sae)
                runs.append(("rescale_shift", ctx.train_and_evaluate(rs)))
            for name, m in runs:
                record = {"bench": "arch_sweep", **meta, "arch": name, "param": value, **m}
                append_jsonl(args.out / f"{args.tag}.jsonl", [record])
                records.append(record)
                print(json.dumps({k: record[k] for k in ("arch", "param", "l0", "fvu", "gamma")}))
    stem = args.out / args.tag
    stem.with_suffix(".md").write_text(markdown(records, command))
    frontier_plot(records, stem.with_suffix(".fvu.png"), x="l0", y="fvu")
    frontier_plot(records, stem.with_suffix(".ce.png"), x="l0", y="ce_loss_recovered")
    print(f"wrote {stem}.{{jsonl,md,fvu.png,ce.png}}")


if __name__ == "__main__":
    main()
