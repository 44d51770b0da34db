"""The CPU-side parts of `make gpu-check`: its plan, its source-tree import path, GPU-test
collection without wandb, and its report."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def test_the_plan_has_every_step_within_eight_minutes(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    printed = capsys.readouterr().out
    names = [name for name, _, _ in gpu_check.steps(sys.executable)]
    assert names == ["env", "smoke", "tests", "topk", "arch", "feed"]
    for name in names:
        assert f"{name} (" in printed
    assert "-m gpu" in printed and "768,32768,32" in printed and "2048,65536,64" in printed
    assert sum(t for _, _, t in gpu_check.steps(sys.executable)) <= 8 * 60


def _python(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_flashsae_imports_from_the_source_tree_without_wandb(tmp_path):
    """With the script's PYTHONPATH and a wandb that cannot be imported, flashsae comes from the
    linked source folders and the GPU tests still collect."""
    blocker = tmp_path / "blocked" / "wandb"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no wandb on this box')\n")
    path = gpu_check.source_path()
    try:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "blocked"), str(path), str(ROOT)])
        env["WANDB_MODE"] = "disabled"
        where = _python(
            "import flashsae.kernels, flashsae.train; print(flashsae.kernels.__file__)", env
        )
        assert where.returncode == 0, where.stderr
        assert where.stdout.strip().startswith(str(path))
        no_wandb = _python("import wandb", env)
        assert no_wandb.returncode != 0 and "no wandb on this box" in no_wandb.stderr
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "tests"]
        collect = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    finally:
        shutil.rmtree(path)


def test_the_report_has_the_steps_and_the_benchmark_rows():
    status = [{"step": "env", "status": "passed", "seconds": 2.0},
              {"step": "tests", "status": "timed out after 150 s", "seconds": 150.0}]  # fmt: skip
    records = {"topk.jsonl": [{"bench": "topk_step", "device": "NVIDIA H200", "torch": "2.11",
                               "triton": "3.6", "commit": "abc", "shape": {"B": 8192, "d": 768},
                               "variant": "flashsae", "median_ms": 1.25}]}  # fmt: skip
    table = gpu_check.markdown(status, records)
    assert "| tests | timed out after 150 s | 150 |" in table
    assert (
        "Device: NVIDIA H200" in table
        and "| topk_step | B=8192,d=768 | flashsae | 1.250 |" in table
    )


@pytest.mark.parametrize("step", ["env", "smoke"])
def test_the_gpu_steps_refuse_a_machine_without_cuda(step):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--step", step],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
