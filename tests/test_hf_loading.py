"""Hugging Face checkpoints load as what they hold: a causal LM with its head, else the base
model with no next-token metrics; never freshly initialised weights (tiny models, no downloads)."""

import json
import string

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashsae.cache.errors import UserError  # noqa: E402
from flashsae.cache.models.subjects import get_subject, no_lm_reason  # noqa: E402
from tests.helpers import run_cli  # noqa: E402
from tests.test_hf_capture import save_tiny_gpt2_with_tokenizer  # noqa: E402

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_bert(folder, architectures=None):
    """A random 2-layer BERT encoder (BertModel, no LM head) and a character-level WordPiece
    tokenizer (CLS and SEP, no BOS or EOS), saved as on the hub."""
    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = SPECIAL + list(chars) + [f"##{c}" for c in chars]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=len(vocab), max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config)
    if architectures:
        model.config.architectures = architectures
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if architectures:  # save_pretrained writes the class name; keep the one asked for
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "architectures": architectures}))


def test_encoder_without_head_loads_as_its_base_model(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    subject = get_subject(str(tmp_path / "bert"), 64)
    assert subject.bos == subject.tokenizer.cls_token_id  # no BOS: CLS starts a sequence
    model = subject.load("cpu")
    assert type(model).__name__ == "BertModel"
    assert "has no causal-LM head" in no_lm_reason(model)
    assert "BertModel" in no_lm_reason(model)
    subject.check_site(subject.default_site)
    subject.check_site("bert.encoder.layer.0")  # the path as in a headed BERT works too


def test_a_head_the_weights_lack_is_not_invented(tmp_path):
    """A config that claims a causal-LM head over weights without one: the head would be
    random, so the base model is loaded and the reason names the missing weights."""
    save_tiny_bert(tmp_path / "bert", architectures=["BertLMHeadModel"])
    model = get_subject(str(tmp_path / "bert"), 64).load("cpu")
    assert type(model).__name__ == "BertModel"
    assert "cls.predictions" in no_lm_reason(model)


def test_decoder_with_head_loads_as_causal_lm(tmp_path):
    save_tiny_gpt2_with_tokenizer(tmp_path / "gpt2")
    model = get_subject(str(tmp_path / "gpt2"), 64).load("cpu")
    assert type(model).__name__ == "GPT2LMHeadModel" and no_lm_reason(model) is None


def test_missing_base_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tiny_gpt2_with_tokenizer(tmp_path / "gpt2")
    path = tmp_path / "gpt2" / "model.safetensors"
    weights = load_file(path)
    dropped = next(k for k in weights if "h.1.mlp" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks weights.*mlp"):
        get_subject(str(tmp_path / "gpt2"), 64).load("cpu")


def test_train_on_an_encoder_reports_null_lm_metrics_with_a_reason(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    args = ["--model", str(tmp_path / "bert"), "--tokens", "4096", "--batch-size", "1024"]
    args += ["--eval-tokens", "512", "--seq-len", "64", "--n-latents", "128", "--k", "8"]
    result = run_cli("flashsae.train", *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1.5 and metrics["l0"] <= 8
    assert all(metrics[k] is None for k in ("ce_loss_recovered", "delta_lm_loss", "kl"))
    (reason,) = metrics["warnings"]
    assert "null" in reason and "no causal-LM head" in reason
    assert reason in result.stderr
    evaluated = run_cli(
        "flashsae.train.eval", str(tmp_path / "run"), "--tokens", "512", "--seq-len", "64"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    again = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert again["ce_loss_recovered"] is None and again["kl"] is None
    assert reason in evaluated.stderr and reason in (tmp_path / "run" / "eval.md").read_text()
