"""Evaluate an SAE on held-out activations and spliced back into its model at its site.

``python -m flashsae.train.eval RUN_DIR [--cache DIR] [--model M] [--tokens N]
[--eval-batch-size B]`` writes
``eval.json`` (the keys of ``metrics.json``), ``eval.md``, ``density.png`` and, for
all runs beside RUN_DIR, ``frontier_fvu.png`` and ``frontier_ce.png`` in the parent
folder; it logs them to the run's W&B entry when there is one.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashsae.cache.errors import UserError, report_errors
from flashsae.cache.hooks import SitePoint, capture, enclosing_block, resolve_site, splice
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.locks import exclusive_lock
from flashsae.cache.models.bytelm import ByteLM
from flashsae.cache.models.hf_layouts import hf_layout
from flashsae.cache.models.subjects import Subject, get_subject, no_lm_reason, pick_device

from .checkpoint import load_sae
from .files import write_output
from .metrics import LM_KEYS, METRIC_KEYS, ReconstructionStats, SpliceStats, metric_warnings
from .sae import SAE


def _replace_after(skip_first: int, new: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h`` ``[B, T, d]`` with positions from ``skip_first`` on replaced by rows of ``new``."""
    h = h.clone()
    h[:, skip_first:] = new.reshape(h[:, skip_first:].shape).to(h.dtype)
    return h


def logits_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[B, T, V]`` from a bundled model or a Hugging Face model (without
    its KV cache)."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        return model(tokens, use_cache=False).logits
    out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def reconstruct(sae: SAE, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, x̂) for raw activations, through the SAE's input scale."""
    s = sae.cfg.input_scale
    f = sae.encode(x_raw.float() * s)
    return f, sae.decode(f) / s


BRANCHES = ("clean", "sae", "zero")  # the rows of a branched batch, in order
# the residual-stream sites of the bundled model: the whole stream passes through them
_BYTELM_STREAM = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")


@dataclass
class BranchPlan:
    """How one forward evaluates the three branches of a batch of B sequences: the layers
    before the site run once on B rows; at the site (``point``), the batch becomes 3B rows
    [h; h with x̂ spliced in; h with zeros spliced in], and the model runs on from there. The
    blocks of ``tiled`` get their other batch-sized arguments (attention masks, position ids:
    tensors of two or more dims whose leading size is B) tiled to 3B; so does the hidden state
    of the first of them, when the site lies inside it (attn_out, mlp_out, resid_mid of a Hugging
    Face block): that block then runs whole on 3B rows, and the site sees the three copies."""

    point: SitePoint
    tiled: list[torch.nn.Module]


def branch_plan(model: torch.nn.Module, site: str) -> BranchPlan | None:
    """The ``BranchPlan`` of ``site``, or None when its branches need separate forwards: the
    model is neither the bundled one nor of a family of ``hf_layouts.LAYOUTS`` (whose blocks'
    arguments the tests check), or the site is outside every block."""
    if not (isinstance(model, ByteLM) or hf_layout(model) is not None):
        return None
    point = resolve_site(model, site)
    found = enclosing_block(model, point.rows_of or point.module)
    if found is None:
        return None
    blocks, i = found
    on_stream = (point.module is blocks[i] and point.kind == "output") or (
        isinstance(model, ByteLM) and site.rsplit(".", 1)[-1] in _BYTELM_STREAM
    )
    return BranchPlan(point, list(blocks)[i + 1 if on_stream else i :])


