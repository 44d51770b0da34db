"""--target-l0: λ steered during training so that the run ends at the L0 asked for."""

import json

import pytest
import torch

from flashsae.cache.errors import UserError
from flashsae.train import RunConfig
from flashsae.train.__main__ import parse_args
from flashsae.train.sweep import grid, member_names, run_sweep
from flashsae.train.target_l0 import L0Controller

TARGETS = (10.0, 30.0, 100.0)


def test_three_targets_land_within_ten_percent_of_the_held_out_l0(fast_cpu, tmp_path):
    """One sweep on the bundled tiny model (256 steps), the Gated SAE at three targets: each
    ends within 10% of its target on held-out text, with its final λ in cfg.json and metrics."""
    argv = ["--model", "bytelm-tiny", "--arch", "gated", "--target-l0", "10,30,100"]
    argv += ["--tokens", "262144", "--batch-size", "1024", "--n-latents", "512"]
    argv += ["--eval-tokens", "8192", "--out", str(tmp_path / "sweep")]
    args = parse_args(argv)
    assert args.target_l0 == list(TARGETS)
    base = RunConfig(**{k: v for k, v in vars(args).items() if k not in ("sweep", "resume")}
                     | {"target_l0": None})  # fmt: skip
    results = run_sweep(grid(base, {"target_l0": args.target_l0}))
    lambdas = []
    for target, metrics in zip(TARGETS, results, strict=True):
        assert metrics["l0"] == pytest.approx(target, rel=0.1), (target, metrics["l0"])
        assert metrics["target_l0"] == target and not metrics["warnings"]
        folder = tmp_path / "sweep" / f"target{target}"
        assert (
            json.loads((folder / "cfg.json").read_text())["sparsity_coeff"]
            == (metrics["sparsity_coeff"])
        )
        assert RunConfig.load(folder / "config.json").target_l0 == target
        lambdas.append(metrics["sparsity_coeff"])
    assert lambdas[0] > lambdas[1] > lambdas[2] > 0  # fewer latents take a larger λ


def test_target_l0_is_refused_where_there_is_no_lambda():
    with pytest.raises(UserError, match="--arch topk has none: its L0 is set by --k"):
        RunConfig(arch="topk", target_l0=10).check()
    with pytest.raises(UserError, match="must be a positive number"):
        RunConfig(arch="relu", target_l0=-1).check()
    with pytest.raises(UserError, match="not below --n-latents"):
        RunConfig(arch="relu", target_l0=64, n_latents=64).check()
    members = grid(RunConfig(arch="jumprelu"), {"target_l0": [10.0, 30.0]})
    assert member_names(members) == ["target10.0", "target30.0"]


def test_the_controller_settles_on_a_lagging_power_law():
    """A plant whose L0 follows 40 λ^(-1/2) with a lag of 20 steps: the controller brings the
    running L0 to the target from above and below, with no host sync (plain tensor ops)."""
    for target, coeff in ((10.0, 0.5), (80.0, 8.0)):
        ctrl = L0Controller(target, coeff, torch.device("cpu"))
        l0 = torch.tensor(40 * coeff**-0.5)
        for _ in range(1000):
            l0 = l0 + (40 * ctrl.coeff() ** -0.5 - l0) / 20
            ctrl.update(l0)
        assert float(ctrl.running_l0) == pytest.approx(target, rel=0.02)
        assert float(ctrl.coeff()) == pytest.approx((40 / target) ** 2, rel=0.05)
