"""Mistakes a user can make get one line on stderr, exit code 2, and nothing presented as done."""

import pytest
import torch

from tests.helpers import run_cli

BASE = [
    "--model",
    "bytelm-tiny",
    "--tokens",
    "8192",
    "--batch-size",
    "1024",
    "--eval-tokens",
    "1024",
]

CASES = {
    "unknown site": (["--site", "blocks.9.hook_resid_post"], "unknown site"),
    "misspelt site": (["--site", "blocks.0.resid_post"], "unknown site"),
    "missing model": (["--model", "./no/such/model"], "model"),
    "k above n_latents": (["--n-latents", "64", "--k", "65"], "larger than"),
    "zero tokens": (["--tokens", "0"], "--tokens must be positive"),
    "missing cache": (["--cache", "/no/such/cache"], "does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path):
    extra, needle = CASES[case]
    out = tmp_path / "run"
    result = run_cli("flashsae.train", *BASE, *extra, "--out", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
    assert not (out / "metrics.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(tmp_path):
    result = run_cli("flashsae.train", *BASE, "--device", "cuda", "--out", str(tmp_path / "r"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device cuda")
