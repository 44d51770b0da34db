"""Every Triton kernel compiles for Hopper (sm_90a) within its resources, checked without a GPU.

The harness (bench/hopper_compile.py) runs in a subprocess with this process's environment, so
with TRITON_INTERPRET=1 set by conftest on CPU machines: it must switch the interpreter off
itself. The other tests show the checks can fail.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "hopper_compile.py"

spec = importlib.util.spec_from_file_location("hopper_compile", SCRIPT)
hc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hc)


def test_every_kernel_compiles_for_hopper(tmp_path):
    out = tmp_path / "hopper_compile.md"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=900,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-6000:]}\nstderr:\n{run.stderr[-6000:]}"
    table = out.read_text()
    assert "## Failures\n\nnone" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and " | " in line]
    for module, kernel in hc.discover_kernels():
        assert any(row.startswith(f"| {module}.{kernel} |") for row in rows), kernel
    estimates = table.split("## encode_topk")[1].split("## Failures")[0]
    n_encode = len(hc.SHAPES) * len(hc.DTYPES)  # one chunks-kernel row per shape and dtype
    assert sum(line.startswith("| xc:") for line in estimates.splitlines()) == n_encode
    fused = [line for line in estimates.splitlines() if line.startswith(("| bf16 d=", "| fp32 d="))]
    assert len(fused) == n_encode, estimates


def _record(**kw):
    base = dict(module="m", kernel="k", config="c", where=[], regs=128, smem_dynamic=1024)
    return hc.Record(**{**base, **kw})


def test_check_passes_at_the_limits():
    assert hc.check(_record(regs=255, smem_dynamic=227 * 1024, smem_static=1024)) == []


@pytest.mark.parametrize(
    "fields, reason",
    [
        (dict(error="CompilationError: boom"), "failed: CompilationError"),
        (dict(spill_bytes=4), "spills"),
        (dict(regs=256), "registers"),
        (dict(smem_dynamic=227 * 1024 + 16), "dynamic shared"),
        (dict(smem_dynamic=227 * 1024, smem_static=1024 + 16), "per SM"),
    ],
)
def test_check_flags_each_overrun(fields, reason):
    problems = hc.check(_record(**fields))
    assert len(problems) == 1 and reason in problems[0], problems


def test_discovery_finds_kernels_not_helpers():
    found = hc.discover_kernels()
    names = {name for _, name in found}
    assert {"_topk_kernel", "_encode_chunks_kernel", "_gather_sum_kernel"} <= names
    assert not names & {"pack_keys", "unpack_keys", "merge_topk", "store_topk"}
    assert hc.coverage_problems(hc.all_cases()) == []


def test_a_new_kernel_without_a_case_fails(tmp_path):
    kernels = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels", kernels)
    (kernels / "new_op.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
        "def _new_kernel(x_ptr, BLOCK: tl.constexpr):\n    tl.store(x_ptr, 1.0)\n"
    )
    problems = hc.coverage_problems(hc.all_cases(kernels), kernels)
    assert problems == ["new_op._new_kernel: @triton.jit kernel without a case"]
    (kernels / "gated_kernels.py").unlink()
    with pytest.raises(ValueError, match="case arguments"):
        hc.all_cases(kernels)


def test_specialization_follows_the_launcher():
    assert hc.specialize(1) == ("constexpr", 1, False)
    assert hc.specialize(8192) == ("i32", None, True)
    assert hc.specialize(8191) == ("i32", None, False)
    assert hc.specialize(2**33) == ("i64", None, True)
    assert hc.specialize(None) == ("constexpr", None, False)
    assert hc.specialize(hc.Ptr("bf16")) == ("*bf16", None, True)
    assert hc.specialize(1e3) == ("fp32", None, False)
