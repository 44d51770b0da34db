"""Sites on tiny randomly initialised Hugging Face models of each family (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashsae.cache.errors import UserError  # noqa: E402
from flashsae.cache.hooks import capture, resolve_site, splice  # noqa: E402
from flashsae.cache.models.hf_layouts import hf_layout  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=97)
LLAMA_LIKE = dict(SMALL, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)
ENCODER = dict(SMALL, intermediate_size=64, max_position_embeddings=64)
# family: (config class name, kwargs); a class the installed transformers lacks is skipped
CONFIGS = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, vocab_size=97)),
    "neox": ("GPTNeoXConfig", dict(SMALL, intermediate_size=64, use_parallel_residual=False)),
    "neox-parallel": ("GPTNeoXConfig", dict(SMALL, intermediate_size=64)),
    "llama": ("LlamaConfig", LLAMA_LIKE),
    "mistral": ("MistralConfig", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", dict(LLAMA_LIKE, head_dim=8)),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=8)),
    "gemma2": ("Gemma2Config", dict(LLAMA_LIKE, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", dict(LLAMA_LIKE, head_dim=8)),
    "olmo2": ("Olmo2Config", dict(LLAMA_LIKE, pad_token_id=0, eos_token_id=1, bos_token_id=1)),
    "opt": (
        "OPTConfig",
        dict(SMALL, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
    ),
    "gptj": (
        "GPTJConfig",
        dict(
            n_embd=32,
            n_layer=3,
            n_head=4,
            vocab_size=97,
            rotary_dim=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=1,
        ),
    ),  # fmt: skip
    "bert": ("BertConfig", ENCODER),
    "roberta": ("RobertaConfig", dict(ENCODER, pad_token_id=1)),
    "distilbert": (
        "DistilBertConfig",
        dict(
            dim=32, n_layers=3, n_heads=4, hidden_dim=64, vocab_size=97, max_position_embeddings=64
        ),
    ),
}
PARALLEL = {"neox-parallel", "gptj"}
ENCODERS = {"bert", "roberta", "distilbert"}
FINAL_NORM = {
    "gpt2": "transformer.ln_f",
    "gptj": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "opt": "model.decoder.final_layer_norm",
}
# post-LN encoders: (LayerNorm after attention, LayerNorm after the MLP) inside a block
ENCODER_NORMS = {
    "bert": ("attention.output.LayerNorm", "output.LayerNorm"),
    "roberta": ("attention.output.LayerNorm", "output.LayerNorm"),
    "distilbert": ("sa_layer_norm", "output_layer_norm"),
}


def config_of(family):
    name, kwargs = CONFIGS[family]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return getattr(transformers, name)(**kwargs)


def tiny(family):
    config = config_of(family)
    auto = transformers.AutoModel if family in ENCODERS else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(config, attn_implementation="eager").eval()


def site(layer, hook):
    return f"blocks.{layer}.hook_{hook}"


@pytest.mark.parametrize("family", [f for f in CONFIGS if f not in ENCODERS])
def test_sites_match_hidden_states(family):
    model = tiny(family)
    tokens = torch.randint(2, 97, (2, 9))
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    names = [
        site(L, h) for L in range(3) for h in ("resid_pre", "resid_post", "attn_out", "mlp_out")
    ]
    acts = capture(model, tokens, names)
    for L in range(3):
        torch.testing.assert_close(acts[site(L, "resid_pre")], hidden[L])
        if L < 2:
            torch.testing.assert_close(acts[site(L, "resid_post")], hidden[L + 1])
    # the last layer: hidden_states[-1] has the final norm applied, resid_post does not
    norm = model.get_submodule(FINAL_NORM.get(model.config.model_type, "model.norm"))
    with torch.no_grad():
        torch.testing.assert_close(norm(acts[site(2, "resid_post")]), hidden[-1])
    for L in range(3):
        pre, post = acts[site(L, "resid_pre")], acts[site(L, "resid_post")]
        attn, mlp = acts[site(L, "attn_out")], acts[site(L, "mlp_out")]
        torch.testing.assert_close(pre + attn + mlp, post, atol=1e-5, rtol=1e-5)
        if family in PARALLEL:
            with pytest.raises(UserError, match="parallel"):
                resolve_site(model, site(L, "resid_mid"))
        else:
            mid = capture(model, tokens, [site(L, "resid_mid")])[site(L, "resid_mid")]
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_encoder_sites_match_a_manual_forward(family):
    """Post-LN encoders, as TransformerLens's HookedEncoder: resid_mid = pre + attn_out,
    resid_post = LN1(resid_mid) + mlp_out, normalized_resid_post = LN2(resid_post) = the
    block's output = hidden_states[L + 1], the last layer included."""
    model = tiny(family)
    tokens = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        hidden = model(tokens, output_hidden_states=True).hidden_states
    hooks = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post", "normalized_resid_post")
    acts = capture(model, tokens, [site(L, h) for L in range(3) for h in hooks])
    blocks = model.get_submodule(hf_layout(model).layers)
    for L in range(3):
        a = {h: acts[site(L, h)] for h in hooks}
        ln1, ln2 = (blocks[L].get_submodule(p) for p in ENCODER_NORMS[family])
        torch.testing.assert_close(a["resid_pre"], hidden[L])
        torch.testing.assert_close(a["normalized_resid_post"], hidden[L + 1])
        torch.testing.assert_close(a["resid_mid"], a["resid_pre"] + a["attn_out"])
        with torch.no_grad():
            torch.testing.assert_close(a["resid_post"], ln1(a["resid_mid"]) + a["mlp_out"])
            torch.testing.assert_close(ln2(a["resid_post"]), a["normalized_resid_post"])
        assert a["attn_out"].std() > 0 and a["mlp_out"].std() > 0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sites_do_not_depend_on_the_head(family):
    """TransformerLens names and module paths (with or without the base model's prefix) find
    the same tensors in the bare base model and with an LM head on top."""
    config = config_of(family)
    torch.manual_seed(0)
    base = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    head_auto = (
        transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    )
    headed = head_auto.from_config(config, attn_implementation="eager").eval()
    missing, _ = headed.base_model.load_state_dict(base.state_dict(), strict=False)
    assert not missing  # the same weights (BertModel's pooler is extra)
    prefix = base.base_model_prefix
    layers = hf_layout(base).layers
    tokens = torch.randint(3, 97, (2, 7))
    for name in (site(1, "resid_post"), f"{layers}.1", f"{prefix}.{layers}.1"):
        a = capture(base, tokens, [name])[name]
        b = capture(headed, tokens, [name])[name]
        torch.testing.assert_close(a, b)


