"""Weights & Biases logging with a local ``metrics.jsonl`` mirror.

Mode: ``WANDB_MODE`` when set (``disabled`` turns W&B off), else online when an API
key is configured (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai), else
offline, in which case the ``wandb sync`` command is printed at the end. Steps are
counted in tokens; names are grouped as ``losses/*``, ``metrics/*``, ``sparsity/*``,
``perf/*`` and ``details/*``. The run's id is kept in ``wandb_run.json`` so that a
resumed run or a later evaluation logs to the same W&B entry. ``wandb`` is imported only when
a run logs to it, so a machine without it can train with ``WANDB_MODE=disabled``.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flashsae.cache.errors import UserError

from .files import open_output, write_output

if TYPE_CHECKING:
    from wandb.sdk.wandb_run import Run

RUN_FILE = "wandb_run.json"


def _wandb():  # noqa: ANN202 - the wandb module
    try:
        import wandb
    except ImportError as e:
        raise UserError(
            "wandb is not installed: pip install wandb, or set WANDB_MODE=disabled"
        ) from e
    return wandb


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


def _init(out: Path, name: str | None, config: dict | None, group: str | None = None) -> Run | None:
    """Start (or, when ``out/wandb_run.json`` exists, resume) the run of ``out``, in W&B
    ``group`` when given (the runs of one sweep)."""
    mode = wandb_mode()
    if mode == "disabled":
        return None
    saved = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
    run = _wandb().init(
        project=saved.get("project", os.environ.get("WANDB_PROJECT", "flashsae")),
        id=saved.get("id"),
        resume="allow" if saved else None,
        name=name,
        config=config,
        group=group,
        dir=str(out),
        mode=mode,
    )
    write_output(out / RUN_FILE, json.dumps({"id": run.id, "project": run.project, "mode": mode}))
    return run


def _finish(run: Run | None) -> None:
    if run is None:
        return
    run_dir = Path(run.dir).parent
    offline = run.settings.mode == "offline"
    run.finish()
    if offline:
        print(f"W&B offline run saved; upload it with: wandb sync {run_dir}")


class NullLogger:
    """A logger that discards everything (for sweeps and tests that keep only final metrics)."""

    def log(self, record: dict, step: int) -> None:
        pass


class RunLogger:
    """Logs dicts of scalars to W&B and appends them to ``out/metrics.jsonl``."""

    def __init__(self, out: Path, config: dict, name: str, group: str | None = None) -> None:
        self.out = Path(out)
        self.mirror = open_output(self.out / "metrics.jsonl", "a")  # closed in finish()
        self.run = _init(self.out, name, config, group)

    def log(self, record: dict, step: int) -> None:
        self.mirror.write(json.dumps({"step": step, **record}) + "\n")
        self.mirror.flush()
        if self.run is not None:
            self.run.log(record, step=step)

    def log_histogram(self, name: str, values: np.ndarray, step: int) -> None:
        """A histogram (W&B only; the mirror gets nothing)."""
        if self.run is not None:
            self.run.log({name: _wandb().Histogram(values)}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def log_artifact(self, name: str, files: list[Path]) -> None:
        """Attach files (checkpoint, metrics) to the run as an artifact of type model."""
        if self.run is None:
            return
        art = _wandb().Artifact(name, type="model")
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.mirror.close()
        _finish(self.run)

    def abort(self) -> None:
        """End a failed run: close the mirror, mark the W&B run failed (exit code 1)."""
        self.mirror.close()
        if self.run is not None:
            self.run.finish(exit_code=1)


def resume_run(out: Path, record: dict, images: dict[str, Path], artifact: Path) -> None:
    """Add an evaluation to the W&B entry of run ``out`` (if it has one): scalars to the
    summary, PNGs as images, ``artifact`` as a model artifact."""
    if not (out / RUN_FILE).exists() or wandb_mode() == "disabled":
        return
    run = _init(out, None, None)
    run.summary.update(record)
    wandb = _wandb()
    run.log({f"eval/{k}": wandb.Image(str(p)) for k, p in images.items() if p.exists()})
    art = wandb.Artifact(f"eval-{run.id}", type="model")
    art.add_file(str(artifact))
    run.log_artifact(art)
    _finish(run)
