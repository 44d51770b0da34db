"""Subject models (the models whose activations are captured) and their token streams.

``bytelm`` is the bundled default, ``bytelm-tiny`` a seconds-to-train variant for
smoke tests; any other name is a Hugging Face model id or local path (extra ``hf``), loaded
with its causal-LM head when the checkpoint has one, else as its base model (``AutoModel``,
no next-token metrics). Every subject packs text (by default the Python standard library's
source, train or held-out files) into ``[S, seq_len]`` token sequences as ``text.PACKING``
says: each starts with BOS (a tokenizer without one: its CLS, else nothing), and each document
is followed by EOS (else SEP, else nothing).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..hooks import block_lists, resolve_site
from ..paths import files_digest, hub_offline, looks_like_path
from ..text import HELD_OUT, PACKING, Packed, documents, pack
from .bytelm import BOS, ByteLM, ByteLMConfig, load_bytelm
from .hf_layouts import LAYOUTS

BYTELM_PRESETS = {
    "bytelm": ByteLMConfig(),
    "bytelm-tiny": ByteLMConfig(n_layer=2, d_model=64, n_head=2, steps=40, batch_size=16),
}


@dataclass
class Subject:
    """A model by name: its size and sites are known before its weights are loaded."""

    name: str
    key: str  # identifies the weights; part of every cache key
    d_model: int
    n_layers: int
    bos: int | None  # token id that starts every sequence (None: none does)
    start_token: str | None = "bos"  # which token that is: "bos", "cls" or None
    separator: int | None = None  # token id after every document (None: none)
    separator_token: str | None = None  # which token that is: "eos", "sep" or None

    @property
    def special_tokens(self) -> tuple[int, ...]:
        """The start and separator token ids: never cached, never counted in metrics."""
        return tuple(t for t in (self.bos, self.separator) if t is not None)

    def packing(self) -> dict:
        """How this subject's sequences are packed (recorded in cache manifests)."""
        return {
            "layout": PACKING,
            "start_token": self.start_token,
            "start_token_id": self.bos,
            "separator_token": self.separator_token,
            "separator_token_id": self.separator,
        }

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

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def sequences(
        self,
        split: str,
        tokens: int,
        seq_len: int,
        seed: int,
        text: str | None = None,
        text_field: str = "text",
    ) -> Packed:
        """Sequences holding at least ``tokens`` tokens after the start token, from the documents
        of ``split`` ("train", "val": held out, "all") of ``text`` (default: the stdlib;
        records' ``text_field`` for JSONL and datasets). The stdlib's held-out sequences are
        evenly spaced over all its held-out files; other sources are read only as far as
        needed."""
        if seq_len < 2:
            raise UserError(f"--seq-len must be at least 2 (BOS and one token), not {seq_len}")
        docs = documents(text, split, seed if split == "train" else None, text_field)
        n_seqs = -(-tokens // (seq_len - (self.bos is not None)))
        evenly = split != "train" and text is None
        try:
            return pack(
                docs, self.tokenize, self.bos, seq_len, n_seqs, seed, evenly, self.separator
            )
        except UserError as e:
            if split != "val" or text is None:
                raise
            raise UserError(
                f"the held-out split of --text {text} ({HELD_OUT}) is too small: {e}; give a "
                "source of more documents (a directory, a .jsonl with one record per document) "
                "or evaluation text with --eval-text"
            ) from e


@dataclass
class ByteLMSubject(Subject):
    cfg: ByteLMConfig = ByteLMConfig()

    def skeleton(self) -> nn.Module:
        return ByteLM(self.cfg)

    def load(self, device: str) -> nn.Module:
        return load_bytelm(self.cfg, device)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode()) for t in texts]


NO_LM_ATTR = "flashsae_no_lm"  # set on a loaded model that has no causal-LM head: the reason


def no_lm_reason(model: nn.Module) -> str | None:
    """Why next-token metrics (CE, KL, Δ-LM) cannot be computed through ``model``; None when
    they can."""
    return getattr(model, NO_LM_ATTR, None)


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


