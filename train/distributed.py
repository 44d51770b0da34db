"""Data parallel training under ``torchrun``: the process groups, rank helpers, the per-step
reduction, and the checks that keep ranks from hanging or silently diverging.

``torchrun --nproc-per-node N -m flashsae.train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; ``started`` reads them (none set, or a world of 1:
one process, no group). The backend is NCCL when the run's device is CUDA (each rank on
``cuda:LOCAL_RANK``) and gloo on the CPU; a second, gloo group carries the control traffic
(start-up digests, rank 0's start state, waiting for rank 0).

Semantics: ``--batch-size`` is the global batch B. Each of the N ranks reads B/N rows per step,
disjoint from the others' (``ActivationLoader(rank, world_size)``; when every loader buffer's
rows divide by N, the ranks' rows of a step are exactly the single-process batch). After the
backward pass the gradients are summed and divided by N, the latents that fired are OR-ed and
floating-point buffers (BatchTopK's θ) averaged (``reduce_step``), so clipping, the decoder-norm
step and Adam see the same numbers on every rank and the weights stay identical; logging steps
check that they are (``check_in_sync``). Batch-normalized losses pool the ranks
(``pooled_sq_dev``), so N ranks train the SAE that one process trains with batch B, up to fp32
rounding (BatchTopK's selection is per rank: its top B·k/N of each rank's B/N rows).

Rank 0 alone builds the cache (the others wait), logs, writes checkpoints and metrics and
evaluates; the others wait for it at the end.

Timeouts: collectives of the training steps time out after ``FLASHSAE_DIST_TIMEOUT`` seconds
(default 600), waits for rank 0 (its cache build, evaluation, and what it writes) after
``FLASHSAE_WAIT_TIMEOUT`` (default 86400). A lost rank makes the others stop with one
``error:`` line: a collective that fails raises ``DistributedError``, and the SIGTERM that
torchrun sends the survivors of a dead rank is answered at once (by a thread, even while the
main thread is blocked in a collective) with that line and exit code 143.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from flashsae.cache.errors import UserError

T = TypeVar("T")


class DistributedError(UserError):
    """Ranks that disagree, diverge or lost contact with each other."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel job."""

    rank: int
    world_size: int
    local_rank: int
    group: dist.ProcessGroup  # the training collectives (NCCL or gloo)
    control: dist.ProcessGroup  # gloo, with the wait timeout

    @property
    def name(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


_RANKS: Ranks | None = None


def current() -> Ranks | None:
    """The job of this process, or None for one process."""
    return _RANKS


def rank() -> int:
    return _RANKS.rank if _RANKS else 0


def world_size() -> int:
    return _RANKS.world_size if _RANKS else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, writes and evaluates."""
    return rank() == 0


def _seconds(name: str, default: float) -> datetime.timedelta:
    text = os.environ.get(name)
    try:
        value = float(text) if text else default
    except ValueError:
        raise UserError(f"{name}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise UserError(f"{name} must be positive, got {text}")
    return datetime.timedelta(seconds=value)


def rank_device(device: str) -> str:
    """The device of this rank for the run's resolved ``device``: ``cuda:LOCAL_RANK`` for CUDA
    under torchrun. A UserError for ``cuda:N`` under torchrun (each rank takes its own GPU)."""
    if _RANKS is None or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise UserError(
            f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK; pass --device "
            "cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return f"cuda:{_RANKS.local_rank}"


@contextlib.contextmanager
def started(device: str) -> Iterator[Ranks | None]:
    """Join the torchrun job described by the environment for the block (``device``: the run's
    resolved device, "cpu" or "cuda"); yields None, and does nothing, for one process."""
    global _RANKS
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or _RANKS is not None:
        yield _RANKS
        return
    if not dist.is_available():
        raise UserError("this torch has no torch.distributed; run one process")
    step_timeout = _seconds("FLASHSAE_DIST_TIMEOUT", 600)
    wait_timeout = _seconds("FLASHSAE_WAIT_TIMEOUT", 86400)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local}, but {torch.cuda.device_count()} GPU(s) are visible; "
                "--nproc-per-node must not exceed the GPUs of the machine"
            )
        torch.cuda.set_device(local)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=step_timeout)
        control = dist.new_group(backend="gloo", timeout=wait_timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the torchrun job: {_first_line(e)}") from e
    _RANKS = Ranks(dist.get_rank(), dist.get_world_size(), local, dist.group.WORLD, control)
    restore = _answer_sigterm(_RANKS.name)
    failed = True
    try:
        yield _RANKS
        failed = False
    finally:
        restore()
        if failed:  # torchrun SIGTERMs the other ranks when one fails: print the error line first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _RANKS = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _answer_sigterm(who: str) -> Callable[[], None]:
    """Exit with one ``error:`` line and code 143 as soon as SIGTERM arrives, whatever the main
    thread is doing: Python's C-level handler writes the signal number to a wakeup pipe, and a
    thread reading it exits the process. Returns the function that undoes this."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            got = os.read(r, 1)
            if got and got[0] == signal.SIGTERM and not done.is_set():
                with contextlib.suppress(OSError, ValueError):
                    print(
                        f"error: {who}: stopped by the launcher (SIGTERM): another rank failed "
                        "or was killed, or the job was stopped; its message or torchrun's "
                        "summary names it",
                        file=sys.stderr,
                        flush=True,
                    )
                os._exit(128 + signal.SIGTERM)
        os.close(r)

    threading.Thread(target=watch, name="flashsae-sigterm", daemon=True).start()

    def restore() -> None:
        done.set()
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, previous)
        os.write(w, b"\0")  # wake the thread so that it ends
        os.close(w)

    return restore


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@contextlib.contextmanager
def _contact(what: str) -> Iterator[None]:
    """A failed collective (a rank died, a timeout) as a DistributedError naming ``what``."""
    try:
        yield
    except RuntimeError as e:
        raise DistributedError(
            f"{_RANKS.name if _RANKS else 'this rank'}: lost contact with the other ranks while "
            f"{what} ({_first_line(e)}); another rank probably failed or was killed: see its "
            "message or torchrun's summary"
        ) from e


