"""Shared benchmark helpers: environment record, timing, device rates, JSON lines, tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import triton
import triton.testing


def require_cuda(script: str) -> None:
    """Exit with a clear message unless a CUDA GPU is usable and the interpreter is off."""
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False); nothing run.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit(f"{script}: unset TRITON_INTERPRET; interpreted timings mean nothing.")


def device_name() -> str:
    """The GPU's name, or the CPU model and core count where there is no GPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = "CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def environment() -> dict:
    """Device name and versions recorded with every measurement."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
    }


def bench_ms(fn, rep: int) -> float:
    """Median milliseconds of fn (do_bench: warm-up, L2 flushed before every call)."""
    return triton.testing.do_bench(fn, warmup=max(25, rep // 4), rep=rep, return_mode="median")


def peak_memory_gb(fn) -> float:
    """Peak allocated GPU memory (GB) while running fn once."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 1e9


def measure_bandwidth_gbs(rep: int) -> float:
    """Device-memory bandwidth (GB/s) from a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def append_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([format(row[k], f) if row.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_step_and_kernel_tables(
    step_rows: list[dict], kernel_rows: list[dict], shape_header: str, kernel_title: str
) -> None:
    """The training-step table and, when there are kernel rows, the per-kernel table."""
    print("\ntraining step (bf16 autocast, fp32 master weights, fused Adam)")
    print_table(
        step_rows,
        [("shape", shape_header, "s"), ("variant", "variant", "s"), ("median_ms", "ms/step", ".2f"),
         ("tokens_per_s", "tokens/s", ",.0f"), ("ratio_vs_baseline", "x dense", ".2f"),
         ("measured_over_floor", "/floor", ".2f"), ("peak_mem_gb", "peak GB", ".1f")],
    )  # fmt: skip
    if kernel_rows:
        print(f"\n{kernel_title}")
        print_table(
            kernel_rows,
            [("shape", "shape", "s"), ("kernel", "kernel", "s"), ("median_ms", "ms", ".3f"),
             ("torch_ms", "torch ms", ".3f"), ("ratio_vs_baseline", "x torch", ".2f"),
             ("floor_ms", "floor ms", ".3f"), ("measured_over_floor", "/floor", ".2f")],
        )  # fmt: skip


def start_gpu_bench(
    script: str, shape_args: list[str] | None, default_shapes: list, rep: int
) -> tuple:
    """Check for a GPU, parse ``--shape`` values, record the environment and measure the copy
    bandwidth; prints the header line. Returns (shapes, environment, bandwidth GB/s)."""
    require_cuda(script)
    shapes = [tuple(map(int, s.split(","))) for s in shape_args] if shape_args else default_shapes
    env = environment()
    bandwidth = measure_bandwidth_gbs(rep)
    print(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    return shapes, env, bandwidth
