"""Text sources and packing them into fixed-length token sequences.

A source is the Python standard library (the default; "train" or "val" files), a
plain text file, a directory of text files (recursively, sorted), a ``.jsonl`` file
whose records carry a text field, or a Hugging Face dataset (needs the ``datasets``
package): a hub name, streamed, or a folder written by ``save_to_disk``.

Held-out split: one document in ``HELD_OUT_EVERY`` (20), chosen by an md5 of its text (of
its file name for the stdlib), is held out: "train" reads the others, "val" only those, "all"
every document. A cache is built from "train"; evaluation uses "val" of the same source.

Packing (``PACKING``): the documents' tokens are concatenated, each document followed by the
separator (the tokenizer's EOS, else SEP; nothing when it has neither), and the stream is cut
into non-overlapping sequences of ``seq_len`` tokens, each starting with the start token (BOS,
else CLS; when there is none, the sequence is all text). A document longer than a sequence
continues into the next ones; nothing is truncated. Sequences are taken in a seeded random
order (train) or evenly spaced (the stdlib's held-out files), so a given source, tokenizer,
seed and length always give the same sequences.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .models.bytelm import HELD_OUT_EVERY, split_files, stdlib_files
from .paths import files_digest, hub_offline, looks_like_path

SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # what save_to_disk leaves
SPLITS = ("train", "val", "all")
PACKING = (
    "packed: documents are concatenated, each followed by the separator token when the "
    "tokenizer has one, and cut into sequences of seq_len tokens that each begin with the start "
    "token when there is one; a long document continues into the next sequences"
)
HELD_OUT = f"one document in {HELD_OUT_EVERY} by an md5 of its text is held out for evaluation"
STDLIB_HELD_OUT = f"the stdlib's held-out files (one in {HELD_OUT_EVERY} by an md5 of the name)"


def is_held_out(text: str) -> bool:
    """Whether the document ``text`` is in the held-out split (md5 of its UTF-8 text)."""
    digest = hashlib.md5(text.encode(errors="surrogatepass")).hexdigest()
    return int(digest, 16) % HELD_OUT_EVERY == 0


def _read_files(files: list[Path], seed: int | None) -> Iterator[str]:
    """The files' text, in a seeded random order (or as given when ``seed`` is None)."""
    if seed is not None:
        files = [
            files[i]
            for i in torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
        ]
    for f in files:
        yield f.read_text(errors="replace")