def share(value: T) -> T:
    """Rank 0's ``value`` on every rank (the others pass anything, typically None); they wait
    for rank 0 up to the wait timeout. ``value`` as is in one process."""
    if _RANKS is None:
        return value
    box = [value if _RANKS.rank == 0 else None]
    with _contact("waiting for rank 0"):
        dist.broadcast_object_list(box, src=0, group=_RANKS.control)
    return box[0]


def check_agree(items: dict[str, object]) -> None:
    """Raise DistributedError on every rank unless every rank has the same ``items`` (name ->
    a JSON-able value: a config, a digest), naming the first item that differs and how."""
    if _RANKS is None:
        return
    gathered: list = [None] * _RANKS.world_size
    with _contact("comparing the ranks' settings"):
        dist.all_gather_object(gathered, items, group=_RANKS.control)
    ours = gathered[0]
    for r, theirs in enumerate(gathered[1:], 1):
        for name in ours.keys() | theirs.keys():
            a, b = ours.get(name), theirs.get(name)
            if a != b:
                raise DistributedError(
                    f"the ranks disagree on {name}: {_difference(a, b, r)}; every rank must "
                    "run the same command on the same cache and code"
                )


def _difference(a: object, b: object, r: int) -> str:
    """What differs between rank 0's ``a`` and rank ``r``'s ``b``: the first differing key of
    two dicts (recursively), else both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            if a.get(key) != b.get(key):
                return f"{key} {_difference(a.get(key), b.get(key), r)}"
    return f"is {a!r} on rank 0, {b!r} on rank {r}"


def digest(value: object) -> str:
    """A short sha256 of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_digest() -> str:
    """A sha256 of flashsae's Python sources (kernels, cache, train): ranks must run one code."""
    h = hashlib.sha256()
    for package in ("kernels", "cache", "train"):
        root = Path(__file__).resolve().parent.parent / package
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode() + path.read_bytes())
    return h.hexdigest()[:16]


