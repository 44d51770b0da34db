"""An architecture defined here, in one class, goes through every public entry point: the training
pipeline (``run``), the command line's choices, evaluation, checkpoints and the SAELens export,
with no other file touched."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flashsae.train import RunConfig, load_sae, run
from flashsae.train import eval as eval_cli
from flashsae.train import export as export_cli
from flashsae.train.__main__ import parse_args
from flashsae.train.sae import SAE, SAE_CLASSES, SAEConfig, SAELensLayout, register, warmed_up

ARCH = "tied_relu_test"


class TiedReLUSAE(SAE):
    """f = ReLU((x - b_dec) W_enc + b_enc), loss = ||x - x̂||² + λ ||f||₁."""

    saelens = SAELensLayout("standard", ("W_enc", "b_enc", "W_dec", "b_dec"), True)
    default_sparsity_coeff = 0.05

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))

    def encode(self, x):
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc).relu()

    def training_loss(self, x, dead_mask, progress):
        f = self.encode(x)
        mse = (x - self.decode(f)).square().sum(1).mean()
        l1 = f.sum(1).mean()
        loss = mse + warmed_up(self.cfg.sparsity_coeff, progress) * l1
        return loss, {"mse": mse.detach(), "l1": l1.detach()}, (f > 0).any(0)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    register(ARCH)(TiedReLUSAE)
    yield TiedReLUSAE
    del SAE_CLASSES[ARCH]


def test_an_architecture_defined_in_one_class_trains_evaluates_saves_and_exports(
    registered, tmp_path
):
    assert parse_args(["--arch", ARCH]).arch == ARCH  # the CLI's choices come from the registry
    out = tmp_path / "runs" / "custom"
    cfg = RunConfig(
        model="bytelm-tiny", arch=ARCH, n_latents=256, tokens=16384, batch_size=1024,
        eval_tokens=2048, out=out,
    )  # fmt: skip
    metrics = run(cfg)
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] > 0
    saved = json.loads((out / "cfg.json").read_text())
    assert saved["arch"] == ARCH and saved["sparsity_coeff"] == TiedReLUSAE.default_sparsity_coeff
    assert RunConfig.load(out / "config.json").arch == ARCH

    sae = load_sae(out)
    assert type(sae) is TiedReLUSAE and sae.cfg.input_scale == 1.0

    assert eval_cli.main([str(out), "--tokens", "2048"]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["fvu"] == pytest.approx(metrics["fvu"], rel=1e-3)

    assert export_cli.main([str(out), str(tmp_path / "saelens")]) == 0
    exported = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert exported["architecture"] == "standard" and exported["apply_b_dec_to_input"] is True
    weights = load_file(tmp_path / "saelens" / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    torch.testing.assert_close(weights["W_dec"], sae.W_dec.detach())


def test_registering_a_second_class_under_a_taken_name_fails(registered):
    with pytest.raises(ValueError, match="registered twice"):
        register(ARCH)(type("Other", (TiedReLUSAE,), {}))
