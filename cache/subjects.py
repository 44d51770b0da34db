"""Subject models (the models whose activations are captured) and their token streams.

``bytelm`` is the bundled default, ``bytelm-tiny`` a seconds-to-train variant for
smoke tests; any other name is a Hugging Face model id or local path (extra ``hf``).
Every subject yields ``[S, seq_len]`` token sequences that start with BOS, drawn
from the Python standard library's source: train sequences from the train files in
a seeded order, evaluation ("val") sequences from the held-out files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .bytelm import BOS, ByteLM, ByteLMConfig, corpus, load_bytelm, split_files, windows
from .capture import resolve_site
from .errors import UserError

BYTELM_PRESETS = {
    "bytelm": ByteLMConfig(),
    "bytelm-tiny": ByteLMConfig(n_layer=2, d_model=64, n_head=2, steps=40, batch_size=16),
}


def pick_windows(n_data: int, seq_len: int, n_seqs: int, split: str, seed: int) -> torch.Tensor:
    """Start offsets of ``n_seqs`` windows: non-overlapping in a seeded order (train, repeated
    if the data runs out), or evenly spaced (val)."""
    if split != "train":
        return torch.linspace(0, n_data - seq_len, n_seqs).long()
    starts = torch.arange(0, n_data - seq_len, seq_len - 1)
    starts = starts[torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))]
    return starts.repeat(-(-n_seqs // len(starts)))[:n_seqs]


@dataclass
class Subject:
    """A model by name: its size and sites are known before its weights are loaded."""

    name: str
    key: str  # identifies the weights; part of every cache key
    d_model: int
    n_layers: int

    @property
    def default_site(self) -> str:
        """The residual stream after the middle block."""
        return f"blocks.{max(self.n_layers // 2 - 1, 0)}.hook_resid_post"

    def check_site(self, site: str) -> None:
        """Raise a UserError for an unknown site, without loading weights."""
        resolve_site(self.skeleton(), site)

    def skeleton(self) -> nn.Module:
        raise NotImplementedError

    def load(self, device: str) -> nn.Module:
        raise NotImplementedError

    def sequences(self, split: str, tokens: int, seq_len: int, seed: int) -> torch.Tensor:
        """``[S, seq_len]`` sequences holding at least ``tokens`` tokens after BOS."""
        raise NotImplementedError


@dataclass
class ByteLMSubject(Subject):
    cfg: ByteLMConfig = ByteLMConfig()

    def skeleton(self) -> nn.Module:
        return ByteLM(self.cfg)

    def load(self, device: str) -> nn.Module:
        return load_bytelm(self.cfg, device)

    def sequences(self, split: str, tokens: int, seq_len: int, seed: int) -> torch.Tensor:
        data = corpus(split)
        n_seqs = -(-tokens // (seq_len - 1))
        return windows(data, seq_len, pick_windows(len(data), seq_len, n_seqs, split, seed), BOS)


@dataclass
class HFSubject(Subject):
    config: object = None

    def skeleton(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config)

    def load(self, device: str) -> nn.Module:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(self.name, dtype=torch.float32)
        except OSError as e:
            raise UserError(f"cannot load model {self.name!r}: {e}") from e
        return model.to(device).eval()

    def sequences(self, split: str, tokens: int, seq_len: int, seed: int) -> torch.Tensor:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.name)
        except OSError as e:
            raise UserError(f"cannot load the tokenizer of {self.name!r}: {e}") from e
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise UserError(f"the tokenizer of {self.name!r} has neither a BOS nor an EOS token")
        files = split_files(split)
        if split == "train":  # tokenize files in a seeded order only until there is enough text
            order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
            files = [files[i] for i in order]
        ids: list[int] = []
        for i in range(0, len(files), 16):
            texts = [p.read_text(errors="replace") for p in files[i : i + 16]]
            ids += [t for doc in tok(texts, add_special_tokens=False)["input_ids"] for t in doc]
            if split == "train" and len(ids) > tokens + seq_len:
                break
        data = torch.tensor(ids, dtype=torch.long)
        n_seqs = -(-tokens // (seq_len - 1))
        return windows(data, seq_len, pick_windows(len(data), seq_len, n_seqs, split, seed), bos)


def hf_subject(name: str) -> HFSubject:
    looks_like_path = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_like_path and not Path(name).expanduser().exists():
        raise UserError(f"model path {name} does not exist")
    try:
        from transformers import AutoConfig
    except ImportError as e:
        raise UserError(
            f"model {name!r} is not bundled; Hugging Face models need the hf extra: "
            "pip install -e '.[hf]'"
        ) from e
    source = str(Path(name).expanduser()) if looks_like_path else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load model {name!r} (bundled models: {', '.join(BYTELM_PRESETS)}): {e}"
        ) from e
    key = (
        "hf-"
        + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        + "-"
        + str(getattr(config, "_commit_hash", None))
    )
    return HFSubject(source, key, config.hidden_size, config.num_hidden_layers, config)


def get_subject(name: str, seq_len: int) -> Subject:
    """The subject model called ``name``; a UserError for one that does not exist."""
    if name not in BYTELM_PRESETS:
        return hf_subject(name)
    cfg = BYTELM_PRESETS[name]
    if seq_len > cfg.seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds {name}'s context of {cfg.seq_len}")
    return ByteLMSubject(name, cfg.key(), cfg.d_model, cfg.n_layer, cfg)
