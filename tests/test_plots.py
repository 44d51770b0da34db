"""PNG plots: files written with the expected pixel size, degenerate inputs handled."""

import matplotlib.image as mpimg
import pytest
import torch

from flashsae.train.plots import DPI, FIGSIZE, density_histogram, frontier_plot

PIXELS = (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))  # (height, width)


def check_png(path):
    assert path.exists() and path.stat().st_size > 1000
    image = mpimg.imread(path)
    assert image.shape[:2] == PIXELS
    assert image.std() > 0  # something was drawn


@pytest.mark.parametrize(
    "freqs",
    [
        torch.cat([torch.zeros(20), 10 ** (-4 * torch.rand(500))]),  # live and dead
        torch.zeros(64),  # all dead
        torch.full((8,), 0.5),  # one value
        torch.zeros(0),  # no latents
        [0.0, 1e-3, 1e-2],  # a plain list
    ],
    ids=["mixed", "all-dead", "constant", "empty", "list"],
)
def test_density_histogram(tmp_path, freqs):
    check_png(density_histogram(freqs, tmp_path / "sub" / "density.png"))


def test_frontier_plot(tmp_path):
    runs = [
        {"arch": "topk", "l0": 32, "fvu": 0.2, "ce_loss_recovered": 0.9},
        {"arch": "topk", "l0": 8, "fvu": 0.4, "ce_loss_recovered": 0.8},
        {"arch": "gated", "l0": 20, "fvu": 0.25, "ce_loss_recovered": 0.85},
    ]
    check_png(frontier_plot(runs, tmp_path / "fvu.png"))
    check_png(frontier_plot(runs, tmp_path / "ce.png", y="ce_loss_recovered"))


def test_frontier_plot_of_no_runs(tmp_path):
    check_png(frontier_plot([], tmp_path / "empty.png"))


def test_frontier_plot_names_a_missing_metric(tmp_path):
    with pytest.raises(ValueError, match="ce_loss_recovered"):
        frontier_plot(
            [{"arch": "topk", "l0": 4, "fvu": 0.1}], tmp_path / "x.png", y="ce_loss_recovered"
        )
