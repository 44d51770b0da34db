"""Evaluate an SAE on held-out activations and spliced back into its model at its site.

``python -m flashsae.train.eval RUN_DIR [--text PATH] [--cache DIR] [--model M] [--tokens N]
[--eval-batch-size B]`` evaluates on the run's evaluation data (``metrics.json``'s
``eval_data``: the held-out split of the text it was trained on), or on all of ``--text``, or on
the rows of ``--cache``. It writes ``eval.json`` (the keys of ``metrics.json`` and
``eval_data``, naming the data), ``eval.md`` and ``density.png``, or ``eval-<data>.json`` ...
for other data than the run's, and, for all runs beside RUN_DIR, ``frontier_fvu.png`` and
``frontier_ce.png`` in the parent folder; it logs them to the run's W&B entry when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashsae.cache.build import keep_mask
from flashsae.cache.errors import UserError, report_errors
from flashsae.cache.hooks import SitePoint, capture, enclosing_block, resolve_site, splice
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.locks import exclusive_lock
from flashsae.cache.models.bytelm import ByteLM
from flashsae.cache.models.hf_layouts import hf_layout
from flashsae.cache.models.subjects import Subject, get_subject, no_lm_reason, pick_device
from flashsae.cache.text import split_digest

from .checkpoint import load_sae
from .files import write_output
from .metrics import LM_KEYS, METRIC_KEYS, ReconstructionStats, SpliceStats, metric_warnings
from .sae import SAE


def _replace_at(keep: torch.Tensor, new: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h`` ``[B, T, d]`` with the positions where ``keep`` ``[B, T]`` holds replaced by the
    rows of ``new``, in order."""
    h = h.clone()
    h[keep] = new.to(h.dtype)
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
    model: torch.nn.Module, plan: BranchPlan, sae: SAE, batch: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(x_raw, f, x̂, {branch: logits [B, T, V]}) of ``batch`` from one ``plan`` forward; the
    positions where ``keep`` [B, T] holds are reconstructed and spliced."""
    b = batch.shape[0]
    seen: dict[str, torch.Tensor] = {}

    def at_site(h: torch.Tensor) -> torch.Tensor:
        h = h.repeat(len(BRANCHES), *[1] * (h.ndim - 1)) if h.shape[0] == b else h.clone()
        x_raw = h[:b][keep].float()
        seen["f"], seen["x_hat"] = reconstruct(sae, x_raw)
        seen["x_raw"] = x_raw
        h[b : 2 * b][keep] = seen["x_hat"].to(h.dtype)
        h[2 * b :][keep] = 0
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
    model: torch.nn.Module, site: str, sae: SAE, batch: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """As ``_branched``, from three forwards: the clean one captures the site's activations."""
    seen: list[torch.Tensor] = []
    with splice(model, site, seen.append):
        logits = {"clean": logits_of(model, batch)}
    x_raw = seen[0][keep].float()
    f, x_hat = reconstruct(sae, x_raw)
    for name, new in (("sae", x_hat), ("zero", torch.zeros_like(x_hat))):
        with splice(model, site, partial(_replace_at, keep, new)):
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
    drop_tokens: tuple[int, ...] = (),
    batched: bool | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Every metric of ``metrics.py``, and the latents' firing frequencies.

    Reconstruction metrics use the activations at the SAE's site for ``sequences``
    (or ``cache_batches`` of cached rows when given), multiplied by ``metric_scale``
    (default: the SAE's input scale), i.e. in the run's normalized units. The language
    model metrics splice x̂ (and zeros) in at the site. The first ``skip_first``
    positions (the start token) and positions holding ``drop_tokens`` (separators) are
    excluded everywhere: not reconstructed, never spliced, their next-token predictions not
    counted (a prediction *of* a separator, the end of a document, counts). A model without a
    causal-LM head (``no_lm_reason``) gets CE, KL and Δ-LM of None, and the reason under
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
        keep = keep_mask(batch, drop_tokens, skip_first)
        if no_lm:
            h = capture(model, batch, [site])[site]
            x_raw = h[keep].float()
            f, x_hat = reconstruct(sae, x_raw)
        elif plan is not None:
            x_raw, f, x_hat, logits = _branched(model, plan, sae, batch, keep)
        else:
            x_raw, f, x_hat, logits = _separate(model, site, sae, batch, keep)
        if cache_batches is None:
            rec.update(x_raw * m, x_hat * m, f)
        if no_lm:
            continue
        # logits at position t predict token t + 1; they count where position t is kept
        lm.update(batch[:, 1:], {k: v[:, :-1] for k, v in logits.items()}, keep[:, :-1])
    if no_lm:
        return {**rec.result(), **dict.fromkeys(LM_KEYS), "lm_metrics_skipped": no_lm}, (
            rec.firing_frequencies()
        )
    return {**rec.result(), **lm.result()}, rec.firing_frequencies()


@dataclass(frozen=True)
class EvalData:
    """What an evaluation runs on: the documents of ``split`` ("val": the held-out split,
    "all") of ``text`` (None: the Python standard library) packed into sequences, and, when
    ``cache`` is given, that cache's rows for the reconstruction metrics."""

    text: str | None
    split: str = "val"
    text_field: str = "text"
    cache: Path | None = None

    @property
    def name(self) -> str:
        """A short human-readable name (plot legends, file names)."""
        if self.cache is not None:
            return f"cache {self.cache.name}"
        base = "stdlib" if self.text is None else Path(self.text.rstrip("/")).stem or self.text
        return f"{base} held-out" if self.split == "val" else base

    @property
    def stem(self) -> str:
        """``eval-<name>``: the stem of this data's evaluation files when it is not the run's
        own evaluation data (whose files are ``eval.*``)."""
        return "eval-" + re.sub(r"[^A-Za-z0-9_.]+", "-", self.name).strip("-")

    def describe(self, tokens: int, cache_settings: dict | None = None) -> dict:
        """The dict ``eval.json`` and ``metrics.json`` hold as ``eval_data``: kind, name,
        source, split, digest (of the local text's files or of the cache's settings; None for
        a Hub dataset) and the number of tokens evaluated."""
        if self.cache is not None:
            blob = json.dumps(cache_settings, sort_keys=True).encode()
            kind, digest = "cache", hashlib.sha256(blob).hexdigest()[:16]
        else:
            kind, digest = "stdlib" if self.text is None else "text", split_digest(self.text)
        return {
            "kind": kind,
            "name": self.name,
            "text": self.text,
            "split": self.split,
            "text_field": self.text_field,
            "cache": None if self.cache is None else str(self.cache),
            "digest": digest and digest[:16],
            "tokens": tokens,
        }

    @classmethod
    def of(cls, described: dict | None) -> EvalData:
        """The data ``describe`` described; the stdlib's held-out split for None (what every
        run was evaluated on before ``eval_data`` was recorded)."""
        if described is None:
            return cls(None)
        cache = described.get("cache")
        return cls(
            described["text"], described["split"], described.get("text_field", "text"),
            None if cache is None else Path(cache),
        )  # fmt: skip


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


def report(
    run: Path,
    results: dict[str, float],
    cfg: dict,
    warnings: Sequence[str] = (),
    data: dict | None = None,
) -> str:
    """A short markdown report of one evaluation (on ``data``, an ``EvalData.describe``)."""
    lines = [
        f"# {run.name}",
        "",
        f"{cfg['arch']} SAE, {cfg['n_latents']} latents on {cfg['d']}-dim `{cfg['site']}` "
        f"of `{cfg['model']}`.",
        "",
    ]
    if data is not None:
        lines += [f"Evaluated on {data['name']} ({data['tokens']} tokens).", ""]
    lines += [
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
    """Metrics of every run folder in ``parent``, with its arch and ``eval_data``: each of its
    evaluations (``eval.json`` preferred to ``metrics.json``, which holds the same data's,
    then every ``eval-<data>.json``). Results saved before ``eval_data`` was recorded were on
    the stdlib's held-out split."""
    runs = []
    for cfg_path in sorted(parent.glob("*/cfg.json")):
        arch = json.loads(cfg_path.read_text()).get("arch", "?")
        folder = cfg_path.parent
        own = next(
            (folder / n for n in ("eval.json", "metrics.json") if (folder / n).exists()), None
        )
        for path in [own] * (own is not None) + sorted(folder.glob("eval-*.json")):
            result = json.loads(path.read_text())
            data = result.get("eval_data") or {"name": EvalData(None).name}
            runs.append({**result, "eval_data": data, "arch": arch, "run": folder.name})
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashsae.train.eval", description=__doc__)
    p.add_argument("run", type=Path, help="run directory holding sae.safetensors + cfg.json")
    p.add_argument(
        "--text",
        default=None,
        help="evaluation text, all of it (file, directory, .jsonl or dataset); default: the "
        "run's evaluation data, the held-out split of the text it was trained on",
    )
    p.add_argument("--text-field", default="text", help="the text field of .jsonl and datasets")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cached activations for the reconstruction metrics (the next-token metrics use the "
        "held-out split of the cache's text, or --text)",
    )
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
    metrics_path = args.run / "metrics.json"
    logged = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    own = EvalData.of(logged.get("eval_data"))
    data = own if args.text is None else EvalData(args.text, "all", args.text_field)
    cache_batches, cache_settings = None, None
    if args.cache is not None:
        loader = ActivationLoader(args.cache, sae.cfg.site, 4096, device=args.device)
        check_cache_model(loader.manifest, args.cache, subject, args.allow_other_model)
        n_batches = max(1, min(args.tokens, loader.rows) // 4096)
        cache_batches = list(itertools.islice(loader.epoch_batches(0), n_batches))
        cache_settings = loader.manifest["settings"]
        if args.text is None:
            text = cache_settings.get("text")
            data = EvalData(text, "val", cache_settings.get("text_field", "text"))
        data = EvalData(data.text, data.split, data.text_field, args.cache)
    model = subject.load(args.device)
    seqs = subject.sequences(
        data.split, args.tokens, args.seq_len, 0, data.text, data.text_field
    ).tokens
    scale = cfg.get("normalization", {}).get("scale", 1.0)
    skip_first, special = int(subject.bos is not None), subject.special_tokens
    results, freqs = evaluate(
        sae, model, seqs, args.eval_batch_size, skip_first=skip_first, metric_scale=scale,
        cache_batches=cache_batches, drop_tokens=special,
    )  # fmt: skip
    n_tokens = (
        sum(len(b) for b in cache_batches)
        if cache_batches is not None
        else int(keep_mask(seqs, special, skip_first).sum())
    )
    described = data.describe(n_tokens, cache_settings)
    warnings = metric_warnings(results)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    # the run's own evaluation data: eval.json (over the last one); other data: beside it
    stem = "eval" if data == own else data.stem
    out = {k: results[k] for k in METRIC_KEYS} | {"eval_data": described}
    write_output(args.run / f"{stem}.json", json.dumps(out, indent=2))
    write_output(args.run / f"{stem}.md", report(args.run, results, cfg, warnings, described))
    density = "density" if stem == "eval" else f"density-{stem.removeprefix('eval-')}"
    images = {"density": args.run / f"{density}.png"}
    density_histogram(freqs, images["density"])
    runs = sibling_runs(args.run.parent)
    for y, name in (("fvu", "frontier_fvu"), ("ce_loss_recovered", "frontier_ce")):
        images[name] = args.run.parent / f"{name}.png"
        frontier_plot([r for r in runs if r.get(y) is not None], images[name], x="l0", y=y)
    resume_run(
        args.run, {f"{stem}/{k}": v for k, v in results.items()}, images,
        args.run / f"{stem}.json",
    )  # fmt: skip
    print(report(args.run, results, cfg, warnings, described))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_errors(lambda: run_eval(args))


if __name__ == "__main__":
    sys.exit(main())
