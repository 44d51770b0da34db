"""PNG plots of SAE results (matplotlib, Agg backend: no display needed).

- ``density_histogram``: histogram of log10 firing frequency over latents (the
  fraction of tokens on which f_i > 0); dead latents (frequency 0, no logarithm)
  are counted in a separate bar at the left.
- ``frontier_plot``: a sparsity/fidelity frontier, x (e.g. L0) against y (e.g. FVU
  or CE loss recovered), one marker series per architecture.
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


def frontier_plot(runs: Sequence[dict], path: str | Path, x: str = "l0", y: str = "fvu") -> Path:
    """Scatter-and-line of ``run[y]`` against ``run[x]``, one series per ``run["arch"]``."""
    for r in runs:
        if not {"arch", x, y} <= r.keys():
            raise ValueError(f"run {r} lacks one of 'arch', {x!r}, {y!r}")
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    for arch in sorted({r["arch"] for r in runs}):
        points = sorted((r[x], r[y]) for r in runs if r["arch"] == arch)
        ax.plot(*zip(*points, strict=True), marker="o", label=arch)
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    if runs:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{LABELS.get(y, y)} vs {LABELS.get(x, x)}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
