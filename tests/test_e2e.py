"""The whole `python -m flashsae.train` pipeline at tiny size, as `make train` runs it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flashsae.cache.models.subjects import get_subject
from flashsae.cache.shards import read_manifest
from flashsae.train.checkpoint import load_sae
from flashsae.train.metrics import METRIC_KEYS
from tests.helpers import run_cli

TINY = ["--model", "bytelm-tiny", "--tokens", "65536", "--batch-size", "1024"]
TINY += ["--eval-tokens", "4096", "--n-latents", "512", "--k", "16"]


def test_pipeline_end_to_end(tmp_path):
    first = run_cli("flashsae.train", *TINY, "--out", str(tmp_path / "run1"))
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(METRIC_KEYS) | {"tokens", "train_seconds"} <= set(metrics)
    assert metrics["l0"] <= 16 + 1e-9 and metrics["l0"] > 8
    assert 0 < metrics["fvu"] < 0.6
    assert abs(metrics["explained_variance"] - (1 - metrics["fvu"])) < 1e-9
    assert 0.5 < metrics["gamma"] < 1.5
    assert 0 <= metrics["dead_frac"] <= 0.5
    assert 0.3 < metrics["ce_loss_recovered"] <= 1.05
    assert metrics["kl"] >= 0
    assert metrics["tokens"] == 65536
    assert metrics["warnings"] == []  # zero-ablating the site costs the model > 0.1 nats

    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["arch"] == "topk" and cfg["n_latents"] == 512 and cfg["k"] == 16
    assert set(load_file(run / "sae.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["metrics/fvu"] == metrics["fvu"]
    assert any("losses/mse" in r for r in logged)
    assert "wandb sync" in first.stdout and list((run / "wandb").glob("offline-run-*"))

    # the checkpoint (normalization folded in) reconstructs raw activations as logged
    cache = next(
        line.split(": ", 1)[1] for line in first.stdout.splitlines() if "activation cache:" in line
    )
    manifest = read_manifest(cache)
    assert manifest["complete"] and manifest["total_rows"] >= 65536
    sae = load_sae(run)
    assert sae.cfg.input_scale == 1.0

    # a second run reuses the trained model and the cache
    second = run_cli("flashsae.train", *TINY, "--out", str(tmp_path / "run2"))
    assert second.returncode == 0, second.stderr
    assert "training bundled byte LM" not in second.stderr
    assert "capturing" not in second.stderr
    assert f"activation cache: {cache}" in second.stdout
    # same seed, same data: same SAE
    w1 = load_file(run / "sae.safetensors")["W_dec"]
    w2 = load_file(tmp_path / "run2" / "sae.safetensors")["W_dec"]
    torch.testing.assert_close(w1, w2)

    # and training from the cache directly
    third = run_cli("flashsae.train", *TINY, "--cache", cache, "--out", str(tmp_path / "run3"))
    assert third.returncode == 0, third.stderr
    assert get_subject("bytelm-tiny", 128).d_model == cfg["d"]


def test_eval_command_matches_the_training_run(tmp_path):
    run = tmp_path / "runs" / "a"
    trained = run_cli("flashsae.train", *TINY, "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    result = run_cli("flashsae.train.eval", str(run), "--tokens", "4096")
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((run / "eval.json").read_text())
    logged = json.loads((run / "metrics.json").read_text())
    assert list(evaluated) == [*METRIC_KEYS, "eval_data"]  # the metrics, then the data named
    assert evaluated["eval_data"] == logged["eval_data"] | {
        "tokens": evaluated["eval_data"]["tokens"]
    }
    assert evaluated["eval_data"]["name"] == "stdlib held-out"
    for key in METRIC_KEYS:  # the saved (folded) checkpoint reproduces the in-training numbers
        assert evaluated[key] == pytest.approx(logged[key], rel=1e-3, abs=1e-6), key
    assert "| fvu |" in (run / "eval.md").read_text()
    for png in (
        run / "density.png",
        run.parent / "frontier_fvu.png",
        run.parent / "frontier_ce.png",
    ):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run_cli("flashsae.train", "--resume", str(run))
    assert again.returncode == 2 and "finished run" in again.stderr
    bad = run_cli("flashsae.train.eval", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "no cfg.json" in bad.stderr
