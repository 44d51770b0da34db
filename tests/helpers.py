"""Running the command-line tools in a subprocess, as a user would."""

import os
import subprocess
import sys


def run_cli(module: str, *args: str, env_extra: dict | None = None, timeout: int = 300):
    """Run ``python -m module args`` with the real (non-interpreted) CPU kernels, W&B offline."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
