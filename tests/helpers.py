"""Running the command-line tools in a subprocess, as a user would."""

import os
import subprocess
import sys


def cli_env(**extra: str) -> dict:
    """The environment of a CLI run: fast CPU kernels (no interpreter), W&B offline."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def run_cli(module: str, *args: str, env_extra: dict | None = None, timeout: int = 300):
    """Run ``python -m module args`` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=cli_env(**(env_extra or {})),
        timeout=timeout,
    )
