"""SAELens export: layout, key names, equivalence with the SAELens equations, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flashsae.cache.errors import UserError
from flashsae.train.checkpoint import save_sae
from flashsae.train.export import (
    SAELENS_FORMAT_VERSION,
    export_saelens,
    hook_layer,
    to_saelens,
)
from flashsae.train.sae import SAE_CLASSES, SAEConfig
from flashsae.train.synthetic import SyntheticActivations, SyntheticConfig, SyntheticStream
from flashsae.train.topk import TopKSAE
from flashsae.train.trainer import TrainConfig, train_sae
from flashsae.train.wandb_log import RunLogger

D, N, K = 16, 64, 4


def saelens_encode(cfg, w, x):
    """SAELens 6.x ``encode`` of each architecture, from its source, in plain torch."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"] > 0).float()
        return gate * torch.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    hidden_pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        vals, idx = hidden_pre.topk(cfg["k"], dim=-1, sorted=False)
        return torch.zeros_like(hidden_pre).scatter(-1, idx, vals.relu())
    if arch == "jumprelu":
        return torch.relu(hidden_pre) * (hidden_pre > w["threshold"]).float()
    assert arch == "standard"
    return torch.relu(hidden_pre)


def read_export(folder):
    return json.loads((folder / "cfg.json").read_text()), load_file(
        folder / "sae_weights.safetensors"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TopK SAE trained briefly (CPU reference kernels) with a non-trivial input scale."""
    torch.manual_seed(0)
    data = SyntheticActivations(SyntheticConfig(d=D, n_features=32, mean_active=3.0))
    cfg = SAEConfig(
        "topk", D, N, K, k_aux=8, site="blocks.3.hook_resid_post", model="bytelm", input_scale=2.5
    )
    sae = TopKSAE(cfg)
    folder = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)  # fast torch reference kernels
        mp.setenv("WANDB_MODE", "disabled")
        logger = RunLogger(folder, {}, "export")
        stream = SyntheticStream(data, 64, seed=1)
        train_sae(sae, stream, TrainConfig(tokens=64 * 20, batch_size=64), logger)
        logger.finish()
    save_sae(sae, folder)
    return sae.eval(), folder, data


def test_topk_export_matches_the_saelens_equations(trained, tmp_path):
    sae, folder, data = trained
    out = export_saelens(folder, tmp_path / "saelens", context_size=128)
    cfg, w = read_export(out)
    x = data.sample(32, torch.Generator().manual_seed(9))[0] * 3.0 + 0.5  # raw activations
    s = sae.cfg.input_scale
    with torch.no_grad():
        f_ref = sae.encode(x * s)
        x_hat_ref = sae.decode(f_ref) / s
    f = saelens_encode(cfg, w, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)
    assert ((f > 0).sum(1) <= K).all() and (f > 0).any()
    torch.testing.assert_close(f @ w["W_dec"] + w["b_dec"], x_hat_ref, rtol=1e-4, atol=1e-5)


def test_topk_export_layout_and_config(trained, tmp_path):
    sae, folder, _ = trained
    out = export_saelens(folder, tmp_path / "saelens", context_size=128)
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg, w = read_export(out)
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        "W_enc": (D, N),
        "b_enc": (N,),
        "W_dec": (N, D),
        "b_dec": (D,),
    }
    assert all(v.dtype == torch.float32 for v in w.values())
    assert cfg | {"metadata": None} == {
        "d_in": D,
        "d_sae": N,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": "topk",
        "k": K,
        "rescale_acts_by_decoder_norm": False,
        "metadata": None,
    }
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["hook_layer"] == 3
    assert meta["model_name"] == "bytelm" and meta["context_size"] == 128
    assert meta["hook_head_index"] is None
    assert meta["sae_lens_version"] == SAELENS_FORMAT_VERSION


def random_params(arch, d=8, n=24):
    """Plain tensors with the names and shapes of ``arch``'s checkpoint."""
    g = torch.Generator().manual_seed(0)
    shapes = {"W_enc": (d, n), "W_dec": (n, d), "b_dec": (d,)}
    if SAE_CLASSES[arch].saelens.scalar_threshold:
        shapes["threshold"] = ()
    return {
        name: torch.randn(shapes.get(name, (n,)), generator=g)
        for name in SAE_CLASSES[arch].saelens.tensors
    }


def randomized(arch, input_scale=2.0):
    """A flashsae ``arch`` SAE (d=8, n=24) with every parameter and buffer random, θ in
    [0.05, 0.5]."""
    torch.manual_seed(0)
    sae = SAE_CLASSES[arch](SAEConfig(arch, 8, 24, k=4, k_aux=4, input_scale=input_scale))
    with torch.no_grad():
        for name, t in [*sae.named_parameters(), *sae.named_buffers()]:
            if name == "log_threshold":
                t.copy_(torch.empty_like(t).uniform_(0.05, 0.5).log())
            elif name == "threshold":
                t.fill_(0.2)
            else:
                t.normal_(0, 0.5)
    return sae.eval()


EXPORTABLE = sorted(a for a, cls in SAE_CLASSES.items() if cls.saelens is not None)


def test_an_architecture_without_a_saelens_equivalent_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert SAE_CLASSES["gated_sigmoid"].saelens is None
    sae = randomized("gated_sigmoid")
    save_sae(sae, tmp_path / "run")
    for source in (tmp_path / "run", sae):
        with pytest.raises(UserError, match="gated_sigmoid SAE has no SAELens equivalent"):
            export_saelens(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", EXPORTABLE)
def test_every_architecture_exports_the_same_function(arch, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # torch reference kernels
    sae = randomized(arch)
    save_sae(sae, tmp_path / "run")
    cfg, w = read_export(export_saelens(tmp_path / "run", tmp_path / "out"))
    cfg_m, w_m = read_export(export_saelens(sae, tmp_path / "out_module"))
    assert cfg == cfg_m and w.keys() == w_m.keys()
    assert cfg["architecture"] == SAE_CLASSES[arch].saelens.architecture
    assert {k: tuple(v.shape) for k, v in w.items()} == {
        name: {"W_enc": (8, 24), "W_dec": (24, 8), "b_dec": (8,)}.get(name, (24,))
        for name in SAE_CLASSES[arch].saelens.tensors
    }
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))  # raw activations
    s = sae.cfg.input_scale
    with torch.no_grad():
        f_ref = sae.encode(x * s)
        x_hat_ref = sae.decode(f_ref) / s
    f = saelens_encode(cfg, w, x)
    assert 0 < (f > 0).float().mean() < 1
    torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f @ w["W_dec"] + w["b_dec"], x_hat_ref, rtol=1e-4, atol=1e-5)
    for name in w:
        torch.testing.assert_close(w[name], w_m[name], rtol=1e-6, atol=0)