def share_state(make: Callable[[], dict]) -> dict | None:
    """Rank 0's ``make()`` (a ``torch.save``-able dict) on the other ranks, on their CPU; None
    on rank 0 and in one process."""
    if _RANKS is None:
        return None
    blob = share(_saved(make()) if _RANKS.rank == 0 else None)
    if _RANKS.rank == 0:
        return None
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def _saved(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def reduce_step(module: torch.nn.Module, fired: torch.Tensor) -> torch.Tensor:
    """After the backward pass of a step: every trainable parameter's gradient becomes the mean
    over the ranks (a missing gradient counts as zeros), floating-point buffers the mean over
    the ranks, and the [n] bool ``fired`` (latents that fired in this rank's rows) the OR over
    the ranks, which is returned. No host sync (the collectives are queued on the device)."""
    if _RANKS is None:
        return fired
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    extra = torch.cat([fired.float().flatten(), *(b.float().flatten() for b in buffers)])
    with _contact("all-reducing the gradients"):
        works = [
            dist.all_reduce(t, group=_RANKS.group, async_op=True)
            for t in [*(p.grad for p in params), extra]
        ]
        for work in works:
            work.wait()
    for p in params:
        p.grad.div_(_RANKS.world_size)
    start = fired.numel()
    for b in buffers:
        b.copy_((extra[start : start + b.numel()] / _RANKS.world_size).view_as(b))
        start += b.numel()
    return extra[: fired.numel()].view_as(fired) > 0


def pooled_sq_dev(x: torch.Tensor) -> torch.Tensor:
    """Σ_t ||x_t - μ||² over the rows of every rank (μ: their mean; every rank holds the same
    number of rows), from each rank's mean and sum of squared deviations (Chan et al.'s pairwise
    combination: Σ_r M2_r + m Σ_r ||μ_r - μ||², m rows per rank), one all-gather. Detached; the
    local value in one process."""
    x = x.detach()
    mean = x.mean(0)
    m2 = (x - mean).square().sum()
    if _RANKS is None:
        return m2
    local = torch.cat([mean, m2.reshape(1)])
    parts = [torch.empty_like(local) for _ in range(_RANKS.world_size)]
    with _contact("pooling the batch statistics"):
        dist.all_gather(parts, local, group=_RANKS.group)
    stats = torch.stack(parts)
    means, m2s = stats[:, :-1], stats[:, -1]
    return m2s.sum() + len(x) * (means - means.mean(0)).square().sum()


def mean_over_ranks(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over the ranks of each scalar of ``values`` (one all-reduce)."""
    if _RANKS is None:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    with _contact("averaging the logged losses"):
        dist.all_reduce(stacked, group=_RANKS.group)
    return list(stacked / _RANKS.world_size)


def check_in_sync(module: torch.nn.Module, step: int) -> None:
    """Raise DistributedError unless every rank holds the same parameters and buffers (their
    float64 sums agree to 1e-9, relative): a host sync, for logging steps."""
    if _RANKS is None:
        return
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    tensors = [*module.parameters(), *module.buffers()]
    local = torch.stack([t.detach().sum(dtype=torch.float64) for t in tensors])
    parts = [torch.empty_like(local) for _ in range(_RANKS.world_size)]
    with _contact("comparing the ranks' weights"):
        dist.all_gather(parts, local, group=_RANKS.group)
    sums = torch.stack(parts).cpu()
    off = (sums - sums[0]).abs() > 1e-9 * sums[0].abs().clamp_min(1.0)
    if off.any():
        r, i = (int(v) for v in off.nonzero()[0])
        raise DistributedError(
            f"the ranks' weights diverged after step {step}: {names[i]} of rank {r} differs "
            "from rank 0's; this is a bug, please report it"
        )
