"""Packing with any tokenizer: the start token (BOS, else CLS, else none), the separator (EOS,
else SEP), no long-sequence warning, special tokens kept out of caches (tiny local models)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flashsae.cache.__main__ import run_info  # noqa: E402
from flashsae.cache.build import build, cache_settings  # noqa: E402
from flashsae.cache.models.subjects import get_subject  # noqa: E402
from flashsae.cache.shard_file import map_shard  # noqa: E402
from tests.test_hf_capture import save_tiny_gpt2_with_tokenizer  # noqa: E402
from tests.test_hf_loading import save_tiny_bert  # noqa: E402

LONG = "The quick brown fox jumps over the lazy dog. " * 40  # far more than 16 tokens


def corpus(path, n=60):
    path.write_text("".join(json.dumps({"text": f"doc {i}: {LONG[: 50 + i]}"}) + "\n"
                            for i in range(n)))  # fmt: skip
    return str(path)


def test_start_and_separator_tokens(tmp_path):
    save_tiny_bert(tmp_path / "bert")
    bert = get_subject(str(tmp_path / "bert"), 64)
    tok = bert.tokenizer
    assert (bert.start_token, bert.bos) == ("cls", tok.cls_token_id)
    assert (bert.separator_token, bert.separator) == ("sep", tok.sep_token_id)
    save_tiny_gpt2_with_tokenizer(tmp_path / "gpt2")
    gpt2 = get_subject(str(tmp_path / "gpt2"), 64)
    eos = gpt2.tokenizer.eos_token_id
    assert (gpt2.start_token, gpt2.bos, gpt2.separator_token, gpt2.separator) == (
        "bos", eos, "eos", eos,
    )  # fmt: skip
    config = json.loads((tmp_path / "gpt2" / "tokenizer_config.json").read_text())
    config["bos_token"] = None  # an EOS-only tokenizer (as Qwen's): no start token
    (tmp_path / "gpt2" / "tokenizer_config.json").write_text(json.dumps(config))
    eos_only = get_subject(str(tmp_path / "gpt2"), 64)
    assert eos_only.bos is None and eos_only.start_token is None and eos_only.separator == eos
    seqs = eos_only.sequences("train", 300, 16, 0, corpus(tmp_path / "c.jsonl"))
    assert seqs.tokens.shape[1] == 16 and (seqs.tokens[:, 0] != eos).any()  # no start token
    assert (seqs.tokens == eos).any() and (seqs.doc[seqs.tokens == eos] == -1).all()


def test_long_documents_give_no_length_warning(tmp_path, caplog, capfd):
    def warned() -> bool:
        logged = " ".join(r.getMessage() for r in caplog.records)
        return "Token indices sequence length" in logged + "".join(capfd.readouterr())

    save_tiny_bert(tmp_path / "bert")
    subject = get_subject(str(tmp_path / "bert"), 64)
    subject.tokenizer.model_max_length = 16
    caplog.clear()
    packed = subject.sequences("train", 2000, 16, 0, corpus(tmp_path / "c.jsonl"))
    assert not warned()
    assert packed.tokens.shape[1] == 16 and packed.tokens.shape[0] * 15 >= 2000
    # the check can fail: the tokenizer called as before (verbose) does warn
    fresh = transformers.AutoTokenizer.from_pretrained(tmp_path / "bert", model_max_length=16)
    fresh([LONG], add_special_tokens=False)
    assert warned()


def test_cache_records_the_packing_and_drops_special_tokens(tmp_path, capsys):
    save_tiny_bert(tmp_path / "bert")
    subject = get_subject(str(tmp_path / "bert"), 64)
    text = corpus(tmp_path / "c.jsonl")
    settings = cache_settings(subject, ["blocks.0.hook_resid_post"], text, 1500, 32, 0)
    assert settings["separator"] == subject.separator and "held out" in settings["held_out"]
    manifest = build(subject, subject.load("cpu"), settings, tmp_path / "cache", batch_size=8)
    assert manifest["packing"]["start_token"] == "cls"
    assert manifest["packing"]["separator_token"] == "sep"
    assert "long document continues" in manifest["packing"]["layout"]
    packed = subject.sequences("train", 1500, 32, 0, text)
    special = torch.isin(packed.tokens, torch.tensor(subject.special_tokens))
    assert special[:, 1:].any()  # separators inside sequences...
    tokens = torch.cat(
        [map_shard(tmp_path / "cache" / e["file"])["tokens"] for e in manifest["shards"]]
    )  # ...are not cached, nor is the start token
    assert manifest["total_rows"] == (~special).sum() == len(tokens)
    assert not torch.isin(tokens, torch.tensor(subject.special_tokens)).any()
    capsys.readouterr()
    run_info(tmp_path / "cache")
    shown = capsys.readouterr().out
    assert f"start token cls ({subject.bos}), separator sep ({subject.separator})" in shown
