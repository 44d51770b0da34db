"""``python -m flashsae.train``: capture activations, train an SAE, evaluate it, log to W&B.

Pipeline: subject model (trained on first use if bundled) -> activation cache
(built or reused) -> SAE training -> held-out evaluation with the SAE spliced in
-> ``sae.safetensors`` + ``cfg.json`` + ``metrics.json`` in the run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from flashsae.cache.build import build, cache_settings, default_cache_dir
from flashsae.cache.errors import UserError, report_errors
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.models.subjects import Subject, get_subject, pick_device
from flashsae.cache.shards import open_cache, site_stats

from .checkpoint import SAE_CLASSES, save_sae
from .eval import evaluate
from .metrics import METRIC_KEYS
from .plots import density_histogram
from .sae import SAEConfig
from .trainer import TrainConfig, train_sae
from .wandb_log import RunLogger


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flashsae.train",
        description="Capture activations, train a sparse autoencoder, evaluate it, log to W&B.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="bytelm",
        help="bytelm, bytelm-tiny, or a Hugging Face model id or path (extra hf)",
    )
    p.add_argument(
        "--site", default=None, help="e.g. blocks.1.hook_resid_post (default: middle layer)"
    )
    p.add_argument("--arch", default="topk", choices=list(SAE_CLASSES), help="SAE architecture")
    p.add_argument(
        "--n-latents", type=int, default=None, help="dictionary size (default 16 x d_model)"
    )
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--tokens", type=int, default=2_000_000, help="training tokens")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per SAE step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--sparsity-coeff",
        type=float,
        default=0.0,
        help="λ of the L1/L0 penalty; 0: the arch's default (relu 2, gated 2, jumprelu 0.2)",
    )
    p.add_argument("--cache", type=Path, default=None, help="existing activation cache directory")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<name>)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and SAE init")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per captured sequence")
    p.add_argument(
        "--text", default=None, help="text file, directory, .jsonl or dataset (default: stdlib)"
    )
    p.add_argument("--text-field", default="text", help="the text field of .jsonl and datasets")
    p.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens to evaluate on")
    p.add_argument("--dead-window", type=int, default=10_000_000, help="AuxK dead-latent window")
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between resumable saves"
    )
    p.add_argument("--resume", type=Path, default=None, help="continue the unfinished run in DIR")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for flag in ("tokens", "batch_size", "k", "eval_tokens", "seq_len"):
        if getattr(args, flag) <= 0:
            raise UserError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    if args.n_latents is not None and args.k > args.n_latents:
        raise UserError(f"--k {args.k} is larger than --n-latents {args.n_latents}")
    if args.tokens < args.batch_size:
        raise UserError(
            f"--tokens {args.tokens} is less than one batch (--batch-size {args.batch_size})"
        )
    if args.seq_len < 2:
        raise UserError("--seq-len must be at least 2 (BOS plus one token)")


def resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments of the run being resumed (from its ``config.json``)."""
    folder = args.resume
    if not (folder / "train_state.pt").exists():
        raise UserError(f"{folder} has no train_state.pt to resume from")
    saved = json.loads((folder / "config.json").read_text())
    saved = {k: Path(v) if k in ("cache", "out") and v else v for k, v in saved.items()}
    return argparse.Namespace(**{**vars(args), **saved, "resume": folder, "out": folder})


def prepare_cache(
    args: argparse.Namespace, subject: Subject, model: torch.nn.Module, site: str
) -> tuple[Path, dict]:
    """The cache to train on: ``--cache``, or one built (or reused) for these settings."""
    if args.cache is None:
        settings = cache_settings(
            subject,
            [site],
            args.text,
            args.tokens,
            args.seq_len,
            args.seed,
            text_field=args.text_field,
        )
        cache = default_cache_dir(settings)
        print(f"activation cache: {cache}")
        return cache, build(subject, model, settings, cache)
    if not args.cache.exists():
        raise UserError(f"--cache {args.cache} does not exist; omit --cache to build one")
    manifest = open_cache(args.cache, site)
    if manifest["settings"]["d"] != subject.d_model:
        raise UserError(
            f"{args.cache} holds d={manifest['settings']['d']} activations; "
            f"{args.model} has d_model={subject.d_model}"
        )
    return args.cache, manifest


def run(args: argparse.Namespace) -> dict:
    if args.resume is not None:
        args = resumed_args(args)
    check_args(args)
    device = pick_device(args.device)
    subject = get_subject(args.model, args.seq_len)
    site = args.site or subject.default_site
    subject.check_site(site)
    n_latents = args.n_latents or 16 * subject.d_model
    if args.k > n_latents:
        raise UserError(f"--k {args.k} is larger than the {n_latents} latents")
    name = f"{args.arch}-{args.model}-{site}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = args.out or Path("runs") / name.replace("/", "_")
    if (out / "metrics.json").exists():
        raise UserError(f"{out} already holds a finished run; choose another --out")
    if args.resume is None and (out / "train_state.pt").exists():
        raise UserError(f"{out} holds an unfinished run; continue it with --resume {out}")
    torch.manual_seed(args.seed)

    model = subject.load(device)
    cache, manifest = prepare_cache(args, subject, model, site)
    mean, mean_sq_norm = site_stats(manifest, site)
    scale = math.sqrt(subject.d_model / mean_sq_norm)  # so that E||x||² = d
    sae_cfg = SAEConfig(
        arch=args.arch,
        d=subject.d_model,
        n_latents=n_latents,
        k=args.k,
        k_aux=subject.d_model // 2,
        sparsity_coeff=args.sparsity_coeff,
        site=site,
        model=args.model,
        input_scale=scale,
    )
    sae = SAE_CLASSES[args.arch](sae_cfg).to(device)
    sae.init_b_dec((mean * scale).float().to(device))
    train_cfg = TrainConfig(
        tokens=args.tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        dead_window=args.dead_window,
        checkpoint_every=args.checkpoint_every,
    )

    out.mkdir(parents=True, exist_ok=True)
    config = {**vars(args), "site": site, "n_latents": n_latents, "cache": cache, "out": out}
    config = {k: str(v) if isinstance(v, Path) else v for k, v in config.items() if k != "resume"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    logger = RunLogger(out, config, name)
    loader = ActivationLoader(cache, site, args.batch_size, seed=args.seed, device=device)
    summary = train_sae(sae, loader, train_cfg, logger, out / "train_state.pt")

    sae.eval()
    eval_seqs = subject.sequences("val", args.eval_tokens, args.seq_len, args.seed).tokens
    results, freqs = evaluate(sae, model, eval_seqs)
    metrics = {k: results[k] for k in METRIC_KEYS} | summary
    save_sae(sae, out)
    density_histogram(freqs, out / "density.png")
    (out / "metrics.json.tmp").write_text(json.dumps(metrics, indent=2))
    (out / "metrics.json.tmp").replace(out / "metrics.json")
    step = summary["tokens"]
    logger.log({f"metrics/{k}": v for k, v in results.items()}, step=step)
    logger.log_histogram("sparsity/log10_firing_freq", freqs.clamp_min(1e-10).log10().numpy(), step)
    logger.summary(metrics)
    files = [out / "sae.safetensors", out / "cfg.json", out / "metrics.json"]
    logger.log_artifact(f"sae-{args.arch}", files)
    logger.finish()
    print(json.dumps(metrics, indent=2))
    print(f"run saved to {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
