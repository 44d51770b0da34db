"""Test setup: the Triton interpreter on machines without CUDA, and GPU-test skipping.

TRITON_INTERPRET must be set before any ``@triton.jit`` runs, i.e. before
``flashsae.kernels`` is imported, which is why it happens at conftest import time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test's models and W&B files out of the user's home."""
    home = tmp_path_factory.getbasetemp() / "flashsae_home"
    monkeypatch.setenv("FLASHSAE_HOME", str(home))
    monkeypatch.setenv("WANDB_DIR", str(home))


@pytest.fixture
def fast_cpu(monkeypatch):
    """Train on the torch reference path, not the Triton interpreter; no W&B."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
