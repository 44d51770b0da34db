"""Evaluation's single forward (the layers before the site once, the three branches after it on
3B rows) against three separate forwards, for the bundled model and every mapped decoder family."""

import pytest
import torch

from flashsae.cache.errors import UserError
from flashsae.cache.models.bytelm import ByteLM, ByteLMConfig
from flashsae.train import RunConfig
from flashsae.train import eval as eval_cli
from flashsae.train.eval import branch_plan, evaluate
from flashsae.train.metrics import LM_KEYS
from flashsae.train.sae import make_sae

transformers = pytest.importorskip("transformers")

from tests.test_hf_capture import CONFIGS, ENCODERS, PARALLEL, tiny  # noqa: E402

DECODERS = [f for f in CONFIGS if f not in ENCODERS]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is many times faster than two on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sae(d, site, seed=0):
    """A ReLU SAE with random weights (about half its latents fire)."""
    torch.manual_seed(seed)
    sae = make_sae("relu", 4 * d, torch.randn(d) * 0.1, float(d), site=site, model="tiny")
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc) / d**0.5)
        sae.b_enc.copy_(torch.randn_like(sae.b_enc) * 0.1)
        sae.W_dec.copy_(torch.randn_like(sae.W_dec) / d**0.5)
    return sae.eval()


def embedded_rows(model):
    """A counter of the sequences the model's token embedding runs on."""
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    count = {"rows": 0}
    embedding.register_forward_hook(
        lambda m, args, out: count.update(rows=count["rows"] + len(out))
    )
    return count


def check_branches_match(model, site, d, vocab):
    """The branched evaluation gives the separate forwards' metrics, and embeds each sequence
    once (the separate forwards: three times); batches of 2, 2 and 1 sequences."""
    assert branch_plan(model, site) is not None
    sae = random_sae(d, site)
    seqs = torch.randint(3, vocab, (5, 9), generator=torch.Generator().manual_seed(1))
    count = embedded_rows(model)
    separate, freq_sep = evaluate(sae, model, seqs, batch_size=2, batched=False)
    assert count["rows"] == 15
    count["rows"] = 0
    branched, freq_br = evaluate(sae, model, seqs, batch_size=2, batched=True)
    assert count["rows"] == 5
    assert separate["ce_zero"] != separate["ce_clean"] != separate["ce_sae"] and separate["kl"] > 0
    for key in ("l0", "fvu", "cosine", "gamma", *LM_KEYS):
        assert branched[key] == pytest.approx(separate[key], rel=1e-5, abs=1e-6), key
    assert torch.equal(freq_sep, freq_br)


@pytest.mark.parametrize("hook", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"])
@pytest.mark.parametrize("layer", [0, 1])
def test_bytelm_branches_match_separate_forwards(hook, layer):
    torch.manual_seed(0)
    model = ByteLM(ByteLMConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)).eval()
    check_branches_match(model, f"blocks.{layer}.hook_{hook}", 32, 257)


@pytest.mark.parametrize("family", DECODERS)
def test_hf_branches_match_separate_forwards(family):
    """Sites at a block's input and output (the last block's included) and inside a block,
    under eager attention (a materialised causal mask, tiled to 3B) and SDPA."""
    model = tiny(family)
    hooks = ["resid_pre", "resid_post", "attn_out", "mlp_out"]
    hooks += [] if family in PARALLEL else ["resid_mid"]
    for hook in hooks:
        check_branches_match(model, f"blocks.1.hook_{hook}", 32, 97)
    check_branches_match(model, "blocks.2.hook_resid_post", 32, 97)
    if family not in ("gemma2",):  # no SDPA in transformers' Gemma 2
        torch.manual_seed(0)
        config = model.config
        sdpa = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        check_branches_match(sdpa.eval(), "blocks.1.hook_resid_post", 32, 97)


def test_unmapped_models_and_sites_outside_blocks_use_separate_forwards():
    torch.manual_seed(0)
    model = ByteLM(ByteLMConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)).eval()
    assert branch_plan(model, "ln_f") is None
    wrapped = torch.nn.Sequential(model)  # not a known family
    assert branch_plan(wrapped, "0.blocks.0.hook_resid_post") is None
    with pytest.raises(ValueError, match="cannot run the branches as one batch"):
        evaluate(random_sae(32, "ln_f"), model, torch.randint(0, 256, (2, 8)), batched=True)


def test_eval_batch_size_must_be_positive(tmp_path, capsys):
    assert eval_cli.main([str(tmp_path), "--eval-batch-size", "0"]) == 2
    assert "--eval-batch-size must be positive" in capsys.readouterr().err
    with pytest.raises(UserError, match="--eval-batch-size must be positive"):
        RunConfig(eval_batch_size=0).check()