def documents(
    source: str | None, split: str = "all", seed: int | None = None, text_field: str = "text"
) -> Iterator[str]:
    """The documents of ``split`` ("train", "val": held out, "all") of ``source`` (None: the
    stdlib files); the files of the stdlib or of a directory come in a seeded order when
    ``seed`` is given."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    if source is None:
        yield from _read_files(stdlib_files() if split == "all" else split_files(split), seed)
        return
    for text in _source_documents(source, seed, text_field):
        if split == "all" or is_held_out(text) == (split == "val"):
            yield text


def _source_documents(source: str, seed: int | None, text_field: str) -> Iterator[str]:
    """Every document of the local or Hub ``source``."""
    path = Path(source).expanduser()
    if path.is_dir() and any((path / f).exists() for f in SAVED_DATASET_FILES):
        yield from _hf_dataset(str(path), text_field, saved=True)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise UserError(f"--text directory {path} holds no files")
        yield from _read_files(files, seed)
    elif path.suffix == ".jsonl" and path.is_file():
        with open(path) as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise UserError(
                        f"{path}:{i} is not a JSON object with a {text_field!r} field"
                    ) from e
                if not isinstance(text, str):
                    raise UserError(
                        f"{path}:{i}: the {text_field!r} field is {json.dumps(text)[:40]}, "
                        "not a string"
                    )
                yield text
    elif path.is_file():
        yield path.read_text(errors="replace")
    elif looks_like_path(str(source)):
        raise UserError(f"--text {source}: no such file or directory (it does not exist)")
    else:
        yield from _hf_dataset(source, text_field)


def source_digest(source: str | None) -> str | None:
    """A digest of the local text source's files (``paths.files_digest``: contents, or sizes
    and modification times past a size limit); None for the stdlib and Hub datasets."""
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return files_digest([path], path.parent)
    if path.is_dir():
        return files_digest(sorted(p for p in path.rglob("*") if p.is_file()), path)
    return None


def split_digest(source: str | None) -> str | None:
    """``source_digest`` of a local source; for the stdlib (None), that of its held-out files."""
    if source is not None:
        return source_digest(source)
    files = split_files("val")
    return files_digest(files, Path(os.path.commonpath(files))) if files else None


def _hf_dataset(source: str, text_field: str, saved: bool = False) -> Iterator[str]:
    """The ``text_field`` of each record of a Hugging Face dataset's train split: a hub name
    (streamed) or a folder written by ``save_to_disk``."""
    try:
        import datasets
    except ImportError as e:
        raise UserError(
            f"--text {source!r} is a Hugging Face dataset; reading it needs "
            "pip install 'flashsae[datasets]'"
        ) from e
    try:
        if saved:
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise UserError(f"dataset {source} has no train split ({', '.join(ds)})")
                ds = ds["train"]
        else:
            ds = datasets.load_dataset(source, split="train", streaming=True)
        for record in ds:
            if text_field not in record:
                fields = ", ".join(record)
                raise UserError(f"dataset {source} has no {text_field!r} field ({fields})")
            yield record[text_field]
    except (OSError, ValueError, ConnectionError) as e:
        if hub_offline() and not saved:
            raise UserError(
                f"cannot read dataset {source!r}: no such file or directory, and it is not in "
                "the local Hugging Face cache (HF_HUB_OFFLINE is set: the Hub was not asked)"
            ) from e
        raise UserError(f"cannot read dataset {source!r}: {e}") from e


@dataclass
class Packed:
    """``tokens`` ``[S, T]`` and ``doc`` ``[S, T]``: the document of each token, -1 at the start
    and separator tokens."""

    tokens: torch.Tensor
    doc: torch.Tensor


def pack(
    docs: Iterator[str],
    tokenize: Callable[[list[str]], list[list[int]]],
    bos: int | None,
    seq_len: int,
    n_seqs: int | None,
    seed: int,
    evenly_spaced: bool = False,
    separator: int | None = None,
) -> Packed:
    """Pack tokenized ``docs`` into ``n_seqs`` sequences (None: all windows) as ``PACKING``
    says: ``bos`` starts each sequence, ``separator`` follows each document (None: no such
    token).

    Reads documents only until there are enough tokens for ``n_seqs`` windows (all of
    them when ``evenly_spaced``); repeats windows when the source is too short.
    """
    body = seq_len - (bos is not None)
    ids: list[int] = []
    doc_ids: list[int] = []
    n_docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_docs
        if not batch:
            return
        for toks in tokenize(batch):
            ids.extend(toks)
            doc_ids.extend([n_docs] * len(toks))
            if separator is not None:
                ids.append(separator)
                doc_ids.append(-1)
            n_docs += 1
        batch.clear()

    for text in docs:
        batch.append(text)
        if len(batch) == 16:
            flush()
            if n_seqs is not None and not evenly_spaced and len(ids) >= n_seqs * body:
                break
    flush()
    n_windows = len(ids) // body
    if n_windows == 0:
        raise UserError(f"the text holds {len(ids)} tokens, fewer than one sequence of {seq_len}")
    data = torch.tensor(ids[: n_windows * body]).view(n_windows, body)
    docs_t = torch.tensor(doc_ids[: n_windows * body], dtype=torch.int32).view(n_windows, body)
    if n_seqs is None:
        order = torch.arange(n_windows)
    elif evenly_spaced:
        order = torch.linspace(0, n_windows - 1, n_seqs).long()
    else:
        order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
        order = order.repeat(-(-n_seqs // n_windows))[:n_seqs]
    tokens, doc = data[order], docs_t[order]
    if bos is not None:
        tokens = torch.cat([torch.full((len(order), 1), bos), tokens], dim=1)
        doc = torch.cat([torch.full((len(order), 1), -1, dtype=torch.int32), doc], dim=1)
    return Packed(tokens, doc)
