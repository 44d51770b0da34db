"""Text sources and packing them into fixed-length token sequences.

A source is the Python standard library (the default; "train" or "val" files), a
plain text file, a directory of text files (recursively, sorted), a ``.jsonl`` file
whose records carry a text field, or a Hugging Face dataset (needs the ``datasets``
package): a hub name, streamed, or a folder written by ``save_to_disk``.

Packing concatenates the documents' tokens into one stream and cuts it into
non-overlapping windows of ``seq_len - 1`` tokens, each prefixed with BOS. Windows
are taken in a seeded random order (train) or evenly spaced (evaluation), so a
given source, tokenizer, seed and length always give the same sequences.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .models.bytelm import split_files
from .paths import files_digest, hub_offline, looks_like_path

SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # what save_to_disk leaves


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
    source: str | None, split: str = "train", seed: int | None = None, text_field: str = "text"
) -> Iterator[str]:
    """The documents of ``source`` (None: the stdlib files of ``split``); the files of the
    stdlib or of a directory come in a seeded order when ``seed`` is given."""
    if source is None:
        yield from _read_files(split_files(split), seed)
        return
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
    """``tokens`` ``[S, T]`` starting with BOS, and ``doc`` ``[S, T]`` (the document of each
    token; -1 at BOS)."""

    tokens: torch.Tensor
    doc: torch.Tensor


def pack(
    docs: Iterator[str],
    tokenize: Callable[[list[str]], list[list[int]]],
    bos: int,
    seq_len: int,
    n_seqs: int | None,
    seed: int,
    evenly_spaced: bool = False,
) -> Packed:
    """Pack tokenized ``docs`` into ``n_seqs`` sequences (None: all windows).

    Reads documents only until there are enough tokens for ``n_seqs`` windows (all of
    them when ``evenly_spaced``); repeats windows when the source is too short.
    """
    body = seq_len - 1
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
    tokens = torch.cat([torch.full((len(order), 1), bos), data[order]], dim=1)
    doc = torch.cat([torch.full((len(order), 1), -1, dtype=torch.int32), docs_t[order]], dim=1)
    return Packed(tokens, doc)
