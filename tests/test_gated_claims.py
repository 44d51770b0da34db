"""bench/gated_claims.py: the --quick smoke run writes the claims table, the run table, the JSON
lines and the plots; verdicts follow from the numbers (synthetic records)."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gated_claims  # noqa: E402

VERDICT = re.compile(r"holds|does not hold|holds only from [\d,]+ tokens on|not testable")


def test_quick_run_writes_the_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # torch reference kernels: fast
    gated_claims.main(["--quick", "--out", str(tmp_path), "--tag", "gc"])
    args = gated_claims.parse(["--quick"])
    todo = gated_claims.plan(args)
    assert {a for a, *_ in todo} == set(gated_claims.ARCHS)
    lines = (tmp_path / "gc.jsonl").read_text().splitlines()
    assert len(lines) == len(todo) == 2 * 2 * (5 + 2)
    records = [json.loads(line) for line in lines]
    for r, (arch, lam, seed, tokens) in zip(records, todo, strict=True):
        assert (r["arch"], r["sparsity_coeff"], r["seed"], r["tokens"]) == (arch, lam, seed, tokens)
        assert {"l0", "fvu", "ce_loss_recovered", "gamma", "l2_ratio"} <= r.keys()
        assert r["curve"] and r["curve"][-1][0] == tokens  # the last point: the whole budget
    rs = [r for r in records if r["arch"] == "rescale_shift"]
    assert all(r["relu_tokens"] + 1024 == r["tokens"] == 4096 for r in rs)  # equal budget
    md = (tmp_path / "gc.md").read_text()
    assert "quick smoke run (--quick), not the default configuration" in md
    assert "`python bench/gated_claims.py --quick --out" in md
    rows = [line for line in md.splitlines() if re.match(r"\| [1-6] \|", line)]
    assert len(rows) == len(gated_claims.CLAIMS) == 6
    for row in rows:
        verdict = row.rstrip(" |").rsplit("**", 2)[-2]
        assert VERDICT.fullmatch(verdict), row
    assert md.count("| gated_sigmoid |") == 4 and md.count("| relu |") == 8
    for suffix in ("fvu", "ce", "gamma", "l0_train", "loss"):
        png = tmp_path / f"gc.{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", suffix


def _run(arch, lam, l0, fvu, seed=0, tokens=100, gamma=1.0, l2=0.9):
    curve = [[tokens, 1.0, 1.0, l0]]
    return {"arch": arch, "sparsity_coeff": lam, "seed": seed, "tokens": tokens, "l0": l0,
            "fvu": fvu, "gamma": gamma, "l2_ratio": l2, "curve": curve}  # fmt: skip


def _frontier(arch, offset, seed=0, tokens=100, gamma=1.0):
    """FVU = 1/L0 + offset at L0 8, 20, 50, 120 (λ 8, 4, 2, 1)."""
    return [
        _run(arch, lam, l0, 1 / l0 + offset, seed, tokens, gamma)
        for lam, l0 in ((8, 8), (4, 20), (2, 50), (1, 120))
    ]


@pytest.mark.parametrize("gated_offset, holds", [(-0.01, True), (0.01, False)])
def test_pareto_claim_follows_the_frontiers(gated_offset, holds):
    records = []
    for seed in (0, 1):
        records += _frontier("relu", 0.0, seed) + _frontier("gated", gated_offset, seed)
    ok, text = gated_claims.claim_pareto(records, 100, [0, 1])
    assert ok is holds
    assert f"{-gated_offset:+.4f}" in text and "L0 10-100" in text


def test_shrinkage_claim_needs_falling_relu_gamma():
    gated = _frontier("gated", 0.0, gamma=1.01)
    relu = [_run("relu", lam, 10, 0.1, gamma=g) for lam, g in ((1, 0.95), (2, 0.9), (4, 0.85))]
    assert gated_claims.claim_shrinkage(gated + relu, 100, [0])[0] is True
    relu[2]["gamma"] = 0.97  # no longer falling
    assert gated_claims.claim_shrinkage(gated + relu, 100, [0])[0] is False
    gated[0]["gamma"] = 0.97  # Gated shrinks
    relu[2]["gamma"] = 0.85
    assert gated_claims.claim_shrinkage(gated + relu, 100, [0])[0] is False


def test_rescale_shift_claim_needs_the_frontier_between():
    base = _frontier("relu", 0.02) + _frontier("gated", 0.0)
    assert gated_claims.claim_rescale_shift(base + _frontier("rescale_shift", 0.01), 100, [0])[0]
    assert not gated_claims.claim_rescale_shift(base + _frontier("rescale_shift", -0.01), 100, [0])[
        0
    ]


def test_verdict_across_budgets():
    assert gated_claims.verdict({1: True, 2: True}) == "holds"
    assert gated_claims.verdict({1: False, 2: True, 3: True}) == "holds only from 2 tokens on"
    assert gated_claims.verdict({1: True, 2: False}) == "does not hold"
    assert gated_claims.verdict({1: True, 2: None}) == "not testable"


def test_no_aux_claim_compares_l0_with_gated():
    gated = [_run("gated", 1, 40, 0.1)]
    assert gated_claims.claim_no_aux(gated + [_run("gated_noaux", 1, 2, 0.5)], 100, [0])[0]
    assert not gated_claims.claim_no_aux(gated + [_run("gated_noaux", 1, 30, 0.1)], 100, [0])[0]
