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

Under torchrun (``distributed``) every rank steps its own SAE on its share of each batch
(``cfg.batch_size`` is the global batch): it starts from rank 0's state, its gradients,
fired latents and buffers are combined after each backward pass (``distributed.reduce_step``),
and on logging steps the logged losses are the mean over the ranks and the ranks' weights are
checked to be identical. Only a ``state_path`` is saved to (rank 0's).

A ``ShardedSAE`` (``--shard-latents``: every rank holds its shard and reads the whole batch)
combines its ranks' work inside its forward and backward: the trainer then neither shares rank
0's start state nor reduces the step nor compares the ranks' weights; each rank saves its own
``state_path``, and the ranks check that they resume at the same step.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashsae.cache.errors import UserError
from flashsae.cache.loader import ActivationLoader

from . import distributed
from .config import RunConfig
from .files import write_output
from .sae import SAE, SPARSITY_WARMUP
from .sharded import ShardedSAE
from .target_l0 import L0Controller
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
    target_l0: float | None = None  # steer λ towards this L0 (``target_l0.L0Controller``)


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


def training_state(
    step: int,
    sae: SAE,
    opt: torch.optim.Optimizer,
    last_fired: torch.Tensor,
    controller: L0Controller | None = None,
) -> dict:
    """The training state (tensors and plain containers only), with the world size that made
    it (``distributed.world_size``) and the L0 controller's state when there is one."""
    state = {
        "step": step,
        "sae": sae.state_dict(),
        "opt": opt.state_dict(),
        "last_fired": last_fired,
        "dead_budget": sae.dead_budget,
        "rng": torch.get_rng_state(),
        "world_size": distributed.world_size(),
    }
    if controller is not None:
        state["l0_controller"] = controller.state_dict()
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def save_state(
    path: Path,
    step: int,
    sae: SAE,
    opt: torch.optim.Optimizer,
    last_fired: torch.Tensor,
    controller: L0Controller | None = None,
) -> None:
    """Write the training state atomically."""
    state = training_state(step, sae, opt, last_fired, controller)
    write_output(path, lambda f: torch.save(state, f))


def load_state(
    path: Path | str,
    sae: SAE,
    opt: torch.optim.Optimizer,
    state: dict | None = None,
    controller: L0Controller | None = None,
) -> tuple[int, torch.Tensor]:
    """Restore a ``save_state`` file (``weights_only``: no code runs), or the ``state`` dict
    read already (``path`` then only names it), the L0 controller's state too when given;
    (step, last_fired). A UserError when the file is truncated, garbage or of another SAE or
    controller, or was saved by a run of another world size."""

    def unreadable(e: Exception) -> UserError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return UserError(
            f"{path} is not a readable training state ({reason}); delete it to start over"
        )

    try:
        if state is None:
            state = torch.load(path, map_location=sae.W_dec.device, weights_only=True)
    except Exception as e:  # a damaged file fails in many ways (pickle, zip, EOF, index, ...)
        raise unreadable(e) from e
    try:
        saved, now = state.get("world_size", 1), distributed.world_size()
        if saved != now:
            raise UserError(
                f"{path} was saved by a run of {_processes(saved)}, and this one has "
                f"{_processes(now)}; resume it with {_processes(saved)}: the data order and "
                "the batches per rank depend on the world size"
            )
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        sae.dead_budget = state.get("dead_budget")
        torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        if controller is not None:
            controller.load_state_dict(state["l0_controller"])
        step, last_fired = state["step"], state["last_fired"]
        if not isinstance(step, int) or last_fired.shape != (sae.cfg.n_latents,):
            raise ValueError("unexpected step or dead-latent counters")
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise unreadable(e) from e
    return step, last_fired.to(sae.W_dec.device)


def _processes(n: int) -> str:
    return "one process" if n == 1 else f"{n} processes (torchrun)"


class SAETraining:
    """The loop state of one SAE: optimizer, dead-latent counters, "first bad step", checkpoint,
    logger. ``train_many`` drives several of them from one stream of batches (a sweep), each
    exactly as ``train_sae`` drives one: a member's weights depend only on its own settings,
    seed and the batches, never on the other members.

    With ``state_path``, training resumes from it when it exists (``first`` is then the step it
    holds) and saves to it every ``cfg.checkpoint_every`` steps.
    """

    def __init__(
        self, sae: SAE, cfg: TrainConfig, logger: RunLogger, state_path: Path | None = None
    ) -> None:
        self.sae, self.cfg, self.logger, self.state_path = sae, cfg, logger, state_path
        self.device = device = sae.W_dec.device
        self.steps = steps = cfg.tokens // cfg.batch_size
        self.opt = torch.optim.Adam(
            sae.parameters(), lr=cfg.lr, betas=sae.adam_betas, fused=device.type == "cuda"
        )
        self.first = 0
        self.last_fired = torch.zeros(sae.cfg.n_latents, dtype=torch.long, device=device)
        sae.dead_budget = 0  # no latent is dead before the first step
        self.controller = None
        if cfg.target_l0 is not None:
            self.controller = L0Controller(cfg.target_l0, sae.cfg.sparsity_coeff, device)
        self.saved: int | None = None  # the step of the state in state_path
        self.sharded = isinstance(sae, ShardedSAE)
        if state_path is not None and state_path.exists():
            self.first, self.last_fired = load_state(
                state_path, sae, self.opt, controller=self.controller
            )
            if not 0 <= self.first <= steps:
                raise UserError(
                    f"{state_path} is at step {self.first}, outside this run's {steps} steps"
                )
            self.saved = self.first
            print(f"resuming from {state_path} at step {self.first} of {steps}")
        start = None
        if self.sharded:  # each rank resumed its own shard: at one step
            distributed.check_agree({"the step of their training states": self.first})
        else:
            start = distributed.share_state(
                lambda: training_state(self.first, sae, self.opt, self.last_fired, self.controller)
            )
        if start is not None:  # another rank than 0: start where rank 0 starts
            self.first, self.last_fired = load_state(
                "rank 0's state", sae, self.opt, start, controller=self.controller
            )
        self.first_bad = torch.full((), steps, dtype=torch.long, device=device)  # none yet
        self.start = self.t_log = time.time()
        self.step_log = self.first

    def check_finite(self) -> None:
        """Raise NonFiniteLoss if a step so far had a non-finite loss (a host sync)."""
        bad = int(self.first_bad)
        if bad < self.steps:
            kept = (
                f"{self.state_path} keeps step {self.saved}"
                if self.saved is not None
                else "no checkpoint was saved"
            )
            raise NonFiniteLoss(
                f"training stopped: non-finite loss or gradient (NaN/inf) at step {bad} of "
                f"{self.steps}; {kept}; check the activations (python -m flashsae.cache verify) "
                "and --lr"
            )

    def save(self, step: int) -> None:
        self.check_finite()
        save_state(self.state_path, step, self.sae, self.opt, self.last_fired, self.controller)
        self.saved = step

    def step(self, batch: torch.Tensor, step: int) -> dict | None:
        """Training step ``step`` on ``batch`` (raw activations on the SAE's device; read, not
        modified), then the checkpoint and log of that step when due; the logged record on
        logging steps."""
        sae, cfg, opt = self.sae, self.cfg, self.opt
        seen = step * cfg.batch_size
        dead = dead_latents(self.last_fired, seen, cfg.dead_window)
        x = batch.float() * sae.cfg.input_scale
        lr = lr_at(step, self.steps, cfg.lr, sae.lr_decay_frac)
        for group in opt.param_groups:
            group["lr"] = lr
        progress = step / self.steps
        if self.controller is not None:
            sae.controlled_coeff = self.controller.coeff()
        with autocast(self.device, cfg.dtype):
            loss, parts, fired = sae.training_loss(x, dead, progress)
        if self.controller is not None and progress >= SPARSITY_WARMUP:
            if "l0" not in parts:
                raise UserError(
                    f"--target-l0: the {sae.arch} loss does not report its batch L0 (an l0 part)"
                )
            # the L0 of the whole batch: every rank's controller then sets the same λ
            self.controller.update(distributed.mean_over_ranks([parts["l0"]])[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not self.sharded:  # mean gradients, OR of fired, over ranks
            fired = distributed.reduce_step(sae, fired)
        sae.before_step()
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), sae.grad_clip or float("inf"))
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        self.first_bad = torch.where(finite, self.first_bad, self.first_bad.clamp(max=step))
        opt.step()
        sae.after_step()
        self.last_fired.masked_fill_(fired, seen + cfg.batch_size)
        done = step + 1
        if (
            self.state_path is not None
            and cfg.checkpoint_every
            and done % cfg.checkpoint_every == 0
        ):
            self.save(done)
        if step % cfg.log_every == 0 or done == self.steps:  # the only host syncs of the loop
            self.check_finite()
            loss, *values = distributed.mean_over_ranks([loss, *parts.values()])
            parts = dict(zip(parts, values, strict=True))
            if not self.sharded:
                distributed.check_in_sync(sae, done)
            last = dead_latents(self.last_fired, done * cfg.batch_size, cfg.dead_window)
            sae.dead_budget = aux_budget(int(last.sum()))
            now = time.time()
            tokens = (done - self.step_log) * cfg.batch_size
            record = {
                "losses/loss": loss.item(),
                **{f"losses/{k}": v.item() for k, v in parts.items()},
                "sparsity/dead_frac": dead.float().mean().item(),
                "details/lr": lr,
                "details/sparsity_coeff": self.sparsity_coeff(),
                "details/grad_norm": grad_norm.item(),
                "details/tokens": done * cfg.batch_size,
                "perf/tokens_per_s": tokens / max(now - self.t_log, 1e-9),
                "perf/step_ms": 1000 * (now - self.t_log) / max(done - self.step_log, 1),
            }
            if self.controller is not None:
                record["sparsity/running_l0"] = self.controller.running_l0.item()
            if self.device.type == "cuda":
                record["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.t_log, self.step_log = now, done
            self.logger.log(record, step=done * cfg.batch_size)
            return record
        return None

    def sparsity_coeff(self) -> float:
        """λ now: the L0 controller's (a host sync) or the config's."""
        if self.controller is None:
            return self.sae.cfg.sparsity_coeff
        return self.controller.coeff().item()

    def finish(self) -> dict[str, float]:
        """After the last step: the final check and save; the summary. With an L0 target, the
        final λ becomes the SAE's ``sparsity_coeff`` (so ``cfg.json`` records it) and goes into
        the summary with the target."""
        self.check_finite()
        if self.state_path is not None:
            self.save(self.steps)
        summary = {
            "tokens": self.steps * self.cfg.batch_size,
            "train_seconds": time.time() - self.start,
        }
        if self.controller is not None:
            lam = self.sparsity_coeff()
            self.sae.cfg = replace(self.sae.cfg, sparsity_coeff=lam)
            self.sae.controlled_coeff = None
            summary |= {"sparsity_coeff": lam, "target_l0": self.cfg.target_l0}
        return summary


def progress_fields(record: dict) -> dict[str, str]:
    """The progress bar's fields for a logged ``record``: the batch's FVU (the same
    normalised reconstruction error for every architecture, when its loss reports one), the
    total loss in the architecture's own units, the dead fraction."""
    fvu = record.get("losses/fvu")
    return {
        **({"fvu": f"{fvu:.4f}"} if fvu is not None else {}),
        "loss": f"{record['losses/loss']:.4f}",
        "dead": f"{record['sparsity/dead_frac']:.3f}",
    }


def train_many(members: list[SAETraining], loader: ActivationLoader) -> list[dict[str, float]]:
    """Step every member from one pass of ``loader``: each batch is read and copied to the
    device once, and every member whose steps include it trains on it (members resumed at
    different steps start from the earliest; the others join at their own). All members must
    have the loader's batch size. Returns their summaries; ``train_seconds`` is then the wall
    time of the shared loop, so it counts every member's steps.
    """
    size = members[0].cfg.batch_size
    if any(m.cfg.batch_size != size for m in members):
        raise ValueError("the members of one pass must share the batch size")
    first, last = min(m.first for m in members), max(m.steps for m in members)
    batches = loader.batches(start=first)
    bar = tqdm(
        total=last * size, initial=first * size, desc="training SAE", unit="tok", unit_scale=True,
        disable=not distributed.is_main(),
    )  # fmt: skip
    try:
        for step in range(first, last):
            batch = next(batches)
            for m in members:
                if m.first <= step < m.steps:
                    record = m.step(batch, step)
                    if record and len(members) == 1:
                        bar.set_postfix(progress_fields(record))
            bar.update(size)
    finally:
        bar.close()
    return [m.finish() for m in members]


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
    return train_many([SAETraining(sae, cfg, logger, state_path)], loader)[0]