def test_hook_layer():
    assert hook_layer("blocks.12.hook_resid_pre") == 12
    assert hook_layer("transformer.h.6") is None and hook_layer("") is None


@pytest.mark.parametrize(
    "arch, change, message",
    [
        ("mystery", {}, "cannot export arch 'mystery'"),
        ("topk", {"drop": "b_enc"}, "missing \\['b_enc'\\]"),
        ("topk", {"add": "threshold"}, "extra \\['threshold'\\]"),
        ("jumprelu", {"shape": ("threshold", (3,))}, "threshold has shape \\(3,\\)"),
        (
            "batchtopk",
            {"shape": ("threshold", (24,))},
            "threshold has shape \\(24,\\), expected \\(\\)",
        ),
        (
            "relu",
            {"shape": ("W_enc", (24, 8))},
            "W_enc has shape \\(24, 8\\), expected \\(8, 24\\)",
        ),
    ],
)
def test_malformed_parameters_raise_user_errors(arch, change, message):
    params = random_params("topk" if arch == "mystery" else arch)
    if "drop" in change:
        del params[change["drop"]]
    if "add" in change:
        params[change["add"]] = torch.zeros(24)
    if "shape" in change:
        name, shape = change["shape"]
        params[name] = torch.zeros(shape)
    with pytest.raises(UserError, match=message):
        to_saelens(arch, params, k=4)


@pytest.mark.parametrize("k", [None, 0, 25])
def test_topk_needs_a_valid_k(k):
    with pytest.raises(UserError, match="0 < k <= 24"):
        to_saelens("topk", random_params("topk"), k=k)


FULL_CFG = '{"arch": "topk", "d": 8, "n_latents": 16, "k": 4}'


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "has no cfg.json"),
        ({"cfg.json": "{not json"}, "not valid JSON"),
        ({"cfg.json": '{"d": 8}'}, "lacks the key 'arch'"),
        ({"cfg.json": '{"arch": "topk", "k": 4}'}, "lacks the key 'd'"),
        ({"cfg.json": '{"arch": "nope", "d": 8, "n_latents": 4}'}, "unknown arch"),
        ({"cfg.json": FULL_CFG}, "cannot load"),
        ({"cfg.json": FULL_CFG, "sae.safetensors": "garbage"}, "cannot load"),
    ],
)
def test_malformed_checkpoints_raise_user_errors(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=message):
        export_saelens(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_command(tmp_path, capsys):
    from flashsae.train.checkpoint import save_sae
    from flashsae.train.export import main
    from flashsae.train.sae import SAEConfig
    from flashsae.train.topk import TopKSAE

    save_sae(
        TopKSAE(SAEConfig("topk", 8, 16, k=4, k_aux=4, site="blocks.1.hook_resid_post")),
        tmp_path / "run",
    )
    assert main([str(tmp_path / "run"), str(tmp_path / "out"), "--context-size", "128"]) == 0
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["context_size"] == 128
    assert (tmp_path / "out" / "sae_weights.safetensors").exists()
    assert main([str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "no cfg.json" in capsys.readouterr().err
