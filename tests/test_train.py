"""Trainer resume, W&B logging, checkpoints, and evaluation against trivial SAEs."""

import json

import pytest
import torch

from flashsae.cache.errors import UserError
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.models.bytelm import BOS, ByteLM, ByteLMConfig
from flashsae.cache.shards import ShardWriter
from flashsae.train import wandb_log
from flashsae.train.checkpoint import load_sae, save_sae
from flashsae.train.eval import evaluate
from flashsae.train.gated import GatedSAE
from flashsae.train.sae import SAE, SAEConfig
from flashsae.train.topk import TopKSAE
from flashsae.train.trainer import TrainConfig, train_sae


@pytest.fixture(autouse=True)
def fast_cpu_kernels(monkeypatch):
    """Train on the torch reference path, not the Triton interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def tiny_cache(folder, rows=2000, d=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=g) @ torch.randn(d, d, generator=g) + 1
    w = ShardWriter(folder, {"model": "m", "sites": ["s"], "d": d, "dtype": "float32"}, 300)
    i = torch.arange(rows)
    w.add({"s": x}, {"tokens": i, "doc": i, "pos": i, "seq": i})
    w.finish()
    return folder


class Interrupt:
    """A logger that stops training (like Ctrl-C) once ``at`` tokens have been logged."""

    def __init__(self, at=None):
        self.at, self.records = at, []

    def log(self, record, step):
        self.records.append((step, record))
        if self.at is not None and step >= self.at:
            raise KeyboardInterrupt


def train(folder, state, logger, tokens=64 * 20, target_l0=None):
    """A TopK SAE trained on the cache in ``folder``; with ``target_l0``, a Gated SAE whose λ
    the L0 controller steers."""
    torch.manual_seed(0)
    if target_l0 is None:
        sae = TopKSAE(SAEConfig("topk", 16, 64, k=4, k_aux=8))
    else:
        sae = GatedSAE(SAEConfig("gated", 16, 64, sparsity_coeff=1.0))
    loader = ActivationLoader(folder, "s", 64, seed=1, buffer_shards=2)
    cfg = TrainConfig(
        tokens=tokens, batch_size=64, lr=3e-3, log_every=1, checkpoint_every=3,
        target_l0=target_l0,
    )  # fmt: skip
    train_sae(sae, loader, cfg, logger, state)
    return sae


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    cache = tiny_cache(tmp_path / "cache")
    # 20 steps over 2000 rows / 64 = 31 batches per epoch; use 2 epochs' worth to cross one
    whole = train(cache, tmp_path / "a.pt", Interrupt(), tokens=64 * 40)
    with pytest.raises(KeyboardInterrupt):
        train(cache, tmp_path / "b.pt", Interrupt(at=64 * 35), tokens=64 * 40)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 33
    resumed_log = Interrupt()
    resumed = train(cache, tmp_path / "b.pt", resumed_log, tokens=64 * 40)
    assert resumed_log.records[0][0] == 64 * 34  # continued at step 33
    for name, p in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, rtol=0, atol=0, msg=name)


def test_a_resumed_run_with_a_target_l0_ends_with_the_same_weights_and_lambda(tmp_path):
    """The L0 controller's state (running L0, integral) is part of the training state."""
    cache = tiny_cache(tmp_path / "cache")
    whole = train(cache, tmp_path / "a.pt", Interrupt(), tokens=64 * 40, target_l0=8.0)
    with pytest.raises(KeyboardInterrupt):
        train(cache, tmp_path / "b.pt", Interrupt(at=64 * 35), tokens=64 * 40, target_l0=8.0)
    resumed = train(cache, tmp_path / "b.pt", Interrupt(), tokens=64 * 40, target_l0=8.0)
    assert resumed.cfg.sparsity_coeff == whole.cfg.sparsity_coeff != 1.0
    for name, p in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], p, rtol=0, atol=0, msg=name)


def test_loader_resume_position(tmp_path):
    cache = tiny_cache(tmp_path / "cache")
    loader = ActivationLoader(cache, "s", 64, seed=1, buffer_shards=2)
    assert loader.batches_per_epoch(0) == len(list(loader.epoch_batches(0)))
    full = loader.batches()
    first = [next(full) for _ in range(45)]
    later = loader.batches(start=40)
    for expect in first[40:]:
        torch.testing.assert_close(next(later), expect)


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logs, self.artifacts, self.summary = kwargs, [], [], {}
        self.id, self.project, self.dir = "abc123", kwargs["project"], str(kwargs["dir"]) + "/x/f"
        self.settings = type("S", (), {"mode": kwargs["mode"]})()

    def log(self, record, step=None):
        self.logs.append((step, record))

    def log_artifact(self, art):
        self.artifacts.append(art)

    def finish(self):
        pass


