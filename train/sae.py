"""Sparse autoencoder modules, their checkpoints, and ``load_sae``.

TopK SAE (Gao et al. 2024), parameters stored as in SAELens: W_enc [d, n],
b_enc [n], W_dec [n, d] (row i is latent i's decoder direction), b_dec [d]:

    z = (x - b_dec) W_enc + b_enc,   f = ReLU(TopK_k(z)),   x̂ = f W_dec + b_dec

Loss = ||x - x̂||² / E||x - μ||² + α AuxK, where AuxK is the same normalized MSE
of reconstructing e = sg(x - x̂) from the top k_aux pre-activations of dead
latents (α = 1/32, k_aux = d/2). Decoder rows stay unit-norm.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flashsae.cache.errors import UserError
from flashsae.kernels import encode_topk, normalize_decoder_, remove_parallel_grad_, sparse_decode

from . import __version__

ARCHS = ("topk",)


@dataclass
class SAEConfig:
    """What a checkpoint's ``cfg.json`` holds (plus the flashsae version)."""

    arch: str
    d: int
    n_latents: int
    k: int
    k_aux: int
    aux_alpha: float = 1 / 32
    site: str = ""
    model: str = ""
    input_scale: float = 1.0  # multiply raw activations by this before the SAE (1 once folded)


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - mean(x)||² over the batch."""
    return (x - x_hat).square().sum() / (x - x.mean(0)).square().sum().clamp_min(1e-12)


class TopKSAE(nn.Module):
    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w_dec = torch.randn(cfg.n_latents, cfg.d)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k latents per row: (values [B, k], int32 indices [B, k])."""
        vals, idx, _, _ = encode_topk(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k)
        return vals, idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents f [B, n]."""
        vals, idx = self.encode_sparse(x)
        return torch.zeros(
            x.shape[0], self.cfg.n_latents, device=x.device, dtype=vals.dtype
        ).scatter(1, idx.long(), vals)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = self.encode_sparse(x)
        return sparse_decode(vals, idx, self.W_dec, self.b_dec)

    def training_loss(
        self, x: torch.Tensor, dead_mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(loss, its parts, indices of the active latents) for one batch."""
        k_aux = self.cfg.k_aux
        vals, idx, aux_vals, aux_idx = encode_topk(
            x, self.W_enc, self.b_enc, self.b_dec, self.cfg.k, k_aux, dead_mask
        )
        x_hat = sparse_decode(vals, idx, self.W_dec, self.b_dec)
        mse = normalized_mse(x, x_hat)
        if k_aux:
            e = (x - x_hat).detach()
            e_hat = sparse_decode(aux_vals, aux_idx, self.W_dec, torch.zeros_like(self.b_dec))
            aux = normalized_mse(e, e_hat) * dead_mask.any()
        else:
            aux = torch.zeros((), device=x.device)
        loss = mse + self.cfg.aux_alpha * aux
        return loss, {"mse": mse.detach(), "aux": aux.detach()}, idx

    @torch.no_grad()
    def before_step(self) -> None:
        """Remove the decoder gradient component parallel to each (unit) row."""
        if self.W_dec.grad is not None:
            remove_parallel_grad_(self.W_dec, self.W_dec.grad)

    @torch.no_grad()
    def after_step(self) -> None:
        normalize_decoder_(self.W_dec)

    @torch.no_grad()
    def init_b_dec(self, mean: torch.Tensor) -> None:
        self.b_dec.copy_(mean)

    @torch.no_grad()
    def folded(self) -> dict[str, torch.Tensor]:
        """Weights acting on raw activations: the input scale s folded in.

        With x' = s·x: W_enc ← s·W_enc, W_dec ← W_dec / s, b_dec ← b_dec / s, and f unchanged.
        """
        s = self.cfg.input_scale
        return {
            "W_enc": self.W_enc * s,
            "b_enc": self.b_enc.clone(),
            "W_dec": self.W_dec / s,
            "b_dec": self.b_dec / s,
        }


SAE_CLASSES: dict[str, type[TopKSAE]] = {"topk": TopKSAE}


def save_sae(sae: TopKSAE, folder: Path) -> None:
    """Write ``sae.safetensors`` (normalization folded in) and ``cfg.json`` to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in sae.folded().items()}
    save_file(tensors, folder / "sae.safetensors.tmp")
    (folder / "sae.safetensors.tmp").replace(folder / "sae.safetensors")
    cfg = {**asdict(sae.cfg), "input_scale": 1.0, "flashsae_version": __version__}
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
    """Load a checkpoint folder (``cfg.json`` + ``sae.safetensors``); no code is executed."""
    folder = Path(path)
    try:
        raw = json.loads((folder / "cfg.json").read_text())
    except FileNotFoundError as e:
        raise UserError(f"{folder} has no cfg.json; is it a flashsae checkpoint?") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / 'cfg.json'} is not valid JSON ({e})") from e
    names = {f.name for f in fields(SAEConfig)}
    for f in fields(SAEConfig):
        if f.name not in raw and f.default is MISSING:
            raise UserError(f"{folder / 'cfg.json'} lacks the key {f.name!r}")
    cfg = SAEConfig(**{k: v for k, v in raw.items() if k in names})
    if cfg.arch not in SAE_CLASSES:
        raise UserError(f"{folder / 'cfg.json'}: unknown arch {cfg.arch!r}")
    sae = SAE_CLASSES[cfg.arch](cfg)
    sae.load_state_dict(load_file(folder / "sae.safetensors"))
    return sae.to(device).eval()