def _tile(b: int, value: object) -> object:
    """``value`` with each tensor of two or more dims and leading size ``b`` repeated three
    times along dim 0 (inside plain tuples and lists too)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == b:
        return value.repeat(len(BRANCHES), *[1] * (value.ndim - 1))
    if type(value) in (tuple, list):
        return type(value)(_tile(b, v) for v in value)
    return value


def _branched(
    model: torch.nn.Module, plan: BranchPlan, sae: SAE, batch: torch.Tensor, skip_first: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x_raw, f, x̂, {branch: logits [B, T, V]}) of ``batch`` from one ``plan`` forward."""
    b = batch.shape[0]
    seen: dict[str, torch.Tensor] = {}

    def at_site(h: torch.Tensor) -> torch.Tensor:
        h = h.repeat(len(BRANCHES), *[1] * (h.ndim - 1)) if h.shape[0] == b else h.clone()
        x_raw = h[:b, skip_first:].reshape(-1, h.shape[-1]).float()
        seen["f"], seen["x_hat"] = reconstruct(sae, x_raw)
        seen["x_raw"] = x_raw
        h[b : 2 * b, skip_first:] = seen["x_hat"].reshape(h[:b, skip_first:].shape).to(h.dtype)
        h[2 * b :, skip_first:] = 0
        return h

    def tile_args(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _tile(b, args), {k: _tile(b, v) for k, v in kwargs.items()}

    # the tiling hooks first: a site at a block's input, or with the block's rows (OPT's MLP),
    # must see the tiled batch
    handles = [m.register_forward_pre_hook(tile_args, with_kwargs=True) for m in plan.tiled]
    handles.append(plan.point.hook(at_site))
    try:
        logits = logits_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    if logits.shape[0] != len(BRANCHES) * b:
        raise RuntimeError(f"the branched forward gave {logits.shape[0]} rows, not {3 * b}")
    return (
        seen["x_raw"],
        seen["f"],
        seen["x_hat"],
        dict(zip(BRANCHES, logits.split(b), strict=True)),
    )


def _separate(
    model: torch.nn.Module, site: str, sae: SAE, batch: torch.Tensor, skip_first: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """As ``_branched``, from three forwards: the clean one captures the site's activations."""
    seen: list[torch.Tensor] = []
    with splice(model, site, seen.append):
        logits = {"clean": logits_of(model, batch)}
    h = seen[0]
    x_raw = h[:, skip_first:].reshape(-1, h.shape[-1]).float()
    f, x_hat = reconstruct(sae, x_raw)
    for name, new in (("sae", x_hat), ("zero", torch.zeros_like(x_hat))):
        with splice(model, site, partial(_replace_after, skip_first, new)):
            logits[name] = logits_of(model, batch)
    return x_raw, f, x_hat, logits


@torch.no_grad()
def evaluate(
    sae: SAE,
    model: torch.nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 32,
    skip_first: int = 1,
    metric_scale: float | None = None,
    cache_batches: Iterable[torch.Tensor] | None = None,
    batched: bool | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Every metric of ``metrics.py``, and the latents' firing frequencies.

    Reconstruction metrics use the activations at the SAE's site for ``sequences``
    (or ``cache_batches`` of cached rows when given), multiplied by ``metric_scale``
    (default: the SAE's input scale), i.e. in the run's normalized units. The language
    model metrics splice x̂ (and zeros) in at the site. The first ``skip_first``
    positions (BOS) are excluded everywhere and never spliced. A model without a causal-LM
    head (``no_lm_reason``) gets CE, KL and Δ-LM of None, and the reason under
    ``lm_metrics_skipped``; its forwards stop at the site.

    Each batch of ``batch_size`` sequences costs one forward up to the site and, after it, one
    on 3 x ``batch_size`` rows (``branch_plan``); where the model has no plan, or with
    ``batched`` False, three forwards (clean, which captures the site; SAE; zero). ``batched``
    True demands the single forward.
    """
    site = sae.cfg.site
    m = sae.cfg.input_scale if metric_scale is None else metric_scale
    device = sae.W_dec.device
    rec = ReconstructionStats(sae.cfg.d, sae.cfg.n_latents)
    lm = SpliceStats()
    no_lm = no_lm_reason(model)
    plan = None if no_lm or batched is False else branch_plan(model, site)
    if batched and plan is None and not no_lm:
        raise ValueError(f"{type(model).__name__} at {site} cannot run the branches as one batch")
    for x_raw in cache_batches or ():
        f, x_hat = reconstruct(sae, x_raw.to(device))
        rec.update(x_raw.float() * m, x_hat * m, f)
    if no_lm and cache_batches is not None:
        sequences = sequences[:0]  # nothing left to compute from the model
    for batch in tqdm(sequences.split(batch_size), desc="evaluating", unit="batch"):
        batch = batch.to(device)
        if no_lm:
            h = capture(model, batch, [site])[site]
            x_raw = h[:, skip_first:].reshape(-1, h.shape[-1]).float()
            f, x_hat = reconstruct(sae, x_raw)
        elif plan is not None:
            x_raw, f, x_hat, logits = _branched(model, plan, sae, batch, skip_first)
        else:
            x_raw, f, x_hat, logits = _separate(model, site, sae, batch, skip_first)
        if cache_batches is None:
            rec.update(x_raw * m, x_hat * m, f)
        if no_lm:
            continue
        # logits at position t predict token t + 1; positions before skip_first don't count
        mask = torch.zeros(batch.shape[0], batch.shape[1] - 1, dtype=torch.bool, device=device)
        mask[:, skip_first:] = True
        lm.update(batch[:, 1:], {k: v[:, :-1] for k, v in logits.items()}, mask)
    if no_lm:
        return {**rec.result(), **dict.fromkeys(LM_KEYS), "lm_metrics_skipped": no_lm}, (
            rec.firing_frequencies()
        )
    return {**rec.result(), **lm.result()}, rec.firing_frequencies()


def check_cache_model(manifest: dict, folder: Path, subject: Subject, allow_other: bool) -> None:
    """Refuse the cache ``folder`` (its ``manifest``) unless it holds activations of
    ``subject``: its width must be d_model, and its ``model_key`` the subject's key (unless
    ``allow_other``: --allow-other-model)."""
    settings = manifest["settings"]
    if settings["d"] != subject.d_model:
        raise UserError(
            f"{folder} holds d={settings['d']} activations; "
            f"{subject.name} has d_model={subject.d_model}"
        )
    key = settings.get("model_key")
    if key != subject.key and not allow_other:
        raise UserError(
            f"{folder} holds activations of model {settings.get('model')!r} (key {key}), not of "
            f"{subject.name!r} (key {subject.key}); pass --allow-other-model to use it anyway"
        )


def report(run: Path, results: dict[str, float], cfg: dict, warnings: Sequence[str] = ()) -> str:
    """A short markdown report of one evaluation."""
    lines = [
        f"# {run.name}",
        "",
        f"{cfg['arch']} SAE, {cfg['n_latents']} latents on {cfg['d']}-dim `{cfg['site']}` "
        f"of `{cfg['model']}`.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [
        f"| {k} | {'n/a' if results[k] is None else format(results[k], '.4g')} |"
        for k in METRIC_KEYS
        if k in results
    ]
    lines += ["", *(f"Warning: {w}" for w in warnings)] if warnings else []
    return "\n".join(lines) + "\n"


def sibling_runs(parent: Path) -> list[dict]:
    """Metrics of every run folder in ``parent`` (eval.json preferred), with its arch."""
    runs = []
    for cfg_path in sorted(parent.glob("*/cfg.json")):
        for name in ("eval.json", "metrics.json"):
            path = cfg_path.parent / name
            if path.exists():
                arch = json.loads(cfg_path.read_text()).get("arch", "?")
                runs.append({**json.loads(path.read_text()), "arch": arch, "run": path.parent.name})
                break
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashsae.train.eval", description=__doc__)
    p.add_argument("run", type=Path, help="run directory holding sae.safetensors + cfg.json")
    p.add_argument("--cache", type=Path, default=None, help="cached activations to evaluate on")
    p.add_argument("--model", default=None, help="subject model (default: the run's)")
    p.add_argument("--tokens", type=int, default=65536, help="held-out tokens")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument(
        "--eval-batch-size",
        type=int,
        default=32,
        help="sequences per batch (after the site the model runs on 3x as many rows)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="accept a --cache whose manifest names another model",
    )
    return p.parse_args(argv)


def run_eval(args: argparse.Namespace) -> dict:
    if args.tokens <= 0:
        raise UserError("--tokens must be positive")
    if args.seq_len < 2:
        raise UserError("--seq-len must be at least 2 (BOS plus one token)")
    if args.eval_batch_size <= 0:
        raise UserError("--eval-batch-size must be positive")
    args.device = pick_device(args.device)
    sae = load_sae(args.run, args.device)
    with exclusive_lock(args.run, "an evaluation"):
        return _evaluate_run(args, sae)


def _evaluate_run(args: argparse.Namespace, sae: SAE) -> dict:
    """``run_eval``'s work, with the run directory locked."""
    from .plots import density_histogram, frontier_plot
    from .wandb_log import resume_run

    cfg = json.loads((args.run / "cfg.json").read_text())
    subject = get_subject(args.model or sae.cfg.model, args.seq_len)
    if subject.d_model != sae.cfg.d:
        raise UserError(f"{subject.name} has d_model {subject.d_model}, the SAE d={sae.cfg.d}")
    cache_batches = None
    if args.cache is not None:
        loader = ActivationLoader(args.cache, sae.cfg.site, 4096, device=args.device)
        check_cache_model(loader.manifest, args.cache, subject, args.allow_other_model)
        n_batches = max(1, min(args.tokens, loader.rows) // 4096)
        cache_batches = list(itertools.islice(loader.epoch_batches(0), n_batches))
    model = subject.load(args.device)
    seqs = subject.sequences("val", args.tokens, args.seq_len, seed=0).tokens
    scale = cfg.get("normalization", {}).get("scale", 1.0)
    results, freqs = evaluate(
        sae, model, seqs, args.eval_batch_size, metric_scale=scale, cache_batches=cache_batches
    )
    warnings = metric_warnings(results)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    write_output(args.run / "eval.json", json.dumps({k: results[k] for k in METRIC_KEYS}, indent=2))
    write_output(args.run / "eval.md", report(args.run, results, cfg, warnings))
    images = {"density": args.run / "density.png"}
    density_histogram(freqs, images["density"])
    runs = sibling_runs(args.run.parent)
    for y, name in (("fvu", "frontier_fvu"), ("ce_loss_recovered", "frontier_ce")):
        images[name] = args.run.parent / f"{name}.png"
        frontier_plot([r for r in runs if r.get(y) is not None], images[name], x="l0", y=y)
    resume_run(
        args.run, {f"eval/{k}": v for k, v in results.items()}, images, args.run / "eval.json"
    )
    print(report(args.run, results, cfg, warnings))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: run_eval(args))


if __name__ == "__main__":
    sys.exit(main())
