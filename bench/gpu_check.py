"""`make gpu-check`: one script for a GPU box, as it is (offline, no wandb, flashsae not installed).

Steps, in order, each in its own subprocess with its own timeout, all output kept:

  env      versions of Python, torch, triton; the device; nvidia-smi
  smoke    encode_topk + sparse_decode forward and backward at (d, n, k) = (768, 32768, 32),
           B = 8192, bf16, against dense torch on the same bf16 weights
  tests    pytest -m gpu (parallel workers with pytest-xdist where installed)
  topk     bench/topk_bench.py at (768, 32768, 32) and (2048, 65536, 64), few repetitions
  arch     bench/arch_bench.py at (768, 32768) and (2048, 65536)
  feed     bench/cache_bench.py --device cuda: write, read and the loader's feed row

flashsae is imported from this source tree through a temporary folder on PYTHONPATH that links
``flashsae/{kernels,cache,train}`` to the repository's folders, so nothing is installed. Output
goes to ``--out`` (default ``$OUT`` when set, else ``bench/results/gpu_check``): ``gpu_check.log``
(every step's output), ``gpu_check.md`` (the step table and the benchmark tables for
BENCHMARKS.md) and the ``*.jsonl`` records the benchmarks appended. Exit status: 0 when every
step passed. ``--dry-run`` prints the commands without running them (used by the CPU tests).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
JSONL = ("topk.jsonl", "arch_bench.jsonl", "cache.jsonl")
SMOKE_SHAPE = (8192, 768, 32768, 32)  # B, d, n, k
TABLE_KEYS = (
    "bench", "arch", "shape", "variant", "kernel", "median_ms", "tokens_per_s",
    "ratio_vs_baseline", "measured_over_floor", "value", "baseline_value", "ratio", "unit",
)  # fmt: skip


def steps(python: str) -> list[tuple[str, list[str], int]]:
    """(name, command, timeout in seconds) of every step; the timeouts add up to 7.5 minutes."""
    bench = str(ROOT / "bench")
    xdist = ["-n", "8"] if _has_module("xdist") else []
    return [
        ("env", [python, __file__, "--step", "env"], 30),
        ("smoke", [python, __file__, "--step", "smoke"], 60),
        ("tests", [python, "-m", "pytest", "-m", "gpu", "-q", *xdist, str(ROOT / "tests")], 150),
        ("topk", [python, f"{bench}/topk_bench.py", "--shape", "768,32768,32",
                  "--shape", "2048,65536,64", "--rep", "100"], 100),
        ("arch", [python, f"{bench}/arch_bench.py", "--shape", "768,32768",
                  "--shape", "2048,65536", "--rep", "100"], 70),
        ("feed", [python, f"{bench}/cache_bench.py", "--device", "cuda", "--skip-capture",
                  "--rows", "262144", "--repeats", "3", "--feed-steps", "30"], 40),
    ]  # fmt: skip


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def source_path() -> Path:
    """A temporary folder holding ``flashsae/{kernels,cache,train}`` links into this tree."""
    folder = Path(tempfile.mkdtemp(prefix="flashsae-path-"))
    (folder / "flashsae").mkdir()
    for name in ("kernels", "cache", "train"):
        (folder / "flashsae" / name).symlink_to(ROOT / name)
    return folder


def run_step(name: str, cmd: list[str], timeout: int, env: dict, log) -> dict:  # noqa: ANN001
    """Run one step, appending its output to ``log``; returns its status record."""
    log.write(f"\n===== {name}: {' '.join(cmd)} (timeout {timeout} s)\n")
    log.flush()
    start = time.time()
    try:
        done = subprocess.run(
            cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
        status = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout} s"
    seconds = time.time() - start
    log.write(f"===== {name}: {status} in {seconds:.0f} s\n")
    log.flush()
    print(f"{name:6s} {status} in {seconds:.0f} s", flush=True)
    return {"step": name, "status": status, "seconds": seconds}


def new_records(offsets: dict[str, int]) -> dict[str, list[dict]]:
    """The JSON lines each results file gained since ``offsets`` (its sizes before the run)."""
    out = {}
    for name in JSONL:
        path = RESULTS / name
        if path.exists():
            with path.open() as f:
                f.seek(offsets.get(name, 0))
                out[name] = [json.loads(line) for line in f if line.strip()]
    return out


def markdown(status: list[dict], records: dict[str, list[dict]]) -> str:
    """The step table and one table per benchmark, in BENCHMARKS.md's form."""
    lines = ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} |" for s in status]
    every = [r for rs in records.values() for r in rs]
    if every:
        head = every[0]
        lines += ["", f"Device: {head.get('device')}, torch {head.get('torch')}, "
                  f"triton {head.get('triton')}, commit {head.get('commit')}"]  # fmt: skip
    for name, rows in records.items():
        if not rows:
            continue
        keys = [k for k in TABLE_KEYS if any(k in r for r in rows)]
        lines += ["", f"### {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [_cell(r.get(k)) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in v.items())
    return "-" if v is None else str(v)


def env_step() -> None:
    import torch
    import triton

    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}"
    )
    print(f"cuda available: {torch.cuda.is_available()}, torch cuda {torch.version.cuda}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run make gpu-check on a machine with a GPU")


