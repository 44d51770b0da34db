"""Test the Gated SAE paper's claims (Rajamanoharan et al. 2024) at equal budgets, with ablations.

One command trains, on the same cached activations of the bundled model (same site, batch, lr,
tokens and steps for every run; each seed changes the SAE init and the data order):

  relu            ReLU/L1 SAE (April update), λ swept
  gated           Gated SAE, the same λ
  rescale_shift   a ReLU SAE trained on (1 - rs_frac) of the tokens, then frozen with only r_mag
                  and b_mag trained on the remaining rs_frac: equal total budget with one Gated run
  gated_noaux     Gated without the auxiliary loss (``flashsae.train.gated.GatedNoAuxSAE``)
  gated_sigmoid   Gated with a sigmoid gate and L1 on f (``GatedSigmoidSAE``)

at the largest of ``--tokens``; relu and gated are also trained at each smaller budget, so a claim
about them can be found to hold only from some budget on. Every run is evaluated as
``python -m flashsae.train`` does (held-out text, SAE spliced in). The claims, their measured
numbers and verdicts are computed from the results (``claims``) and written to
bench/results/gated_claims.md with a per-run table; gated_claims.jsonl holds one line per run
(settings, metrics, training curve), and the PNGs: frontiers (FVU and CE loss recovered against
L0, mean over seeds with the seed range as bars), γ against λ, training L0 of the gate
ablations, and the training loss curves. ``--quick`` is a smoke version (tiny model, < 1 minute).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import environment

from flashsae.cache.loader import ActivationLoader
from flashsae.train import RunConfig
from flashsae.train.gated import rescale_shift
from flashsae.train.metrics import METRIC_KEYS
from flashsae.train.pipeline import RunData, prepare, train_config
from flashsae.train.sae import SAE
from flashsae.train.trainer import train_sae

RESULTS = Path(__file__).parent / "results"
GAMMA_TOL = 0.02  # |γ - 1| at or under this: no shrinkage
L0_RANGE = (10.0, 100.0)  # where the frontiers are compared
GRID_POINTS = 16  # log-spaced L0 values at which interpolated frontiers are compared
COLLAPSE = 0.1  # no-aux L0 at most this fraction of Gated's: collapsed
ARCHS = ("relu", "gated", "rescale_shift", "gated_noaux", "gated_sigmoid")
DEFAULTS = {
    "model": "bytelm",
    "n_latents": 2048,
    "tokens": [524288, 1572864],
    "batch_size": 1024,
    "lr": 1e-3,
    "lambdas": [1.0, 2.0, 4.0, 8.0],
    "gated_lambdas": [1.0, 2.0, 4.0, 8.0],
    "seeds": [0, 1],
    "rs_frac": 0.25,
    "eval_tokens": 32768,
    "seq_len": 128,
}
QUICK = {
    "model": "bytelm-tiny",
    "n_latents": 128,
    "tokens": [2048, 4096],
    "batch_size": 256,
    "lambdas": [1.0, 4.0],
    "gated_lambdas": [0.5, 2.0],
    "eval_tokens": 1024,
}


class Recorder:
    """A trainer logger that keeps the loss curve: (tokens, loss, mse, L0 of the batch)."""

    def __init__(self) -> None:
        self.curve: list[list[float]] = []

    def log(self, record: dict, step: int) -> None:
        self.curve.append(
            [step, record["losses/loss"], record["losses/mse"], record.get("losses/l0", math.nan)]
        )


class _Offset:
    """The batches of ``loader`` from batch ``offset`` on (the r&s phase sees fresh data)."""

    def __init__(self, loader: ActivationLoader, offset: int) -> None:
        self.loader, self.offset = loader, offset

    def batches(self, start: int = 0):  # noqa: ANN201 - the loader's iterator
        return self.loader.batches(start=start + self.offset)


class Bench:
    """The subject model, cache and evaluation text every run shares, and one run's recipe."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        cfg = RunConfig(
            model=args.model, n_latents=args.n_latents, tokens=max(args.tokens),
            batch_size=args.batch_size, lr=args.lr, eval_tokens=args.eval_tokens,
            seq_len=args.seq_len, device=args.device,
        )  # fmt: skip
        self.data: RunData = prepare(cfg)

    def new_sae(self, arch: str, lam: float, seed: int) -> SAE:
        torch.manual_seed(seed)
        return self.data.new_sae(replace(self.data.cfg, arch=arch, sparsity_coeff=lam))

    def train(self, sae: SAE, tokens: int, seed: int, offset: int = 0) -> dict:
        """Train ``sae`` on ``tokens`` (from batch ``offset`` of the seed's order); metrics."""
        loader = ActivationLoader(
            self.data.cache, self.data.cfg.site, self.args.batch_size, seed=seed,
            device=self.data.device,
        )  # fmt: skip
        rec = Recorder()
        cfg = replace(train_config(self.data.cfg, self.data.device), tokens=tokens)
        start = time.time()
        train_sae(sae, _Offset(loader, offset), cfg, rec)
        sae.eval()
        results, _ = self.data.evaluate(sae)  # the run's evaluation data, separators not counted
        seconds = time.time() - start
        return {k: results[k] for k in METRIC_KEYS} | {"curve": rec.curve, "seconds": seconds}

    def run(self, arch: str, lam: float, seed: int, tokens: int) -> dict:
        """One record: ``arch`` (or the rescale & shift recipe) at λ, seed, total tokens."""
        if arch != "rescale_shift":
            return self.train(self.new_sae(arch, lam, seed), tokens, seed)
        batch = self.args.batch_size
        relu_tokens = round(tokens * (1 - self.args.rs_frac) / batch) * batch
        relu = self.new_sae("relu", lam, seed)
        first = self.train(relu, relu_tokens, seed)
        second = self.train(rescale_shift(relu), tokens - relu_tokens, seed, relu_tokens // batch)
        curve = first["curve"] + [[relu_tokens + t, *rest] for t, *rest in second["curve"]]
        return second | {
            "curve": curve,
            "seconds": first["seconds"] + second["seconds"],
            "relu_phase": {k: first[k] for k in ("l0", "fvu", "gamma", "l2_ratio")},
            "relu_tokens": relu_tokens,
        }


def plan(args: argparse.Namespace) -> list[tuple[str, float, int, int]]:
    """(arch, λ, seed, tokens) of every run, the claims that need the most evidence first:
    relu and gated at the full budget, rescale & shift, the ablations, the smaller budgets."""
    full = max(args.tokens)
    lams = {
        a: args.lambdas if a in ("relu", "rescale_shift") else args.gated_lambdas for a in ARCHS
    }

    def runs(archs: tuple[str, ...], tokens: int) -> list[tuple[str, float, int, int]]:
        return [
            (a, lams[a][i], s, tokens)
            for s in args.seeds
            for i in range(len(args.lambdas))
            for a in archs
        ]

    todo = runs(ARCHS[:2], full)
    for arch in ARCHS[2:]:
        todo += runs((arch,), full)
    for tokens in sorted(set(args.tokens) - {full}, reverse=True):
        todo += runs(ARCHS[:2], tokens)
    return todo


# ---- claims: pure functions of the records ----


def _select(records: list[dict], arch: str, tokens: int, seed: int | None = None) -> list[dict]:
    return [
        r
        for r in records
        if r["arch"] == arch and r["tokens"] == tokens and (seed is None or r["seed"] == seed)
    ]


def _frontier(records: list[dict], y: str = "fvu") -> tuple[np.ndarray, np.ndarray]:
    """(log L0, y) sorted by L0, of runs with L0 > 0."""
    pts = sorted((math.log(r["l0"]), r[y]) for r in records if r["l0"] > 0)
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def _grid(*frontiers: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
    """Log-spaced L0 values inside L0_RANGE and inside every frontier's L0 span (None: empty)."""
    if any(len(x) < 2 for x, _ in frontiers):
        return None
    lo = max(math.log(L0_RANGE[0]), *(x[0] for x, _ in frontiers))
    hi = min(math.log(L0_RANGE[1]), *(x[-1] for x, _ in frontiers))
    return np.linspace(lo, hi, GRID_POINTS) if lo < hi else None


def _at(frontier: tuple[np.ndarray, np.ndarray], grid: np.ndarray) -> np.ndarray:
    return np.interp(grid, *frontier)


def compare(
    records: list[dict], archs: tuple[str, ...], tokens: int, seeds: list[int], y: str = "fvu"
) -> dict | None:
    """Per seed, each arch's ``y`` interpolated in log L0 on their common grid inside L0_RANGE:
    {"span": (L0 lo, hi) of the union of grids, "values": {arch: [seed][grid]}}; None when some
    seed has no common L0 range."""
    out: dict[str, list[np.ndarray]] = {a: [] for a in archs}
    spans = []
    for seed in seeds:
        fronts = [_frontier(_select(records, a, tokens, seed), y) for a in archs]
        grid = _grid(*fronts)
        if grid is None:
            return None
        spans.append((math.exp(grid[0]), math.exp(grid[-1])))
        for a, f in zip(archs, fronts, strict=True):
            out[a].append(_at(f, grid))
    span = (min(s[0] for s in spans), max(s[1] for s in spans))
    return {"span": span, "values": out}


def _span(c: dict) -> str:
    lo, hi = c["span"]
    full = lo <= L0_RANGE[0] * 1.001 and hi >= L0_RANGE[1] * 0.999
    return f"L0 {lo:.0f}-{hi:.0f}" + ("" if full else " (the runs do not span 10-100)")


def _gaps(c: dict, a: str, b: str) -> list[float]:
    """Per seed, mean over the grid of y_a - y_b."""
    return [float(np.mean(va - vb)) for va, vb in zip(c["values"][a], c["values"][b], strict=True)]


def _fmt_gaps(gaps: list[float]) -> str:
    return f"{np.mean(gaps):+.4f} (seeds {min(gaps):+.4f} to {max(gaps):+.4f})"


def claim_pareto(records: list[dict], tokens: int, seeds: list[int]) -> tuple[bool | None, str]:
    c = compare(records, ("relu", "gated"), tokens, seeds)
    if c is None:
        return None, "no common L0 range"
    below = [
        float(np.mean(g < r))
        for g, r in zip(c["values"]["gated"], c["values"]["relu"], strict=True)
    ]
    text = (
        f"FVU(ReLU) - FVU(Gated) over {_span(c)}: {_fmt_gaps(_gaps(c, 'relu', 'gated'))}; "
        f"Gated below at {100 * min(below):.0f}-{100 * max(below):.0f}% of the L0 grid"
    )
    return min(below) == 1.0, text


def claim_shrinkage(records: list[dict], tokens: int, seeds: list[int]) -> tuple[bool | None, str]:
    gated, relu = _select(records, "gated", tokens), _select(records, "relu", tokens)
    if not gated or not relu:
        return None, "no runs"
    worst = max(abs(r["gamma"] - 1) for r in gated)
    lams = sorted({r["sparsity_coeff"] for r in relu})
    mean_g = [np.mean([r["gamma"] for r in relu if r["sparsity_coeff"] == lam]) for lam in lams]
    falling = all(b < a for a, b in zip(mean_g, mean_g[1:], strict=False))
    below = all(r["gamma"] < 1 for r in relu)
    text = (
        f"Gated max |γ-1| = {worst:.4f}; ReLU γ (mean over seeds) at λ "
        f"{', '.join(f'{v:g}' for v in lams)}: {', '.join(f'{g:.3f}' for g in mean_g)}"
    )
    return worst <= GAMMA_TOL and below and falling, text


def claim_rescale_shift(
    records: list[dict], tokens: int, seeds: list[int]
) -> tuple[bool | None, str]:
    rs = _select(records, "rescale_shift", tokens)
    c = compare(records, ("relu", "rescale_shift", "gated"), tokens, seeds)
    if not rs or c is None:
        return None, "no runs" if not rs else "no common L0 range"
    worst = max(abs(r["gamma"] - 1) for r in rs)
    v = c["values"]
    between = [
        float(np.mean((g < m) & (m < r)))
        for g, m, r in zip(v["gated"], v["rescale_shift"], v["relu"], strict=True)
    ]
    text = (
        f"r&s max |γ-1| = {worst:.4f}; over {_span(c)}: FVU(ReLU) - FVU(r&s) "
        f"{_fmt_gaps(_gaps(c, 'relu', 'rescale_shift'))}, FVU(r&s) - FVU(Gated) "
        f"{_fmt_gaps(_gaps(c, 'rescale_shift', 'gated'))}; between at "
        f"{100 * min(between):.0f}-{100 * max(between):.0f}% of the grid"
    )
    return worst <= GAMMA_TOL and min(between) == 1.0, text


def _fall(curve: list[list[float]]) -> str:
    """Training-batch L0 at the middle and at the end of training."""
    l0 = [(t, v) for t, _, _, v in curve if not math.isnan(v)]
    if not l0:
        return "no training L0"
    mid = min(l0, key=lambda p: abs(p[0] - l0[-1][0] / 2))
    return f"{mid[1]:.1f} at {mid[0]:,.0f} tok, {l0[-1][1]:.1f} at the end"


def claim_no_aux(records: list[dict], tokens: int, seeds: list[int]) -> tuple[bool | None, str]:
    noaux = _select(records, "gated_noaux", tokens)
    if not noaux:
        return None, "no runs"
    ratios, parts = [], []
    for lam in sorted({r["sparsity_coeff"] for r in noaux}):
        runs = [r for r in noaux if r["sparsity_coeff"] == lam]
        gated = [r["l0"] for r in _select(records, "gated", tokens) if r["sparsity_coeff"] == lam]
        l0 = np.mean([r["l0"] for r in runs])
        if gated:
            ratios.append(l0 / max(np.mean(gated), 1e-9))
        gated_curve = [r["curve"] for r in _select(records, "gated", tokens, runs[0]["seed"])
                       if r["sparsity_coeff"] == lam]  # fmt: skip
        parts.append(
            f"λ {lam:g}: L0 {l0:.1f} vs Gated {np.mean(gated) if gated else math.nan:.1f} "
            f"(training L0, seed {runs[0]['seed']}: no-aux {_fall(runs[0]['curve'])}"
            + (f"; Gated {_fall(gated_curve[0])})" if gated_curve else ")")
        )
    ok = bool(ratios) and max(ratios) <= COLLAPSE
    return ok, "; ".join(parts)


def claim_sigmoid(records: list[dict], tokens: int, seeds: list[int]) -> tuple[bool | None, str]:
    sig = _select(records, "gated_sigmoid", tokens)
    c = compare(records, ("gated_sigmoid", "gated"), tokens, seeds)
    if not sig or c is None:
        return None, "no runs" if not sig else "no common L0 range"
    gaps = _gaps(c, "gated_sigmoid", "gated")
    gam = [r["gamma"] for r in sig]
    text = (
        f"FVU(sigmoid) - FVU(Gated) over {_span(c)}: {_fmt_gaps(gaps)}; "
        f"sigmoid γ {min(gam):.3f} to {max(gam):.3f}"
    )
    same_sign = all(g > 0 for g in gaps) or all(g < 0 for g in gaps)
    return same_sign and abs(np.mean(gaps)) > (max(gaps) - min(gaps)), text


def claim_norm_ratio(records: list[dict], tokens: int, seeds: list[int]) -> tuple[bool | None, str]:
    gated = _select(records, "gated", tokens)
    ok = [r for r in gated if abs(r["gamma"] - 1) <= GAMMA_TOL]
    if not ok:
        return None, f"no Gated run has |γ-1| <= {GAMMA_TOL} (of {len(gated)})"
    ratios = [r["l2_ratio"] for r in ok]
    text = (
        f"{len(ok)} of {len(gated)} Gated runs have |γ-1| <= {GAMMA_TOL}; their L2 ratio "
        f"{min(ratios):.3f} to {max(ratios):.3f}"
    )
    return max(ratios) < 1, text


CLAIMS = [
    ("Pareto gain: Gated FVU below ReLU/L1's at matched L0, 10-100", claim_pareto, True),
    ("No shrinkage: Gated |γ-1| <= 0.02 at every λ; ReLU γ < 1, falling with λ", claim_shrinkage,
     True),
    ("Rescale & shift (equal budget): γ ≈ 1, frontier between ReLU's and Gated's",
     claim_rescale_shift, False),
    ("Without L_aux the gate shuts: L0 <= 10% of Gated's", claim_no_aux, False),
    ("Sigmoid gate is a different trade-off: frontier apart from Gated's beyond seed spread",
     claim_sigmoid, False),
    ("γ is not the norm ratio: Gated ||x̂||/||x|| < 1 where γ ≈ 1", claim_norm_ratio, True),
]  # fmt: skip  # (statement, function, tested at every budget)


def verdict(by_budget: dict[int, bool | None]) -> str:
    """'holds' / 'does not hold' / 'holds only from N tokens on' / 'not testable' from the
    claim's outcome at each budget (None: not testable there, and then not counted, except at
    the full budget)."""
    full = by_budget[max(by_budget)]
    budgets = sorted(b for b, ok in by_budget.items() if ok is not None or b == max(by_budget))
    if full is None:
        return "not testable"
    if not full:
        return "does not hold"
    from_on = budgets[-1]
    for b in reversed(budgets[:-1]):
        if not by_budget[b]:
            break
        from_on = b
    return "holds" if from_on == budgets[0] else f"holds only from {from_on:,} tokens on"


def claims(records: list[dict], budgets: list[int], seeds: list[int]) -> list[dict]:
    """One row per claim: statement, measured text per budget, verdict."""
    rows = []
    full = max(budgets)
    for i, (statement, fn, every_budget) in enumerate(CLAIMS, 1):
        tested = sorted(budgets) if every_budget else [full]
        outcomes = {b: fn(records, b, seeds) for b in tested}
        measured = " / ".join(
            f"{b:,} tok: {text}" if len(tested) > 1 else text for b, (_, text) in outcomes.items()
        )
        by_budget = {b: ok for b, (ok, _) in outcomes.items()}
        rows.append({"claim": i, "statement": statement, "measured": measured,
                     "verdict": verdict(by_budget)})  # fmt: skip
    return rows


# ---- output ----


def markdown(records: list[dict], rows: list[dict], meta: dict) -> str:
    a = meta["args"]
    kind = meta["kind"]
    lines = [
        "# Gated SAE claims at equal budget",
        "",
        f"Command: `{meta['command']}`  ",
        f"Configuration: **{kind}**  ",
        f"Device: {meta['device']}, torch {meta['torch']}, commit {meta['commit']}; "
        f"wall time {meta['wall_s'] / 60:.1f} min ({len(records)} runs)  ",
        f"Model {a['model']}, site {meta['site']}, n = {a['n_latents']} latents, batch "
        f"{a['batch_size']}, lr {a['lr']}; λ {a['lambdas']} (relu, rescale_shift), "
        f"{a['gated_lambdas']} (gated and its ablations), seeds {a['seeds']}; full budget "
        f"{max(a['tokens']):,} tokens per run (relu and gated also at "
        f"{', '.join(f'{t:,}' for t in sorted(a['tokens'])[:-1]) or 'no other budget'}); "
        f"rescale & shift: ReLU on {1 - a['rs_frac']:.0%} of the tokens, r&s on {a['rs_frac']:.0%};"
        f" evaluated on {a['eval_tokens']:,} held-out tokens.",
        "",
        "Verdicts are computed by `bench/gated_claims.py` from the numbers below (frontiers are "
        f"interpolated in log L0 on {GRID_POINTS} points inside L0 10-100 and inside every "
        "compared run's L0 span, per seed; gaps are means over those points, with the range "
        f"over seeds; γ tolerance {GAMMA_TOL}).",
        "",
        "| # | claim | measured | verdict |",
        "|---|---|---|---|",
    ]
    esc = lambda t: t.replace("|", "\\|")  # noqa: E731 - a literal | inside a table cell
    lines += [f"| {r['claim']} | {esc(r['statement'])} | {esc(r['measured'])} | "
              f"**{r['verdict']}** |" for r in rows]  # fmt: skip
    lines += [
        "",
        "## Runs",
        "",
        "| arch | λ | seed | tokens | L0 | FVU | CE loss recovered | γ | L2 ratio | dead | dense "
        "| s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["tokens"], ARCHS.index(r["arch"]), r["sparsity_coeff"], r["seed"])  # noqa: E731
    for r in sorted(records, key=key):
        lines.append(
            f"| {r['arch']} | {r['sparsity_coeff']:g} | {r['seed']} | {r['tokens']:,} | "
            f"{r['l0']:.1f} | {r['fvu']:.4f} | {r['ce_loss_recovered']:.4f} | {r['gamma']:.4f} | "
            f"{r['l2_ratio']:.4f} | {r['dead_frac']:.3f} | {r['dense_frac']:.3f} | "
            f"{r['seconds']:.0f} |"
        )
    stem = meta["stem"]
    lines += [
        "",
        f"Plots: `{stem}.fvu.png`, `{stem}.ce.png` (frontiers at the full budget, mean over "
        f"seeds, bars: seed range), `{stem}.gamma.png` (γ against λ), `{stem}.l0_train.png` "
        f"(training-batch L0 of gated and its ablations, seed {a['seeds'][0]}), "
        f"`{stem}.loss.png` (training loss, every run at the full budget, seed {a['seeds'][0]}).",
    ]
    return "\n".join(lines) + "\n"


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_lambda(records: list[dict], arch: str, key: str) -> list[tuple[float, list[dict]]]:
    lams = sorted({r["sparsity_coeff"] for r in records if r["arch"] == arch})
    return [(lam, [r for r in records if r["arch"] == arch and r["sparsity_coeff"] == lam])
            for lam in lams]  # fmt: skip


def plots(records: list[dict], stem: Path, full: int, seed: int) -> list[Path]:
    plt = _pyplot()
    runs = [r for r in records if r["tokens"] == full]
    archs = [a for a in ARCHS if any(r["arch"] == a for r in runs)]
    paths = []
    for y, label in (("fvu", "FVU"), ("ce_loss_recovered", "CE loss recovered")):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        for arch in archs:
            groups = _by_lambda(runs, arch, y)
            xs = np.array([[r["l0"] for r in g] for _, g in groups], dtype=object)
            mx = [np.mean(v) for v in xs]
            my = [np.mean([r[y] for r in g]) for _, g in groups]
            xerr = [[m - min(v) for m, v in zip(mx, xs, strict=True)],
                    [max(v) - m for m, v in zip(mx, xs, strict=True)]]  # fmt: skip
            ys = [[r[y] for r in g] for _, g in groups]
            yerr = [[m - min(v) for m, v in zip(my, ys, strict=True)],
                    [max(v) - m for m, v in zip(my, ys, strict=True)]]  # fmt: skip
            ax.errorbar(mx, my, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=arch)
        ax.set_xscale("log")
        ax.set_xlabel("L0")
        ax.set_ylabel(label)
        ax.set_title(f"{label} against L0, {full:,} tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(stem.with_suffix(f".{'fvu' if y == 'fvu' else 'ce'}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arch in archs:
        groups = _by_lambda(runs, arch, "gamma")
        lams = [lam for lam, _ in groups]
        gs = [[r["gamma"] for r in g] for _, g in groups]
        m = [np.mean(v) for v in gs]
        err = [[a - min(v) for a, v in zip(m, gs, strict=True)],
               [max(v) - a for a, v in zip(m, gs, strict=True)]]  # fmt: skip
        ax.errorbar(lams, m, yerr=err, marker="o", capsize=3, label=arch)
    ax.axhspan(1 - GAMMA_TOL, 1 + GAMMA_TOL, color="0.9", label=f"|γ-1| <= {GAMMA_TOL}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("λ")
    ax.set_ylabel("γ = E||x̂||² / E[x·x̂]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(stem.with_suffix(".gamma.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    for name, archs_here, col, ylabel in (
        ("l0_train", ("gated", "gated_noaux", "gated_sigmoid"), 3, "training-batch L0"),
        ("loss", archs, 1, "training loss"),
    ):
        fig, axes = plt.subplots(1, len(archs_here), figsize=(3.2 * len(archs_here), 3.2),
                                 squeeze=False)  # fmt: skip
        for ax, arch in zip(axes[0], archs_here, strict=True):
            for r in runs:
                if r["arch"] == arch and r["seed"] == seed:
                    t = [p[0] for p in r["curve"]]
                    ax.plot(t, [p[col] for p in r["curve"]], label=f"λ {r['sparsity_coeff']:g}")
            ax.set_yscale("log")
            ax.set_title(arch, fontsize=9)
            ax.set_xlabel("tokens")
            if ax.lines:
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        paths.append(stem.with_suffix(f".{name}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write(records: list[dict], args: argparse.Namespace, meta: dict) -> None:
    stem = args.out / args.tag
    rows = claims(records, args.tokens, args.seeds)
    meta = meta | {"stem": args.tag}
    stem.with_suffix(".md").write_text(markdown(records, rows, meta))
    plots(records, stem, max(args.tokens), args.seeds[0])
    for row in rows:
        print(f"claim {row['claim']}: {row['verdict']} ({row['measured']})")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke version: tiny model, < 1 min")
    parser.add_argument("--model", help=f"subject model (default {DEFAULTS['model']})")
    parser.add_argument("--n-latents", type=int, help=f"default {DEFAULTS['n_latents']}")
    parser.add_argument(
        "--tokens", type=int, nargs="+",
        help=f"token budgets per run; everything at the largest (default {DEFAULTS['tokens']})",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, help=f"default {DEFAULTS['batch_size']}")
    parser.add_argument("--lr", type=float, help=f"Adam lr, every run (default {DEFAULTS['lr']})")
    parser.add_argument(
        "--lambdas", type=float, nargs="+",
        help=f"λ of relu and rescale_shift (default {DEFAULTS['lambdas']})",
    )  # fmt: skip
    parser.add_argument(
        "--gated-lambdas", type=float, nargs="+",
        help=f"λ of gated and its ablations (default {DEFAULTS['gated_lambdas']})",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", help=f"default {DEFAULTS['seeds']}")
    parser.add_argument(
        "--rs-frac", type=float,
        help=f"share of the tokens for the r&s phase (default {DEFAULTS['rs_frac']})",
    )  # fmt: skip
    parser.add_argument("--eval-tokens", type=int, help=f"default {DEFAULTS['eval_tokens']}")
    parser.add_argument("--seq-len", type=int, help=f"default {DEFAULTS['seq_len']}")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--tag", default="gated_claims", help="stem of the result files")
    parser.add_argument(
        "--report", action="store_true",
        help="no training: rewrite the md and PNGs from the existing <out>/<tag>.jsonl",
    )  # fmt: skip
    args = parser.parse_args(argv)
    base = DEFAULTS | (QUICK if args.quick else {})
    changed = [k for k in DEFAULTS if getattr(args, k) is not None and getattr(args, k) != base[k]]
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.kind = "quick smoke run (--quick), not the default configuration"
    elif changed:
        args.kind = (
            "reduced/changed configuration, not the defaults (changed: "
            + ", ".join(f"{k} = {getattr(args, k)} instead of {DEFAULTS[k]}" for k in changed)
            + ")"
        )
    else:
        args.kind = "the default configuration"
    if not 0 < args.rs_frac < 1:
        parser.error("--rs-frac must be in (0, 1)")
    if len(args.lambdas) != len(args.gated_lambdas):
        parser.error("--lambdas and --gated-lambdas need the same number of values")
    return args


def report(args: argparse.Namespace) -> None:
    """Rewrite the md and PNGs from the JSON lines of an earlier run (its own settings)."""
    jsonl = (args.out / args.tag).with_suffix(".jsonl")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    head = records[0]
    for k in DEFAULTS:
        setattr(args, k, head[k])
    args.tokens = sorted({r["tokens"] for r in records})
    meta = {k: head[k] for k in ("device", "torch", "commit", "command", "kind", "site")}
    settings = {k: getattr(args, k) for k in DEFAULTS}
    write(records, args, meta | {"args": settings, "wall_s": records[-1]["elapsed_s"]})


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.report:
        report(args)
        return
    command = shlex.join(["python", "bench/gated_claims.py", *(sys.argv[1:] if argv is None
                                                               else argv)])  # fmt: skip
    start = time.time()
    bench = Bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = (args.out / args.tag).with_suffix(".jsonl")
    jsonl.write_text("")
    settings = {k: getattr(args, k) for k in DEFAULTS}
    meta = {**environment(), "command": command, "kind": args.kind, "args": settings,
            "site": bench.data.cfg.site}  # fmt: skip
    records = []
    todo = plan(args)
    for i, (arch, lam, seed, tokens) in enumerate(todo, 1):
        m = bench.run(arch, lam, seed, tokens)
        record = {"bench": "gated_claims", **{k: meta[k] for k in ("device", "torch", "commit")},
                  **settings, "site": meta["site"], "command": command, "kind": args.kind,
                  "arch": arch, "sparsity_coeff": lam, "seed": seed} | m | {
                  "tokens": tokens, "elapsed_s": time.time() - start}  # fmt: skip
        records.append(record)
        with jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"[{i}/{len(todo)}] {arch} λ {lam:g} seed {seed} {tokens:,} tok: L0 {m['l0']:.1f} "
            f"FVU {m['fvu']:.4f} γ {m['gamma']:.4f} ({m['seconds']:.0f} s)",
            flush=True,
        )
        if i % 4 == 0 or i == len(todo):  # refresh the report as the runs come in
            write(records, args, meta | {"wall_s": time.time() - start})
    print(f"wrote {args.out / args.tag}.{{md,jsonl,*.png}}")


if __name__ == "__main__":
    main()
