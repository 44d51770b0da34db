"""bf16 training (autocast, fp32 master weights) against fp32; the training step's host syncs."""

import json
import sys

import pytest
import torch

from flashsae.train import RunConfig, run
from flashsae.train.config import lambda_archs
from flashsae.train.sae import SAE_CLASSES, make_sae
from flashsae.train.trainer import TrainConfig, train_sae
from flashsae.train.wandb_log import NullLogger

# Tensor methods that wait for the device (each is a host sync on CUDA). torch.optim's calls are
# not counted: Adam reads its step counters, which live on the host, with .item().
SYNCING = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "cpu", "numpy")


def test_bf16_and_fp32_runs_reach_the_same_fvu(fast_cpu, tmp_path):
    metrics = {}
    for dtype in ("fp32", "bf16"):
        cfg = RunConfig(
            model="bytelm-tiny", tokens=65536, batch_size=1024, eval_tokens=4096, n_latents=512,
            k=16, dtype=dtype, out=tmp_path / dtype,
        )  # fmt: skip
        metrics[dtype] = run(cfg)
    assert RunConfig.load(tmp_path / "bf16" / "config.json").dtype == "bf16"
    assert json.loads((tmp_path / "bf16" / "cfg.json").read_text())["train_dtype"] == "bf16"
    fp32, bf16 = metrics["fp32"]["fvu"], metrics["bf16"]["fvu"]
    assert fp32 < 0.6 and abs(bf16 - fp32) <= 0.05 * fp32, (fp32, bf16)


class _Stream:
    def __init__(self, d):
        self.d = d

    def batches(self, start=0):
        gen = torch.Generator().manual_seed(start)
        while True:
            yield torch.randn(64, self.d, generator=gen) + 0.5


def _count_syncs(monkeypatch, arch, steps, target_l0=None):
    torch.manual_seed(0)
    d = 16
    sae = make_sae(arch, 64, torch.full((d,), 0.5), float(d) * 1.25, k=4, sparsity_coeff=0.1)
    counts = {"n": 0}
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if "torch/optim" not in sys._getframe(1).f_code.co_filename:
                counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = TrainConfig(
        tokens=64 * steps, batch_size=64, dead_window=128, log_every=10**6, target_l0=target_l0
    )
    train_sae(sae, _Stream(d), cfg, NullLogger())
    monkeypatch.undo()
    return counts["n"]


@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
def test_a_training_step_has_no_host_sync_outside_logging(fast_cpu, monkeypatch, arch):
    """Only the logging steps (here the first and the last) sync: more steps, no more syncs.
    The dead window is short, so dead latents (AuxK) appear during the run."""
    few, many = _count_syncs(monkeypatch, arch, 4), _count_syncs(monkeypatch, arch, 12)
    assert few > 0 and many == few, (few, many)


@pytest.mark.parametrize("arch", lambda_archs())
def test_the_l0_controller_adds_no_host_sync_outside_logging(fast_cpu, monkeypatch, arch):
    """--target-l0: the running L0 and λ stay on the device; only logging steps read them."""
    few = _count_syncs(monkeypatch, arch, 4, target_l0=8.0)
    many = _count_syncs(monkeypatch, arch, 12, target_l0=8.0)
    assert few > 0 and many == few, (few, many)


@pytest.mark.gpu
def test_a_cuda_training_step_does_not_sync():
    """On a GPU, torch itself reports synchronizing calls (set_sync_debug_mode) as errors."""
    torch.manual_seed(0)
    d = 64
    for arch in sorted(SAE_CLASSES):
        sae = make_sae(arch, 256, torch.zeros(d), float(d), k=8).cuda()
        x = torch.randn(512, d, device="cuda")
        dead = torch.rand(256, device="cuda") < 0.3
        sae.dead_budget = 128
        opt = torch.optim.Adam(sae.parameters(), fused=True)
        for _ in range(2):  # the first step compiles
            torch.cuda.set_sync_debug_mode("error" if _ else "default")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _parts, _fired = sae.training_loss(x, dead, 0.5)
            loss.backward()
            sae.before_step()
            opt.step()
            sae.after_step()
            torch.cuda.set_sync_debug_mode("default")