def test_forward_stops_after_the_last_needed_layer():
    model = tiny("llama")
    ran = []
    for i, layer in enumerate(model.model.layers):  # a layer's body runs its input norm first
        layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    capture(model, torch.randint(0, 97, (1, 5)), [site(1, "resid_post"), site(0, "mlp_out")])
    assert ran == [0, 1]
    ran.clear()
    capture(model, torch.randint(0, 97, (1, 5)), [site(1, "resid_pre")])
    assert ran == [0]


def test_unknown_hf_site():
    with pytest.raises(UserError, match=r"blocks 0\.\.2"):
        resolve_site(tiny("gpt2"), site(3, "resid_post"))
    with pytest.raises(UserError, match="unknown site"):
        resolve_site(tiny("gpt2"), "blocks.0.hook_resid_side")


def save_tiny_gpt2_with_tokenizer(folder):
    """A random 2-layer GPT-2 and a 300-token byte-level BPE trained here, saved as on the hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from flashsae.cache.models.bytelm import split_files

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([p.read_text() for p in split_files("val")[:5]], trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=320,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_train_cli_on_a_local_hf_model(tmp_path):
    import json

    from tests.helpers import run_cli

    save_tiny_gpt2_with_tokenizer(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--site", "blocks.0.hook_resid_post"]
    args += ["--tokens", "8192", "--batch-size", "1024", "--eval-tokens", "1024", "--seq-len", "64"]
    result = run_cli(
        "flashsae.train", *args, "--n-latents", "256", "--k", "8", "--out", str(tmp_path / "run")
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] <= 8
    assert metrics["ce_loss_recovered"] is not None and metrics["kl"] > 0  # through its head
    bad = run_cli(
        "flashsae.train", *args[:2], "--seq-len", "64", "--site", "blocks.5.hook_resid_post"
    )
    assert bad.returncode == 2 and "blocks 0..1" in bad.stderr
    long = run_cli("flashsae.train", *args[:2], "--seq-len", "65")
    assert long.returncode == 2 and "context of 64" in long.stderr


def test_opt_mlp_rows_are_spliced_as_tokens():
    """OPT's MLP sees [B*T, d] rows: sites there come out (and go back in) as [B, T, d]."""
    model = tiny("opt")
    tokens = torch.randint(2, 97, (2, 9))
    names = [site(1, "resid_mid"), site(1, "mlp_out")]
    acts = capture(model, tokens, names)
    assert all(acts[n].shape == (2, 9, 32) for n in names)
    with splice(model, site(1, "mlp_out"), torch.zeros_like):
        post = capture(model, tokens, [site(1, "resid_post")])[site(1, "resid_post")]
    torch.testing.assert_close(post, acts[site(1, "resid_mid")])


def subject_of(config):
    from flashsae.cache.models.subjects import HFSubject

    return HFSubject("tiny", "hf-tiny", 32, config.num_hidden_layers, 0, config=config)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_default_site_exists(family):
    subject = subject_of(config_of(family))
    subject.check_site(subject.default_site)
    capture(tiny(family), torch.randint(3, 97, (1, 5)), [subject.default_site])


def test_default_site_of_an_unmapped_family_is_its_middle_block():
    config = transformers.BloomConfig(hidden_size=32, n_layer=4, n_head=4, vocab_size=97)
    subject = subject_of(config)
    assert subject.default_site == "transformer.h.1"
    subject.check_site(subject.default_site)


def test_unknown_site_lists_the_block_modules():
    model = tiny("bert")
    with pytest.raises(UserError) as e:
        resolve_site(model, "layer.3")
    msg = str(e.value)
    assert "encoder.layer.{0..2}" in msg and "normalized_resid_post" in msg
    bloom = transformers.AutoModelForCausalLM.from_config(
        transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=97)
    )
    with pytest.raises(UserError, match=r"transformer\.h\.\{0\.\.1\}") as e:
        resolve_site(bloom, "blocks.0.hook_resid_post")
    assert "hook_" not in str(e.value).split("sites are")[1]  # no TransformerLens names offered
    with pytest.raises(UserError, match="unknown site .*resid_pre"):
        resolve_site(model, site(0, "q"))
    with pytest.raises(UserError, match="no hook_normalized_resid_post; its hooks are"):
        resolve_site(tiny("llama"), site(0, "normalized_resid_post"))