def test_wandb_names_steps_config_and_artifact(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(
        wandb_log._wandb(), "init", lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    from flashsae.train.__main__ import main

    out = tmp_path / "run"
    args = ["--model", "bytelm-tiny", "--tokens", "16384", "--batch-size", "1024", "--k", "8"]
    assert main([*args, "--n-latents", "256", "--eval-tokens", "1024", "--out", str(out)]) == 0
    (run,) = runs
    assert run.init["config"]["k"] == 8 and run.init["config"]["n_latents"] == 256
    steps = [s for s, _ in run.logs]
    assert steps == sorted(steps) and steps[-1] == 16384  # steps count tokens
    keys = {k for _, r in run.logs for k in r}
    for group in ("losses/", "metrics/", "sparsity/", "perf/", "details/"):
        assert any(k.startswith(group) for k in keys), group
    assert {"losses/mse", "losses/aux", "metrics/fvu", "metrics/gamma", "details/lr"} <= keys
    assert "sparsity/log10_firing_freq" in keys and "perf/tokens_per_s" in keys
    assert run.summary["fvu"] == json.loads((out / "metrics.json").read_text())["fvu"]
    (art,) = run.artifacts
    assert art.type == "model" and {"sae.safetensors", "metrics.json"} <= set(art.manifest.entries)
    mirror = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mirror] == steps[: len(mirror)]
    assert json.loads((out / "wandb_run.json").read_text())["id"] == "abc123"


def test_disabled_wandb_still_writes_the_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(wandb_log._wandb(), "init", lambda **kw: pytest.fail("W&B was started"))
    logger = wandb_log.RunLogger(tmp_path, {}, "x")
    logger.log({"losses/mse": 0.5}, step=10)
    logger.finish()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 10, "losses/mse": 0.5}


class Scaled(SAE):
    """x̂ = c·x exactly: f = x (n = d latents), W_dec = c·I."""

    def __init__(self, d, c, site):
        super().__init__(SAEConfig("scaled", d, d, site=site))
        with torch.no_grad():
            self.W_dec.copy_(c * torch.eye(d))

    def encode(self, x):
        return x


def test_trivial_saes_give_known_metrics():
    torch.manual_seed(0)
    model = ByteLM(ByteLMConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)).eval()
    seqs = torch.randint(0, 256, (8, 16))
    seqs[:, 0] = BOS
    site = "blocks.0.hook_resid_post"
    exact, _ = evaluate(Scaled(32, 1.0, site), model, seqs)
    assert exact["fvu"] == pytest.approx(0, abs=1e-10) and exact["gamma"] == pytest.approx(1)
    assert exact["ce_loss_recovered"] == pytest.approx(1) and exact["kl"] == pytest.approx(
        0, abs=1e-9
    )
    half, _ = evaluate(Scaled(32, 0.5, site), model, seqs)
    assert half["gamma"] == pytest.approx(0.5) and half["ce_loss_recovered"] < 1


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig("topk", 16, 64, k=4, k_aux=8, input_scale=3.0))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    save_sae(sae, tmp_path)
    loaded = load_sae(tmp_path)
    x = torch.randn(32, 16)
    torch.testing.assert_close(loaded(x), sae(x * 3.0) / 3.0, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["normalization"] == {"scale": 3.0, "folded": True} and "flashsae_version" in cfg
    del cfg["n_latents"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="n_latents"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_sae(tmp_path)
    with pytest.raises(UserError, match="no cfg.json"):
        load_sae(tmp_path / "nothing")


def test_topk_step_is_the_same_on_the_kernel_and_torch_paths(monkeypatch):
    """One TopK training step (with AuxK) through the Triton kernels (interpreter) and the
    torch references: same loss, same gradients, same fired latents."""
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig("topk", 24, 96, k=6, k_aux=12))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(40, 24)
    dead = torch.rand(96) < 0.3
    results = []
    for interpret in ("1", None):
        if interpret:
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        sae.zero_grad()
        loss, parts, fired = sae.training_loss(x, dead, 0.5)
        loss.backward()
        results.append((loss, parts["aux"], fired, [p.grad.clone() for p in sae.parameters()]))
    (loss_k, aux_k, fired_k, grads_k), (loss_t, aux_t, fired_t, grads_t) = results
    assert aux_t > 0
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_k, aux_t, rtol=1e-5, atol=1e-6)
    assert torch.equal(fired_k, fired_t)
    for g_k, g_t in zip(grads_k, grads_t, strict=True):
        torch.testing.assert_close(g_k, g_t, rtol=1e-4, atol=1e-6)