@dataclass
class HFSubject(Subject):
    config: object = None

    @property
    def wants_causal_lm(self) -> bool:
        """Whether the checkpoint is a causal LM: its ``architectures`` name a causal-LM class
        (or name nothing, as in a config built by hand) and the family has one."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if self.config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            return False
        archs = getattr(self.config, "architectures", None) or []
        return not archs or any(a in _causal_lm_classes() for a in archs)

    @property
    def default_site(self) -> str:
        """The residual stream after the middle block: the TransformerLens name for a mapped
        family, else the middle block's module path."""
        if self.config.model_type in LAYOUTS:
            return super().default_site
        lists = block_lists(self.skeleton())
        path, n = max(lists, key=lambda pn: pn[1]) if lists else ("", 0)
        if not lists or n != self.n_layers:
            raise UserError(
                f"{self.name}: no default site for model type {self.config.model_type!r} "
                "(its blocks were not found); pass --site with a module path"
            )
        return f"{path}.{max(n // 2 - 1, 0)}"

    def skeleton(self) -> nn.Module:
        from transformers import AutoModel, AutoModelForCausalLM

        auto = AutoModelForCausalLM if self.wants_causal_lm else AutoModel
        with torch.device("meta"):
            return auto.from_config(self.config)

    def load(self, device: str) -> nn.Module:
        """The checkpoint with its causal-LM head when it has one, else its base model
        (``AutoModel``, tagged with the reason ``no_lm_reason`` returns). Refuses a checkpoint
        that lacks weights of the model it is loaded as: they would be freshly initialised."""
        from transformers import AutoModel, AutoModelForCausalLM

        reason = None
        if self.wants_causal_lm:
            model, info = self._from_pretrained(AutoModelForCausalLM)
            fresh = _fresh_weights(info)
            if not fresh:
                return model.to(device).eval()
            reason = (
                f"the checkpoint has no trained causal-LM head ({', '.join(fresh[:3])} would be "
                "freshly initialised)"
            )
        archs = ", ".join(getattr(self.config, "architectures", None) or [])
        reason = reason or f"the checkpoint ({archs or 'no architecture'}) has no causal-LM head"
        model, info = self._from_pretrained(AutoModel)
        fresh = _fresh_weights(info)
        if fresh:
            raise UserError(
                f"{self.name}: the checkpoint lacks weights of {type(model).__name__} "
                f"({', '.join(fresh[:5])}); they would be random, so nothing is computed"
            )
        setattr(model, NO_LM_ATTR, reason + "; CE, KL and Δ-LM are not computed")
        return model.to(device).eval()

    def _from_pretrained(self, auto: type) -> tuple[nn.Module, dict]:
        try:
            return auto.from_pretrained(self.name, dtype=torch.float32, output_loading_info=True)
        except OSError as e:
            raise UserError(f"cannot load model {self.name!r}: {e}") from e

    @functools.cached_property
    def tokenizer(self) -> object:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.name)
        except OSError as e:
            raise UserError(f"cannot load the tokenizer of {self.name!r}: {e}") from e

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of whole documents; no "longer than the maximum sequence length" warning:
        packing cuts them into sequences of the context's length."""
        return self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _fresh_weights(info: dict) -> list[str]:
    """The parameters ``from_pretrained`` had to initialise (missing or mismatched in the
    checkpoint), from its ``output_loading_info``."""
    mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])]
    return sorted(info.get("missing_keys", [])) + sorted(mismatched)


def pick_device(name: str) -> str:
    """The torch device for ``--device`` (auto: CUDA when visible); a UserError for a GPU that
    is not there."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    return name


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def weights_digest(folder: Path) -> str:
    """A digest of a local model folder's weight files and config (``paths.files_digest``:
    contents up to a size limit, else sizes and modification times)."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    return files_digest(files, folder)


def hf_subject(name: str) -> HFSubject:
    """A Hugging Face model by Hub id or local folder. Its key names it and its revision (Hub)
    or a digest of its weight files (local), so a changed checkpoint gets a new cache."""
    local = Path(name).expanduser()
    missing = UserError(
        f"--model {name}: no such file or directory, and not a bundled model "
        f"({', '.join(BYTELM_PRESETS)})"
    )
    if not local.exists() and looks_like_path(name):
        raise missing
    is_local = local.exists()
    try:
        from transformers import AutoConfig
    except ImportError as e:
        raise UserError(
            f"model {name!r} is not bundled; Hugging Face models need the hf extra: "
            "pip install -e '.[hf]'"
        ) from e
    source = str(local) if is_local else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        if hub_offline() and not is_local:
            raise UserError(
                f"{missing}; nor in the local Hugging Face cache (HF_HUB_OFFLINE is set: "
                "the Hub was not asked)"
            ) from e
        raise UserError(
            f"cannot load model {name!r} (bundled models: {', '.join(BYTELM_PRESETS)}): {e}"
        ) from e
    revision = (
        "w" + weights_digest(local)[:16] if is_local else getattr(config, "_commit_hash", None)
    )
    key = "hf-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + f"-{revision}"
    subject = HFSubject(
        source, key, config.hidden_size, config.num_hidden_layers, None, config=config
    )
    tok = subject.tokenizer
    starts = {"bos": tok.bos_token_id, "cls": getattr(tok, "cls_token_id", None)}
    subject.start_token = next((k for k, t in starts.items() if t is not None), None)
    subject.bos = starts.get(subject.start_token)
    separators = {"eos": tok.eos_token_id, "sep": getattr(tok, "sep_token_id", None)}
    subject.separator_token = next((k for k, t in separators.items() if t is not None), None)
    subject.separator = separators.get(subject.separator_token)
    return subject


def get_subject(name: str, seq_len: int) -> Subject:
    """The subject model called ``name``; a UserError for one that does not exist."""
    if name in BYTELM_PRESETS:
        cfg = BYTELM_PRESETS[name]
        subject, context = (
            ByteLMSubject(name, cfg.key(), cfg.d_model, cfg.n_layer, BOS, cfg=cfg),
            cfg.seq_len,
        )
    else:
        subject = hf_subject(name)
        config = subject.config
        context = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
    if context is not None and seq_len > context:
        raise UserError(f"--seq-len {seq_len} exceeds {name}'s context of {context}")
    return subject
