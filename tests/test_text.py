"""Text sources and packing into sequences."""

import json

import pytest
import torch

from flashsae.cache.errors import UserError
from flashsae.cache.shards import FORMAT_VERSION, read_manifest
from flashsae.cache.text import documents, pack


def byte_tokens(texts):
    return [list(t.encode()) for t in texts]


def test_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    assert list(documents(str(tmp_path / "a.txt"))) == ["alpha"]
    assert list(documents(str(tmp_path))) == ["alpha", "beta"]
    assert sorted(documents(str(tmp_path), seed=3)) == ["alpha", "beta"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two", "text": "2"}) + "\n"
    )
    assert list(documents(str(jsonl))) == ["one", "2"]
    jsonl.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1 .* 'text' field"):
        list(documents(str(jsonl)))
    with pytest.raises(UserError, match="does not exist"):
        list(documents(str(tmp_path / "missing.txt")))
    stdlib = documents(None, "val")
    assert "def " in next(stdlib)


def test_pack_is_deterministic_and_tracks_documents():
    docs = ["abcdefgh", "ijklmnop", "qrstuvwx"]
    packed = pack(iter(docs), byte_tokens, bos=256, seq_len=5, n_seqs=6, seed=1)
    assert packed.tokens.shape == (6, 5) and (packed.tokens[:, 0] == 256).all()
    again = pack(iter(docs), byte_tokens, bos=256, seq_len=5, n_seqs=6, seed=1)
    assert torch.equal(packed.tokens, again.tokens)
    other = pack(iter(docs), byte_tokens, bos=256, seq_len=5, n_seqs=6, seed=2)
    assert not torch.equal(packed.tokens, other.tokens)
    stream = "".join(docs).encode()
    for row, doc in zip(packed.tokens, packed.doc, strict=True):
        body = bytes(row[1:].tolist())
        start = stream.index(body)
        assert start % 4 == 0  # non-overlapping windows
        assert doc[1:].tolist() == [i // 8 for i in range(start, start + 4)] and doc[0] == -1
    every = pack(iter(docs), byte_tokens, bos=256, seq_len=5, n_seqs=None, seed=0)
    assert every.tokens.shape == (6, 5)
    with pytest.raises(UserError, match="fewer than one sequence"):
        pack(iter(["ab"]), byte_tokens, bos=256, seq_len=5, n_seqs=1, seed=0)


def test_unknown_format_version(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match="format version"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_saved_hugging_face_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")  # installed by make setup (extra "datasets")
    texts = [f"document {i}" for i in range(5)]
    datasets.Dataset.from_dict({"text": texts, "id": list(range(5))}).save_to_disk(tmp_path / "one")
    assert list(documents(str(tmp_path / "one"))) == texts
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"body": texts}),
        test=datasets.Dataset.from_dict({"body": ["held out"]}),
    )
    splits.save_to_disk(tmp_path / "two")
    assert list(documents(str(tmp_path / "two"), text_field="body")) == texts
    with pytest.raises(UserError, match=r"no 'text' field \(body\)"):
        list(documents(str(tmp_path / "two")))
    datasets.DatasetDict(test=splits["test"]).save_to_disk(tmp_path / "three")
    with pytest.raises(UserError, match="no train split"):
        list(documents(str(tmp_path / "three")))


def test_hub_dataset_names_are_streamed(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, **kwargs):  # the hub is out of reach here: serve a local one
        calls.append((name, kwargs))
        return datasets.Dataset.from_dict({"text": ["a", "b"]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(documents("someone/corpus")) == ["a", "b"]
    assert calls == [("someone/corpus", {"split": "train", "streaming": True})]


def test_separators_and_long_documents():
    """EOS after every document; a document longer than a sequence continues into the next
    ones; without a start token the whole sequence is text."""
    docs = ["abcdefghij", "kl", "mnopq"]
    sep = 300
    packed = pack(iter(docs), byte_tokens, bos=256, seq_len=5, n_seqs=None, seed=0, separator=sep)
    stream = b"abcdefghij\x00kl\x00mnopq\x00"  # \0 stands for the separator
    expected = [[256, *[sep if c == 0 else c for c in stream[i : i + 4]]] for i in range(0, 20, 4)]
    assert packed.tokens.tolist() == expected
    assert (packed.doc[packed.tokens == sep] == -1).all() and (packed.doc[:, 0] == -1).all()
    assert packed.doc[1].tolist() == [-1, 0, 0, 0, 0]  # "efgh": the first document continues
    bare = pack(iter(docs), byte_tokens, bos=None, seq_len=5, n_seqs=None, seed=0, separator=sep)
    assert bare.tokens.tolist()[:2] == [[*b"abcde"], [*b"fghij"]] and bare.tokens.shape == (4, 5)
    assert (bare.doc >= 0).sum() == sum(map(len, docs))  # every text token, once


def test_held_out_split_is_by_document_and_stable(tmp_path):
    texts = [f"document number {i}\n" * (i % 7 + 1) for i in range(400)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    train, val = list(documents(str(jsonl), "train")), list(documents(str(jsonl), "val"))
    assert sorted(train + val) == sorted(texts) and not set(train) & set(val)
    assert 5 <= len(val) <= 40  # one in 20, by a hash of the text
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts)))
    assert sorted(documents(str(jsonl), "val")) == sorted(val)  # by content, not position
    assert list(documents(str(jsonl), "all")) == texts[::-1]
    stdlib_val = list(documents(None, "val"))
    assert stdlib_val and not set(stdlib_val) & set(documents(None, "train"))
