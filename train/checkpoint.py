"""Checkpoints: ``sae.safetensors`` + ``cfg.json`` in a folder.

Loading never executes code from a file: tensors come from safetensors, the config
from JSON.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from flashsae.cache.errors import UserError

from . import __version__
from .files import write_output
from .sae import SAE, SAE_CLASSES, SAEConfig

RUN_FILES = ("sae.safetensors", "train_state.pt")  # a folder holding one is a run or checkpoint


def save_sae(sae: SAE, folder: Path, train_dtype: str | None = None) -> None:
    """Write ``sae.safetensors`` and ``cfg.json`` to ``folder``.

    The input scale s used in training is folded into the weights (``input_scale`` 1) and
    recorded as ``normalization.scale``: metrics in the run's units use x·s. ``train_dtype``
    (the compute dtype of training, "bf16" or "fp32") is recorded when given; the saved
    weights are fp32 either way.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror}") from e
    tensors = {k: v.float().cpu().contiguous() for k, v in sae.folded().items()}
    write_output(folder / "sae.safetensors", save(tensors))
    cfg = {
        **asdict(sae.cfg),
        "input_scale": 1.0,
        "normalization": {"scale": sae.cfg.input_scale, "folded": True},
        "flashsae_version": __version__,
        **({"train_dtype": train_dtype} if train_dtype else {}),
    }
    write_output(folder / "cfg.json", json.dumps(cfg, indent=2))


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a checkpoint folder (``cfg.json`` + ``sae.safetensors``); no code is executed."""
    folder = Path(path)
    try:
        raw = json.loads((folder / "cfg.json").read_text())
    except FileNotFoundError as e:
        raise UserError(f"{folder} has no cfg.json; is it a flashsae checkpoint?") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / 'cfg.json'} is not valid JSON ({e})") from e
    for f in fields(SAEConfig):
        if f.name not in raw and f.default is MISSING:
            raise UserError(f"{folder / 'cfg.json'} lacks the key {f.name!r}")
    cfg = SAEConfig(**{f.name: raw[f.name] for f in fields(SAEConfig) if f.name in raw})
    if cfg.arch not in SAE_CLASSES:
        raise UserError(f"{folder / 'cfg.json'}: unknown arch {cfg.arch!r}")
    sae = SAE_CLASSES[cfg.arch](cfg)
    try:
        sae.load_state_dict(load_file(folder / "sae.safetensors"))
    except (OSError, RuntimeError, SafetensorError) as e:
        raise UserError(f"cannot load {folder / 'sae.safetensors'}: {e}") from e
    return sae.to(device).eval()
