"""TopK SAE training step: flashsae kernels against dense PyTorch, with floors.

For each shape (d, n, k) at batch B (default 8192), bf16 autocast and fp32 master weights:

  flashsae  encode_topk + sparse_decode (+ AuxK with k_aux = d/2 when --dead-frac > 0:
            train/sae.py auxk_loss, a GEMM over the gathered dead columns and topk),
            backward, remove_parallel_grad_, fused Adam, normalize_decoder_
  dense     the baseline, the same math in plain PyTorch: z = (x - b_dec) @ W_enc + b_enc,
            torch.topk, dense f @ W_dec, torch decoder-norm maintenance, fused Adam
  floor     one bf16 encoder GEMM [B, d] @ [d, n] plus one fused Adam update of the parameters

Reported per variant: ms/step (median of triton.testing.do_bench, which flushes the L2 cache
before every call), tokens/s, ratio_vs_baseline = dense ms / ms (> 1: faster than dense),
measured/floor and peak memory. Then each kernel alone (bf16) against its own floor: bytes over
the measured copy bandwidth, or for the fused encoder the larger of that and the measured GEMM,
with the torch equivalent alongside (ratio_vs_baseline = torch ms / ms).
Every measurement is appended as one JSON line to bench/results/topk.jsonl.
"""

import argparse
import gc
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    append_jsonl,
    bench_ms,
    peak_memory_gb,
    print_step_and_kernel_tables,
    start_gpu_bench,
)

from flashsae.kernels import (
    encode_topk,
    normalize_decoder_,
    remove_parallel_grad_,
    sparse_decode,
    topk,
)
from flashsae.train.sae import auxk_loss
from flashsae.train.trainer import aux_budget

SHAPES = [(768, 32768, 32), (768, 131072, 32), (2048, 65536, 64), (4096, 131072, 64)]
AUX_ALPHA = 1 / 32
RESULTS = Path(__file__).parent / "results" / "topk.jsonl"


class SAE:
    """fp32 master weights (W_enc = W_decᵀ, unit decoder rows) and a fused Adam."""

    dead_budget: int | None = None  # AuxK columns to gather, set per shape as the trainer does

    def __init__(self, d: int, n: int):
        W_dec = torch.randn(n, d, device="cuda")
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = W_dec.t().contiguous().requires_grad_()
        self.W_dec = W_dec.requires_grad_()
        self.b_enc = torch.zeros(n, device="cuda", requires_grad=True)
        self.b_dec = torch.zeros(d, device="cuda", requires_grad=True)
        self.params = [self.W_enc, self.b_enc, self.W_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=1e-4, fused=True)


def _mse(x, x_hat):
    return (x_hat.float() - x).square().sum(-1).mean()


def flashsae_step(sae, x, k, k_aux, dead):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vals, idx = encode_topk(x, sae.W_enc, sae.b_enc, sae.b_dec, k)
        x_hat = sparse_decode(vals, idx, sae.W_dec, sae.b_dec)
        loss = _mse(x, x_hat)
        if k_aux:  # AuxK as the trainer does it: a dense GEMM over the gathered dead columns
            e = (x - x_hat.float()).detach()
            aux = auxk_loss(
                x - sae.b_dec, e, sae.W_enc, sae.b_enc, sae.W_dec, dead, k_aux, sae.dead_budget
            )
            loss = loss + AUX_ALPHA * aux
    loss.backward()
    remove_parallel_grad_(sae.W_dec, sae.W_dec.grad)
    sae.opt.step()
    sae.opt.zero_grad(set_to_none=True)
    normalize_decoder_(sae.W_dec)


def dense_step(sae, x, k, k_aux, dead):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        z = torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc)
        vals, idx = z.topk(k, dim=1)
        f = torch.zeros_like(z).scatter(1, idx, vals.relu())
        x_hat = torch.addmm(sae.b_dec, f, sae.W_dec)
        loss = _mse(x, x_hat)
        if k_aux:
            aux_vals, aux_idx = z.masked_fill(~dead, -math.inf).topk(k_aux, dim=1)
            f_aux = torch.zeros_like(z).scatter(1, aux_idx, aux_vals.relu())
            loss = loss + AUX_ALPHA * _mse((x - x_hat.float()).detach(), f_aux @ sae.W_dec)
    loss.backward()
    with torch.no_grad():
        w, g = sae.W_dec, sae.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
        sae.opt.step()
        sae.opt.zero_grad(set_to_none=True)
        w /= w.norm(dim=1, keepdim=True)


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _floor_ms(x, d, n, rep):
    """(encoder GEMM ms, fused Adam ms): the floor of one training step."""
    sae = SAE(d, n)
    for p in sae.params:
        p.grad = torch.randn_like(p)
    xb, Wb = x.bfloat16(), sae.W_enc.detach().bfloat16()
    return bench_ms(lambda: xb @ Wb, rep), bench_ms(sae.opt.step, rep)


