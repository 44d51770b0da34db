"""The bundled model's sites, capture by hooks, early stopping, and cache building/resume."""

import pytest
import torch
from safetensors import safe_open

from flashsae.cache.build import build_cache
from flashsae.cache.errors import UserError
from flashsae.cache.hooks import capture, resolve_site, splice
from flashsae.cache.models.bytelm import BOS, ByteLM, ByteLMConfig, corpus, stdlib_files, windows
from flashsae.cache.shards import ShardWriter, load_shard
from flashsae.cache.text import Packed

CFG = ByteLMConfig(n_layer=3, d_model=32, n_head=2, seq_len=16)


def manual_residuals(model, tokens):
    """resid_post of every block, computed without hooks."""
    x = model.embed(tokens) + model.pos(torch.arange(tokens.shape[1]))
    out = []
    for b in model.blocks:
        x = x + b.attn(b.ln1(x))
        x = x + b.fc_out(torch.nn.functional.gelu(b.fc(b.ln2(x))))
        out.append(x)
    return out


def test_sites_match_a_manual_forward():
    torch.manual_seed(0)
    model = ByteLM(CFG).eval()
    tokens = torch.randint(0, 256, (3, 16))
    sites = ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    acts = capture(model, tokens, sites)
    ref = manual_residuals(model, tokens)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], ref[0])
    torch.testing.assert_close(acts["blocks.2.hook_resid_post"], ref[2])
    mid = capture(model, tokens, ["blocks.1.hook_resid_mid"])["blocks.1.hook_resid_mid"]
    torch.testing.assert_close(mid + acts["blocks.1.hook_mlp_out"], ref[1])


def test_forward_stops_after_the_last_needed_site():
    model = ByteLM(CFG).eval()
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    model.unembed.register_forward_pre_hook(lambda m, a: ran.append("unembed"))
    capture(model, torch.randint(0, 256, (2, 16)), ["blocks.1.hook_attn_out"])
    assert ran == [0, 1]


def test_unknown_site_names_the_valid_ones():
    with pytest.raises(UserError, match=r"blocks\.\{0\.\.2\}"):
        resolve_site(ByteLM(CFG), "blocks.3.hook_resid_post")


def test_splice_replaces_the_site_output():
    model = ByteLM(CFG).eval()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        clean = model(tokens)
        with splice(model, "blocks.2.hook_resid_post", lambda h: h):
            same = model(tokens)
        with splice(model, "blocks.2.hook_resid_post", torch.zeros_like):
            zero = model(tokens)
    torch.testing.assert_close(same, clean)
    expect = model.unembed(model.ln_f(torch.zeros(2, 16, 32)))
    torch.testing.assert_close(zero, expect)


def test_corpus_split_is_disjoint_and_real():
    assert len(stdlib_files()) > 100
    train, val = corpus("train"), corpus("val")
    assert len(val) > 100_000 and len(train) > 10 * len(val)
    seqs = windows(val, 16, torch.tensor([0, 5]))
    assert (seqs[:, 0] == BOS).all() and seqs[1, 1:6].tolist() == val[5:10].tolist()


def test_build_cache_drops_rows_and_resumes_exactly(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = ByteLM(CFG).eval()
    seqs = torch.randint(0, 256, (40, 16))
    seqs[:, 0] = BOS
    seqs[3, 5:9] = 7  # a "padding" token to drop
    docs = torch.arange(40 * 16, dtype=torch.int32).view(40, 16) // 50
    packed = Packed(seqs, docs)
    site = "blocks.1.hook_resid_post"
    settings = {"model": "t", "d": 32, "dtype": "float32"}

    def build(folder):
        return build_cache(
            model,
            packed,
            [site],
            folder,
            settings,
            batch_size=7,
            rows_per_shard=100,
            drop_tokens=(7,),
        )

    whole = build(tmp_path / "whole")
    keep = (seqs != 7) & (torch.arange(16) > 0)
    with safe_open(tmp_path / "whole" / "shard-00000.safetensors", "pt") as fh:
        first = {k: fh.get_tensor(k) for k in ("tokens", "doc", "pos", "seq")}
    assert first["tokens"].tolist() == seqs[keep][:100].tolist()
    assert first["doc"].tolist() == docs[keep][:100].tolist()
    assert first["pos"][:15].tolist() == list(range(1, 16))
    assert first["seq"][:16].tolist() == [0] * 15 + [1]
    rows = torch.cat([load_shard(tmp_path / "whole", e, site) for e in whole["shards"]])
    torch.testing.assert_close(rows, capture(model, seqs, [site])[site][keep])

    # killed while writing the third shard, mid-sequence
    write = ShardWriter._write_shard

    def dies_on_third(self, name, *args):
        if name == "shard-00002.safetensors":
            raise KeyboardInterrupt
        write(self, name, *args)

    monkeypatch.setattr(ShardWriter, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed")
    monkeypatch.setattr(ShardWriter, "_write_shard", write)
    assert not (tmp_path / "resumed" / "shard-00002.safetensors").exists()
    resumed = build(tmp_path / "resumed")
    assert resumed == whole  # same rows, checksums and statistics
