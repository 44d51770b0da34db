"""Sites on tiny randomly initialised Hugging Face models of each family (no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashsae.cache.errors import UserError  # noqa: E402
from flashsae.cache.hooks import capture, resolve_site  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=97)
LLAMA_LIKE = dict(SMALL, intermediate_size=64, num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "gpt2": (transformers.GPT2Config, dict(n_embd=32, n_layer=3, n_head=4, vocab_size=97)),
    "neox": (
        transformers.GPTNeoXConfig,
        dict(SMALL, intermediate_size=64, use_parallel_residual=False),
    ),
    "neox-parallel": (transformers.GPTNeoXConfig, dict(SMALL, intermediate_size=64)),
    "llama": (transformers.LlamaConfig, LLAMA_LIKE),
    "mistral": (transformers.MistralConfig, LLAMA_LIKE),
    "qwen2": (transformers.Qwen2Config, LLAMA_LIKE),
    "gemma": (transformers.GemmaConfig, dict(LLAMA_LIKE, head_dim=8)),
    "gemma2": (transformers.Gemma2Config, dict(LLAMA_LIKE, head_dim=8)),
}
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def tiny(family):
    cls, kwargs = CONFIGS[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cls(**kwargs), attn_implementation="eager"
    )
    return model.eval()


def site(layer, hook):
    return f"blocks.{layer}.hook_{hook}"


@pytest.mark.parametrize("family", list(CONFIGS))
def test_sites_match_hidden_states(family):
    model = tiny(family)
    tokens = torch.randint(0, 97, (2, 9))
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
        if family == "neox-parallel":
            with pytest.raises(UserError, match="parallel"):
                resolve_site(model, site(L, "resid_mid"))
        else:
            mid = capture(model, tokens, [site(L, "resid_mid")])[site(L, "resid_mid")]
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=1e-5)


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
    bad = run_cli(
        "flashsae.train", *args[:2], "--seq-len", "64", "--site", "blocks.5.hook_resid_post"
    )
    assert bad.returncode == 2 and "blocks 0..1" in bad.stderr
    long = run_cli("flashsae.train", *args[:2], "--seq-len", "65")
    assert long.returncode == 2 and "context of 64" in long.stderr
