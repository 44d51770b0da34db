"""Sparsity/fidelity frontiers of the SAE architectures on the bundled model, at equal budgets.

Every run trains on the same cached activations (the bundled byte LM's default site, the same
shuffled order), for the same number of tokens, batch size and learning rate, with n latents,
then is evaluated as ``python -m flashsae.train`` does (held-out text, SAE spliced in):

  relu, gated, jumprelu,  λ swept (``--sparsity-coeff`` of the CLI)
  jumprelu_step
  topk, batchtopk         k swept
  matryoshka              k swept (fewer points)
  rescale_shift           each trained relu SAE, frozen, with only r_mag and b_mag trained
                          (``flashsae.train.gated.rescale_shift``) for another budget of tokens

Writes bench/results/arch_sweep.jsonl (one line per run: settings, metrics including γ, r_mag
quantiles for Gated SAEs, log10 θ quantiles for JumpReLU SAEs, time), arch_sweep.md (the
table) and arch_sweep.fvu.png / arch_sweep.ce.png (FVU and CE loss recovered against L0, one
frontier per architecture);
``--tag`` changes the stem, ``--arch`` and ``--param`` select runs, ``--adam-beta1`` and
``--jumprelu-bandwidth`` change one setting (diagnostics).
The bundled model and the activation cache are built on first use (as the CLI does) under
FLASHSAE_HOME.
"""

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import append_jsonl, environment

from flashsae.cache.loader import ActivationLoader
from flashsae.train import RunConfig
from flashsae.train.gated import GatedSAE, rescale_shift
from flashsae.train.jumprelu import JumpReLUSAE
from flashsae.train.metrics import METRIC_KEYS
from flashsae.train.pipeline import prepare, train_config
from flashsae.train.plots import frontier_plot
from flashsae.train.sae import SAE, SAE_CLASSES
from flashsae.train.trainer import train_sae
from flashsae.train.wandb_log import NullLogger

RESULTS = Path(__file__).parent / "results"
# λ for the penalized architectures, k for the TopK family, chosen before the sweep from one
# pilot run per λ architecture (ReLU λ = 2: L0 40, Gated λ = 2: L0 51, jumprelu_step λ = 0.2:
# L0 47; jumprelu λ = 0.03: L0 121 at 2M tokens in batches of 4096) to span L0 from about 10
# to 100
GRID = {
    "relu": [1.0, 2.0, 4.0, 8.0],
    "gated": [1.0, 2.0, 4.0, 8.0],
    "jumprelu": [0.03, 0.1, 0.3, 1.0],
    "jumprelu_step": [0.1, 0.2, 0.4, 0.8],
    "topk": [8, 16, 32, 64],
    "batchtopk": [8, 16, 32, 64],
    "matryoshka": [16, 64],
}


class Context:
    """What every run shares: model, site, cache, input scale, evaluation text, settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cfg = RunConfig(
            model=args.model, n_latents=args.n_latents, tokens=args.tokens,
            batch_size=args.batch_size, lr=args.lr, eval_tokens=args.eval_tokens,
            seq_len=args.seq_len, seed=args.seed, device="cpu",
        )  # fmt: skip
        self.data = prepare(cfg)
        self.site = self.data.cfg.site
        self.scale = self.data.input_scale

    def new_sae(self, arch: str, value: float) -> SAE:
        """A new SAE of ``arch`` with k (TopK family) or λ (the others) = ``value``."""
        topk = SAE_CLASSES[arch].default_sparsity_coeff is None
        cfg = replace(self.data.cfg, arch=arch)
        cfg = replace(cfg, k=int(value)) if topk else replace(cfg, sparsity_coeff=value)
        return self.data.new_sae(cfg)

    def train_and_evaluate(self, sae: SAE) -> dict:
        args, data = self.args, self.data
        if args.adam_beta1 is not None:
            sae.adam_betas = (args.adam_beta1, sae.adam_betas[1])
        if args.jumprelu_bandwidth is not None and isinstance(sae, JumpReLUSAE):
            sae.bandwidth = args.jumprelu_bandwidth
        loader = ActivationLoader(data.cache, self.site, args.batch_size, seed=args.seed)
        start = time.time()
        summary = train_sae(sae, loader, train_config(data.cfg, data.device), NullLogger())
        sae.eval()
        results, _ = data.evaluate(sae)  # on the run's evaluation data, separators not counted
        metrics = {k: results[k] for k in METRIC_KEYS} | summary
        return metrics | magnitude_stats(sae) | {"seconds": time.time() - start}


def magnitude_stats(sae: SAE) -> dict:
    """Quantiles over latents of, for Gated SAEs (rescale & shift included), the learned
    log-rescale r_mag and shift b_mag - b_gate of the magnitude path relative to the gate; for
    JumpReLU SAEs, log10 θ."""
    if isinstance(sae, JumpReLUSAE):
        stats = (("log10_theta", sae.threshold.log10()),)
    elif isinstance(sae, GatedSAE):
        stats = (("r_mag", sae.r_mag), ("shift", sae.b_mag - sae.b_gate))
    else:
        return {}
    probs = torch.tensor([0.1, 0.5, 0.9])
    out = {}
    for name, v in stats:
        for p, q in zip((10, 50, 90), v.detach().quantile(probs).tolist(), strict=True):
            out[f"{name}_p{p}"] = q
    return out


def run_one(ctx: Context, arch: str, value: float) -> tuple[dict, SAE]:
    torch.manual_seed(ctx.args.seed)
    sae = ctx.new_sae(arch, value)
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
    parser.add_argument(
        "--jumprelu-bandwidth", type=float, default=None,
        help="JumpReLU's pseudo-derivative bandwidth ε (default: the architecture's, 2 for "
        "jumprelu and 1e-3 for jumprelu_step)",
    )  # fmt: skip
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
        "adam_beta1": args.adam_beta1, "jumprelu_bandwidth": args.jumprelu_bandwidth,
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