def _step_ms(step, x, d, n, k, k_aux, dead, rep):
    """(median ms, peak GB) of one training-step variant; (None, None) when out of memory."""
    sae = SAE(d, n)

    def fn():
        step(sae, x, k, k_aux, dead)

    try:
        fn()  # compile, warm up
        return bench_ms(fn, rep), peak_memory_gb(fn)
    except torch.cuda.OutOfMemoryError:
        return None, None


def bench_steps(B, d, n, k, k_aux, dead_frac, rep):
    """Rows for dense (the baseline), flashsae and floor at one shape; also the GEMM ms."""
    x = torch.randn(B, d, device="cuda")
    dead = torch.rand(n, device="cuda") < dead_frac
    SAE.dead_budget = aux_budget(int(dead.sum()))  # as the trainer sets it: no sync in the step
    rows = []
    for variant, step in (("dense", dense_step), ("flashsae", flashsae_step)):
        ms, peak = _step_ms(step, x, d, n, k, k_aux, dead, rep)
        rows.append({"variant": variant, "median_ms": ms, "peak_mem_gb": peak})
        _free()
    gemm_ms, adam_ms = _floor_ms(x, d, n, rep)
    _free()
    floor = gemm_ms + adam_ms
    rows.append({"variant": "floor", "median_ms": floor, "gemm_ms": gemm_ms, "adam_ms": adam_ms})
    base = rows[0]["median_ms"]
    for r in rows:
        if r["median_ms"] is not None:
            r["tokens_per_s"] = B / (r["median_ms"] * 1e-3)
            r["ratio_vs_baseline"] = base / r["median_ms"] if base else None
            r["measured_over_floor"] = r["median_ms"] / floor
    return rows, gemm_ms


def _row(kernel, fn, torch_fn, floor_ms, rep):
    ms, torch_ms = bench_ms(fn, rep), bench_ms(torch_fn, rep)
    return {
        "kernel": kernel, "median_ms": ms, "torch_ms": torch_ms, "floor_ms": floor_ms,
        "ratio_vs_baseline": torch_ms / ms, "measured_over_floor": ms / floor_ms,
    }  # fmt: skip


def _grad_fn(out, inputs):
    g = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, g, retain_graph=True)


