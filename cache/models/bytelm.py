"""The bundled subject model: a small byte-level GPT trained on the Python standard library.

It needs no download: the corpus is the ``.py`` source of the running interpreter's
standard library (tests and vendored packages excluded), split into train and
held-out files by a hash of each file's path. The model is trained on first use
and cached under ``$FLASHSAE_HOME/models/<key>`` (default ``~/.cache/flashsae``),
where the key hashes the config and the Python version (the corpus).

Every block exposes TransformerLens-style sites as identity modules, so
``blocks.{L}.hook_resid_post`` is both the site name and the module path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..paths import flashsae_home

BOS = 256  # token id prepended to every sequence; bytes are 0..255
HELD_OUT_EVERY = 20  # one file in 20 is held out for validation


@dataclass(frozen=True)
class ByteLMConfig:
    """Architecture and training recipe; every field is part of the cache key."""

    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    seq_len: int = 128
    vocab: int = 257
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "python": sys.version_info[:2]}, sort_keys=True)
        return "bytelm-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


class Block(nn.Module):
    """Pre-LN GPT-2 block: x += attn(ln1(x)); x += mlp(ln2(x))."""

    def __init__(self, cfg: ByteLMConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)
        for name in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
            setattr(self, "hook_" + name, nn.Identity())

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x))))
        mlp = self.fc_out(F.gelu(self.fc(self.ln2(x))))
        return self.hook_resid_post(x + self.hook_mlp_out(mlp))


class ByteLM(nn.Module):
    """Byte-level causal transformer; ``forward(tokens [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: ByteLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def stdlib_files() -> list[Path]:
    """Sorted ``.py`` files of this interpreter's standard library, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files)


def _is_held_out(path: Path) -> bool:
    return int(hashlib.md5(path.name.encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def split_files(split: str) -> list[Path]:
    """The stdlib files of ``split``: "val" (one in HELD_OUT_EVERY, by name hash) or "train"."""
    return [p for p in stdlib_files() if _is_held_out(p) == (split == "val")]


def corpus(split: str) -> torch.Tensor:
    """All bytes of the ``split`` stdlib files, concatenated, as uint8."""
    data = b"".join(p.read_bytes() for p in split_files(split))
    if not data:
        raise UserError(
            f"no Python standard library source found under {sysconfig.get_paths()['stdlib']}"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(data: torch.Tensor, seq_len: int, starts: torch.Tensor, bos: int = BOS) -> torch.Tensor:
    """Token sequences ``[bos, data[s], ..., data[s + seq_len - 2]]`` for each start s."""
    body = data[starts[:, None] + torch.arange(seq_len - 1)].long()
    return torch.cat([torch.full((len(starts), 1), bos, dtype=torch.long), body], dim=1)


def lm_loss(model: ByteLM, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats, predicting tokens[:, 1:] from each prefix."""
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_loss(model: ByteLM, n_seqs: int = 256, device: str = "cpu") -> float:
    """Cross-entropy (nats per byte) on evenly spaced windows of the held-out files."""
    data = corpus("val")
    starts = torch.linspace(0, len(data) - model.cfg.seq_len, n_seqs).long()
    tokens = windows(data, model.cfg.seq_len, starts).to(device)
    losses = [lm_loss(model, chunk).item() for chunk in tokens.split(64)]
    return sum(losses) / len(losses)


def train_bytelm(cfg: ByteLMConfig, device: str = "cpu") -> tuple[ByteLM, float]:
    """Train from scratch with AdamW and cosine decay; returns (model, held-out loss)."""
    torch.manual_seed(cfg.seed)
    data = corpus("train")
    model = ByteLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="training bundled byte LM", unit="step")
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - cfg.seq_len, (cfg.batch_size,), generator=gen)
        loss = lm_loss(model, windows(data, cfg.seq_len, starts).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model, held_out_loss(model, device=device)


def load_bytelm(cfg: ByteLMConfig | None = None, device: str = "cpu") -> ByteLM:
    """The bundled model for ``cfg``: loaded from the cache, or trained and cached first."""
    cfg = cfg or ByteLMConfig()
    folder = flashsae_home() / "models" / cfg.key()
    weights = folder / "model.safetensors"
    if not weights.exists():
        print(f"bundled model {cfg.key()} not cached; training it on the Python stdlib (once)")
        start = time.time()
        model, loss = train_bytelm(cfg, device)
        print(f"bundled model: held-out loss {loss:.3f} nats/byte after {time.time() - start:.0f}s")
        folder.mkdir(parents=True, exist_ok=True)
        info = {"config": asdict(cfg), "held_out_loss": loss, "train_seconds": time.time() - start}
        (folder / "info.json").write_text(json.dumps(info, indent=2))
        tmp = folder / "model.safetensors.tmp"
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, weights)
        return model
    model = ByteLM(cfg)
    model.load_state_dict(load_file(weights))
    return model.to(device).eval()
