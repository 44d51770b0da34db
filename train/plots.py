"""PNG plots of SAE results (matplotlib, Agg backend: no display needed).

- ``density_histogram``: histogram of log10 firing frequency over latents (the
  fraction of tokens on which f_i > 0); dead latents (frequency 0, no logarithm)
  are counted in a separate bar at the left.
- ``frontier_plot``: a sparsity/fidelity frontier, x (e.g. L0) against y (e.g. FVU
  or CE loss recovered), one marker series per architecture and evaluation data (runs
  evaluated on different data are never joined; the title names the data when all share it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

FIGSIZE = (6.4, 4.0)  # inches; at DPI this gives 640 x 400 pixels
DPI = 100
LABELS = {"l0": "L0", "fvu": "FVU", "ce_loss_recovered": "CE loss recovered"}


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported on first use
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def density_histogram(freqs: torch.Tensor | Sequence[float], path: str | Path) -> Path:
    """Histogram of log10(freq_i) over live latents, plus a bar for dead ones (freq_i = 0)."""
    f = np.asarray(freqs.detach().cpu() if isinstance(freqs, torch.Tensor) else freqs, float)
    f = f.reshape(-1)
    live = np.log10(f[f > 0])
    n_dead = int((f == 0).sum())
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    left = live.min() - 1.0 if live.size else 0.0
    if live.size:
        ax.hist(live, bins=50, color="tab:blue", label=f"live ({live.size})")
    else:
        ax.set_xticks([left], ["dead"])
        ax.set_xlim(left - 1, left + 1)
    ax.bar(left, n_dead, width=0.3, color="tab:red", label=f"dead ({n_dead})")
    ax.set_xlabel("log10 firing frequency (dead latents at the left)")
    ax.set_ylabel("latents")
    ax.set_title(f"latent density, {f.size} latents")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _data_name(run: dict) -> str:
    """The name of the data ``run`` was evaluated on (its ``eval_data``), "" when not said."""
    return (run.get("eval_data") or {}).get("name", "")


def frontier_series(
    runs: Sequence[dict], x: str = "l0", y: str = "fvu"
) -> tuple[dict[str, list[tuple[float, float]]], str | None]:
    """({label: sorted (x, y) points}, the data every run was evaluated on or None): one
    series per ``run["arch"]`` and evaluation data (``run["eval_data"]["name"]``), labelled
    with the data's name when the runs were evaluated on more than one."""
    for r in runs:
        if not {"arch", x, y} <= r.keys():
            raise ValueError(f"run {r} lacks one of 'arch', {x!r}, {y!r}")
    names = sorted({_data_name(r) for r in runs})
    series = {}
    for arch, name in sorted({(r["arch"], _data_name(r)) for r in runs}):
        label = f"{arch}, {name or 'data not named'}" if len(names) > 1 else arch
        series[label] = sorted(
            (r[x], r[y]) for r in runs if (r["arch"], _data_name(r)) == (arch, name)
        )
    return series, names[0] if len(names) == 1 and names[0] else None


def frontier_plot(runs: Sequence[dict], path: str | Path, x: str = "l0", y: str = "fvu") -> Path:
    """Scatter-and-line of ``run[y]`` against ``run[x]``, one series per architecture and
    evaluation data (``frontier_series``): runs on different data are never one line. The
    title names the data when every run shares it, else the legend does."""
    series, data = frontier_series(runs, x, y)
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    for label, points in series.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    if runs:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
    title = f"{LABELS.get(y, y)} vs {LABELS.get(x, x)}"
    ax.set_title(f"{title} on {data}" if data else title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