def _encoder_kernels(B, d, n, k, gemm_ms, bw, rep):
    """encode_topk forward and backward, topk on a dense z; bf16."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(B, d, **bf16, requires_grad=True)
    W_enc = (torch.randn(d, n, **bf16) / math.sqrt(d)).requires_grad_()
    b_enc = torch.zeros(n, **bf16, requires_grad=True)
    b_dec = torch.zeros(d, **bf16, requires_grad=True)
    inputs = [x, W_enc, b_enc, b_dec]
    used = min(n, B * k)  # latents a batch can touch: W_enc columns read at least once
    with torch.no_grad():
        z = torch.addmm(b_enc, x - b_dec, W_enc)
        rows = [
            _row(
                "encode_topk fwd (dense backend)",
                lambda: encode_topk(x, W_enc, b_enc, b_dec, k, backend="dense"),
                lambda: torch.addmm(b_enc, x - b_dec, W_enc).topk(k, dim=1),
                max(gemm_ms, bw((B * d + d * n + B * k * 3) * 2)),
                rep,
            ),
            _row(
                "encode_topk fwd",
                lambda: encode_topk(x, W_enc, b_enc, b_dec, k, backend="fused"),
                lambda: torch.addmm(b_enc, x - b_dec, W_enc).topk(k, dim=1),
                max(gemm_ms, bw((B * d + d * n + B * k * 3) * 2)),
                rep,
            ),
            _row(
                "topk",
                lambda: topk(z, k),
                lambda: z.topk(k, dim=1),
                bw((B * n + B * k * 3) * 2),
                rep,
            ),
        ]
    out = encode_topk(x, W_enc, b_enc, b_dec, k, backend="fused")[0]
    ref = torch.addmm(b_enc, x - b_dec, W_enc).topk(k, dim=1).values.relu()
    floor = bw((2 * B * d + used * d + n * d + n + d) * 2 + B * k * 6)
    rows.append(_row("encode_topk bwd", _grad_fn(out, inputs), _grad_fn(ref, inputs), floor, rep))
    return rows


def _decoder_kernels(B, d, n, k, bw, rep):
    """sparse_decode forward and backward (bf16); decoder-norm maintenance (fp32 weights)."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    vals = torch.rand(B, k, **bf16, requires_grad=True)
    idx = torch.randint(0, n, (B, k), device="cuda", dtype=torch.int32)
    W_dec = (torch.randn(n, d, **bf16) / math.sqrt(d)).requires_grad_()
    b_dec = torch.zeros(d, **bf16, requires_grad=True)
    inputs = [vals, W_dec, b_dec]
    used = min(n, B * k)

    def torch_decode():
        return F.embedding_bag(idx.long(), W_dec, per_sample_weights=vals, mode="sum") + b_dec

    with torch.no_grad():
        rows = [
            _row(
                "sparse_decode fwd",
                lambda: sparse_decode(vals, idx, W_dec, b_dec),
                torch_decode,
                bw((used * d + B * d) * 2 + B * k * 6),
                rep,
            )
        ]
    out, ref = sparse_decode(vals, idx, W_dec, b_dec), torch_decode()
    floor = bw((B * d + used * d + n * d + d) * 2 + B * k * 8)
    rows.append(_row("sparse_decode bwd", _grad_fn(out, inputs), _grad_fn(ref, inputs), floor, rep))

    W = torch.randn(n, d, device="cuda")
    g = torch.randn(n, d, device="cuda")

    def torch_remove_parallel():
        g.sub_((g * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W)

    rows += [
        _row(
            "normalize_decoder_",
            lambda: normalize_decoder_(W),
            lambda: W.div_(W.norm(dim=1, keepdim=True)),
            bw(2 * n * d * 4),
            rep,
        ),
        _row(
            "remove_parallel_grad_",
            lambda: remove_parallel_grad_(W, g),
            torch_remove_parallel,
            bw(3 * n * d * 4),
            rep,
        ),
    ]
    return rows


def bench_kernels(B, d, n, k, gemm_ms, bandwidth, rep):
    """Each kernel alone against its floor (bytes / bandwidth, or the GEMM), with torch's."""

    def bw(nbytes):
        return nbytes / (bandwidth * 1e9) * 1e3

    rows = _encoder_kernels(B, d, n, k, gemm_ms, bw, rep)
    _free()
    rows += _decoder_kernels(B, d, n, k, bw, rep)
    _free()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8192, help="tokens per step (B)")
    parser.add_argument(
        "--shape",
        action="append",
        metavar="D,N,K",
        help="d_model, latents, k (repeatable); default: " + " ".join(
            ",".join(map(str, s)) for s in SHAPES
        ),
    )  # fmt: skip
    parser.add_argument(
        "--dead-frac",
        type=float,
        default=0.0,
        help="fraction of latents marked dead; > 0 adds AuxK with k_aux = d/2 (default 0)",
    )
    parser.add_argument("--rep", type=int, default=500, help="do_bench time budget in ms")
    parser.add_argument("--skip-kernels", action="store_true", help="only the training step")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file to append to")
    args = parser.parse_args()
    shapes, env, bandwidth = start_gpu_bench("topk_bench.py", args.shape, SHAPES, args.rep)
    print(f"copy bandwidth {bandwidth:.0f} GB/s, B = {args.batch}, dead fraction {args.dead_frac}")
    step_rows, kernel_rows = [], []
    for d, n, k in shapes:
        k_aux = d // 2 if args.dead_frac > 0 else 0
        shape = {"B": args.batch, "d": d, "n": n, "k": k, "k_aux": k_aux}
        meta = {**env, "shape": shape, "bandwidth_gbs": bandwidth, "dead_frac": args.dead_frac}
        rows, gemm_ms = bench_steps(args.batch, d, n, k, k_aux, args.dead_frac, args.rep)
        append_jsonl(args.out, [{"bench": "topk_step", **meta, **r} for r in rows])
        step_rows += [{"shape": f"{d},{n},{k}", **r} for r in rows]
        if not args.skip_kernels:
            rows = bench_kernels(args.batch, d, n, k, gemm_ms, bandwidth, args.rep)
            append_jsonl(args.out, [{"bench": "topk_kernel", **meta, **r} for r in rows])
            kernel_rows += [{"shape": f"{d},{n},{k}", **r} for r in rows]

    print_step_and_kernel_tables(
        step_rows, kernel_rows, "d,n,k", "kernels (bf16; decoder-norm ops on fp32 master weights)"
    )
    print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
