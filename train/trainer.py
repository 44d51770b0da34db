"""The SAE training loop: Adam, decoder-norm maintenance, dead-latent tracking, logging, resume.

A latent is dead when it has not fired in the last W tokens, W = ``dead_window``
capped by the tokens seen so far; dead latents feed the AuxK loss. Every
``checkpoint_every`` steps the whole training state (SAE, optimizer, step, dead-latent
counters, RNG) goes to ``train_state.pt``; the loader position is the step, so a
resumed run ends with the same weights as an uninterrupted one.

``dtype`` bf16 runs the SAE's forward and backward under bf16 autocast, with fp32 master
weights and Adam state (inputs are centred in fp32 by the kernels); fp32 allows TF32 matmuls on
GPUs. The loop has no host sync except on the steps that log (every ``log_every``) and save.

A non-finite loss or gradient norm stops the run (``NonFiniteLoss``, naming the first such
step). Each step folds its check into a device-side "first bad step" (no sync); that number is
read on logging steps and before every save, and a save after a bad step never happens, so
``train_state.pt`` stays the last state from before it. Adam is not guarded: a bad step
poisons the weights and moments in memory, but they are discarded with the run.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashsae.cache.errors import UserError
from flashsae.cache.loader import ActivationLoader

from .config import RunConfig
from .files import write_output
from .sae import SAE
from .wandb_log import RunLogger


@dataclass
class TrainConfig:
    """The training loop's settings; defaults are ``RunConfig``'s (see its help)."""

    tokens: int
    batch_size: int = RunConfig.batch_size
    lr: float = RunConfig.lr
    dead_window: int = RunConfig.dead_window
    log_every: int = 25
    checkpoint_every: int = RunConfig.checkpoint_every  # steps between saves (0: only at the end)
    dtype: str = "fp32"  # "bf16" (autocast) or "fp32"


def lr_at(step: int, steps: int, lr: float, decay_frac: float) -> float:
    """Constant, then linear decay to 0 over the last ``decay_frac`` of steps."""
    decay_start = int(steps * (1 - decay_frac))
    if step < decay_start:
        return lr
    return lr * min(1.0, (steps - step) / max(steps - decay_start, 1))


def dead_latents(last_fired: torch.Tensor, seen: int, window: int) -> torch.Tensor:
    """[n] bool: latents that have not fired in the last min(window, seen) tokens."""
    return (seen - last_fired >= min(window, seen)) & (seen > 0)


def aux_budget(n_dead: int) -> int:
    """AuxK columns for ``n_dead`` dead latents: the next power of two (few distinct shapes,
    so few kernel compiles), 0 for none."""
    return 0 if n_dead == 0 else 1 << (n_dead - 1).bit_length()


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``dtype`` "bf16"; TF32 matmuls for "fp32" on CUDA."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return contextlib.nullcontext()


class NonFiniteLoss(UserError):
    """Training met a NaN or infinite loss or gradient norm."""


def save_state(
    path: Path, step: int, sae: SAE, opt: torch.optim.Optimizer, last_fired: torch.Tensor
) -> None:
    """Write the training state atomically (tensors and plain containers only)."""
    state = {
        "step": step,
        "sae": sae.state_dict(),
        "opt": opt.state_dict(),
        "last_fired": last_fired,
        "dead_budget": sae.dead_budget,
        "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    write_output(path, lambda f: torch.save(state, f))


def load_state(path: Path, sae: SAE, opt: torch.optim.Optimizer) -> tuple[int, torch.Tensor]:
    """Restore a ``save_state`` file (``weights_only``: no code runs); (step, last_fired).
    A UserError when the file is truncated, garbage or of another SAE."""

    def unreadable(e: Exception) -> UserError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return UserError(
            f"{path} is not a readable training state ({reason}); delete it to start over"
        )

    try:
        state = torch.load(path, map_location=sae.W_dec.device, weights_only=True)
    except Exception as e:  # a damaged file fails in many ways (pickle, zip, EOF, index, ...)
        raise unreadable(e) from e
    try:
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        sae.dead_budget = state.get("dead_budget")
        torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        step, last_fired = state["step"], state["last_fired"]
        if not isinstance(step, int) or last_fired.shape != (sae.cfg.n_latents,):
            raise ValueError("unexpected step or dead-latent counters")
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise unreadable(e) from e
    return step, last_fired


def train_sae(
    sae: SAE,
    loader: ActivationLoader,
    cfg: TrainConfig,
    logger: RunLogger,
    state_path: Path | None = None,
) -> dict[str, float]:
    """Train ``sae`` on ``cfg.tokens`` rows of raw activations; returns a summary.

    With ``state_path``, training resumes from it when it exists and saves to it
    every ``cfg.checkpoint_every`` steps.
    """
    device = sae.W_dec.device
    steps = cfg.tokens // cfg.batch_size
    opt = torch.optim.Adam(
        sae.parameters(), lr=cfg.lr, betas=sae.adam_betas, fused=device.type == "cuda"
    )
    first, last_fired = 0, torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=device)
    sae.dead_budget = 0  # no latent is dead before the first step
    saved = None  # the step of the state in state_path
    if state_path is not None and state_path.exists():
        first, last_fired = load_state(state_path, sae, opt)
        if not 0 <= first <= steps:
            raise UserError(f"{state_path} is at step {first}, outside this run's {steps} steps")
        saved = first
        print(f"resuming from {state_path} at step {first} of {steps}")
    first_bad = torch.full((), steps, dtype=torch.long, device=device)  # steps: none yet

    def check_finite() -> None:
        """Raise NonFiniteLoss if a step so far had a non-finite loss (a host sync)."""
        bad = int(first_bad)
        if bad < steps:
            kept = (
                f"{state_path} keeps step {saved}"
                if saved is not None
                else "no checkpoint was saved"
            )
            raise NonFiniteLoss(
                f"training stopped: non-finite loss or gradient (NaN/inf) at step {bad} of "
                f"{steps}; {kept}; check the activations (python -m flashsae.cache verify) "
                "and --lr"
            )

    def save(step: int) -> None:
        nonlocal saved
        check_finite()
        save_state(state_path, step, sae, opt, last_fired)
        saved = step

    batches = loader.batches(start=first)
    scale = sae.cfg.input_scale
    start, t_log, step_log = time.time(), time.time(), first
    bar = tqdm(
        total=steps * cfg.batch_size,
        initial=first * cfg.batch_size,
        desc="training SAE",
        unit="tok",
        unit_scale=True,
    )
    try:
        for step in range(first, steps):
            seen = step * cfg.batch_size
            dead = dead_latents(last_fired, seen, cfg.dead_window)
            x = next(batches).float() * scale
            lr = lr_at(step, steps, cfg.lr, sae.lr_decay_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast(device, cfg.dtype):
                loss, parts, fired = sae.training_loss(x, dead, step / steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.before_step()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                sae.parameters(), sae.grad_clip or float("inf")
            )
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            first_bad = torch.where(finite, first_bad, first_bad.clamp(max=step))
            opt.step()
            sae.after_step()
            last_fired.masked_fill_(fired, seen + cfg.batch_size)
            bar.update(cfg.batch_size)
            done = step + 1
            if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                save(done)
            if step % cfg.log_every == 0 or done == steps:  # the only host syncs of the loop
                check_finite()
                n_dead = int(dead_latents(last_fired, done * cfg.batch_size, cfg.dead_window).sum())
                sae.dead_budget = aux_budget(n_dead)
                now = time.time()
                record = {
                    "losses/loss": loss.item(),
                    **{f"losses/{k}": v.item() for k, v in parts.items()},
                    "sparsity/dead_frac": dead.float().mean().item(),
                    "details/lr": lr,
                    "details/sparsity_coeff": sae.cfg.sparsity_coeff,
                    "details/grad_norm": grad_norm.item(),
                    "details/tokens": done * cfg.batch_size,
                    "perf/tokens_per_s": (done - step_log)
                    * cfg.batch_size
                    / max(now - t_log, 1e-9),
                    "perf/step_ms": 1000 * (now - t_log) / max(done - step_log, 1),
                }
                if device.type == "cuda":
                    record["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                t_log, step_log = now, done
                bar.set_postfix(
                    loss=f"{record['losses/loss']:.4f}", dead=f"{record['sparsity/dead_frac']:.3f}"
                )
                logger.log(record, step=done * cfg.batch_size)
    finally:
        bar.close()
    check_finite()
    if state_path is not None:
        save(steps)
    return {"tokens": steps * cfg.batch_size, "train_seconds": time.time() - start}