def rel_err(a, b) -> float:  # noqa: ANN001
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def smoke_step() -> None:
    """Fused encoder and sparse decoder against dense torch (fp32 math on the same bf16
    weights): the selected values, the reconstruction, and the gradients of a squared loss."""
    import torch

    from flashsae.kernels import encode_topk, sparse_decode

    B, d, n, k = SMOKE_SHAPE
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(B, d, device=dev)
    W_enc = (torch.randn(d, n, device=dev) / d**0.5).to(torch.bfloat16).requires_grad_()
    b_enc = (0.1 * torch.randn(n, device=dev)).requires_grad_()
    b_dec = (0.1 * torch.randn(d, device=dev)).requires_grad_()
    W_dec = (torch.randn(n, d, device=dev) / d**0.5).to(torch.bfloat16).requires_grad_()
    start = time.time()
    vals, idx = encode_topk(x, W_enc, b_enc, b_dec, k)[:2]
    x_hat = sparse_decode(vals, idx, W_dec, b_dec)
    loss = (x_hat.float() - x).square().sum()
    loss.backward()
    torch.cuda.synchronize()
    print(f"first call (compiles included): {time.time() - start:.1f} s")

    leaves = [t.detach().float().requires_grad_() for t in (W_enc, b_enc, b_dec, W_dec)]
    rW_enc, rb_enc, rb_dec, rW_dec = leaves
    xc = (x - rb_dec).to(torch.bfloat16).float()  # the kernel's MMA operand: x_c in bf16
    z = xc @ rW_enc + rb_enc
    ref_vals = z.topk(k, dim=1).values.relu()
    kth = ref_vals[:, -1:]
    picked = z.gather(1, idx.long())
    # a selected latent is right when its z is at least the k-th best (up to bf16 rounding)
    wrong = (picked < kth - 2e-2 * kth.abs().clamp_min(1e-3)).sum().item()
    f = torch.zeros(B, n, device=dev).scatter(1, idx.long(), picked.relu())
    ref_hat = f @ rW_dec + rb_dec
    (ref_hat - x).square().sum().backward()
    errors = {
        "values": rel_err(vals, ref_vals),
        "x_hat": rel_err(x_hat, ref_hat),
        **{f"grad {name}": rel_err(t.grad, r.grad)
           for name, t, r in zip(("W_enc", "b_enc", "b_dec", "W_dec"), (W_enc, b_enc, b_dec, W_dec),
                                 leaves, strict=True)},
    }  # fmt: skip
    print(f"selected latents below the k-th best: {wrong} of {B * k}")
    for name, e in errors.items():
        print(f"relative error {name}: {e:.2e}")
    if wrong > 1e-4 * B * k or max(errors.values()) > 3e-2:
        sys.exit("smoke test failed: see the errors above")
    print("smoke test passed")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS / "gpu_check"
    p.add_argument("--out", type=Path, default=default_out, help="folder for log, table, jsonl")
    p.add_argument("--only", action="append", help="run only these steps (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--step", choices=["env", "smoke"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step == "env":
        env_step()
        return 0
    if args.step == "smoke":
        smoke_step()
        return 0

    plan = [s for s in steps(sys.executable) if not args.only or s[0] in args.only]
    if args.dry_run:
        for name, cmd, timeout in plan:
            print(f"{name} ({timeout} s): {' '.join(cmd)}")
        return 0
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("TRITON_INTERPRET", None)
    path = source_path()
    env["PYTHONPATH"] = os.pathsep.join(
        [str(path), str(ROOT), str(ROOT / "bench"), env.get("PYTHONPATH", "")]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    offsets = {n: (RESULTS / n).stat().st_size for n in JSONL if (RESULTS / n).exists()}
    with (args.out / "gpu_check.log").open("w") as log:
        status = [run_step(name, cmd, t, env, log) for name, cmd, t in plan]
    shutil.rmtree(path)
    records = new_records(offsets)
    table = markdown(status, records)
    (args.out / "gpu_check.md").write_text(table)
    for name, rows in records.items():
        if rows and args.out.resolve() != RESULTS.resolve():
            with (args.out / name).open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    print(table)
    return 0 if all(s["status"] == "passed" for s in status) else 1


if __name__ == "__main__":
    sys.exit(main())
