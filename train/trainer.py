"""The SAE training loop: Adam, decoder-norm maintenance, dead-latent tracking, logging.

A latent is dead when it has not fired in the last W tokens, W = ``dead_window``
capped by the tokens seen so far; dead latents feed the AuxK loss.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .sae import TopKSAE
from .wandb_log import RunLogger


@dataclass
class TrainConfig:
    tokens: int
    batch_size: int = 4096
    lr: float = 1e-3
    decay_frac: float = 0.2  # lr decays linearly to 0 over this last fraction of steps
    dead_window: int = 10_000_000
    log_every: int = 25


def lr_at(step: int, steps: int, cfg: TrainConfig) -> float:
    decay_start = int(steps * (1 - cfg.decay_frac))
    if step < decay_start:
        return cfg.lr
    return cfg.lr * (steps - step) / max(steps - decay_start, 1)


def train_sae(
    sae: TopKSAE, batches: Iterator[torch.Tensor], cfg: TrainConfig, logger: RunLogger
) -> dict[str, float]:
    """Train ``sae`` on ``cfg.tokens`` rows of raw activations; returns a summary."""
    device = sae.W_dec.device
    steps = cfg.tokens // cfg.batch_size
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, fused=device.type == "cuda")
    last_fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=device)
    scale = sae.cfg.input_scale
    start = time.time()
    bar = tqdm(total=steps * cfg.batch_size, desc="training SAE", unit="tok", unit_scale=True)
    for step in range(steps):
        seen = step * cfg.batch_size
        dead = (seen - last_fired >= min(cfg.dead_window, seen)) & (seen > 0)
        x = next(batches).float() * scale
        lr = lr_at(step, steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, parts, idx = sae.training_loss(x, dead)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.before_step()
        opt.step()
        sae.after_step()
        last_fired[idx.flatten().long()] = seen + cfg.batch_size
        bar.update(cfg.batch_size)
        if step % cfg.log_every == 0 or step == steps - 1:
            elapsed = time.time() - start
            record = {
                "losses/loss": loss.item(),
                "losses/mse": parts["mse"].item(),
                "losses/aux": parts["aux"].item(),
                "sparsity/dead_frac": dead.float().mean().item(),
                "details/lr": lr,
                "details/tokens": seen + cfg.batch_size,
                "perf/tokens_per_s": (seen + cfg.batch_size) / elapsed,
            }
            bar.set_postfix(
                loss=f"{record['losses/loss']:.4f}", dead=f"{record['sparsity/dead_frac']:.3f}"
            )
            logger.log(record, step=seen + cfg.batch_size)
    bar.close()
    return {"tokens": steps * cfg.batch_size, "train_seconds": time.time() - start}
