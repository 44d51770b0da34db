"""Weights & Biases logging with a local ``metrics.jsonl`` mirror.

Mode: ``WANDB_MODE`` when set (``disabled`` turns W&B off), else online when an API
key is configured (``WANDB_API_KEY`` or a netrc entry for api.wandb.ai), else
offline, in which case the ``wandb sync`` command is printed at the end.
Steps are counted in tokens.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path

import wandb


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


class RunLogger:
    """Logs dicts of scalars to W&B and appends them to ``out/metrics.jsonl``."""

    def __init__(self, out: Path, config: dict, name: str, project: str = "flashsae") -> None:
        self.out = Path(out)
        self.mirror = open(self.out / "metrics.jsonl", "a")  # noqa: SIM115 - closed in finish()
        self.mode = wandb_mode()
        self.run = None
        if self.mode != "disabled":
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", project),
                name=name,
                config=config,
                dir=str(self.out),
                mode=self.mode,
            )

    def log(self, record: dict, step: int) -> None:
        self.mirror.write(json.dumps({"step": step, **record}) + "\n")
        self.mirror.flush()
        if self.run is not None:
            self.run.log(record, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def log_artifact(self, name: str, files: list[Path]) -> None:
        """Attach files (checkpoint, metrics) to the run as an artifact of type model."""
        if self.run is None:
            return
        art = wandb.Artifact(name, type="model")
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.mirror.close()
        if self.run is None:
            return
        run_dir = Path(self.run.dir).parent
        self.run.finish()
        if self.mode == "offline":
            print(f"W&B offline run saved; upload it with: wandb sync {run_dir}")
