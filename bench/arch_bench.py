"""Gated and JumpReLU SAE training steps: flashsae against the same math in dense PyTorch.

For each shape (d, n) at batch B (default 8192), bf16 autocast and fp32 master weights:

  flashsae  the training modules (flashsae.train.gated.GatedSAE, flashsae.train.jumprelu.
            JumpReLUSAE): cuBLAS GEMMs with the fused ``gated`` / ``jumprelu`` epilogues, their
            loss, backward, remove_parallel_grad_, fused Adam, normalize_decoder_
  dense     the baseline, plain PyTorch as SAELens writes it: the epilogue as separate torch
            ops (autograd keeps their intermediates), JumpReLU's straight-through estimator as
            torch autograd Functions and its tanh penalty and pre-activation loss as torch ops,
            torch decoder-norm maintenance, fused Adam
  floor     the step's GEMMs at the measured bf16 GEMM rate ([B, d] @ [d, n] and its
            transposes: 8 for Gated - encoder, decoder, frozen-decoder aux, and their
            backward including grad x_c for b_dec; 5 for JumpReLU) plus one fused Adam update

Reported per variant: ms/step (median of triton.testing.do_bench, which flushes the L2 cache
before every call), tokens/s, ratio_vs_baseline = dense ms / ms (> 1: faster than dense),
measured/floor and peak memory. Then each epilogue alone (bf16, forward and backward) against
its floor, bytes over the measured copy bandwidth, with the torch equivalent alongside.
Every measurement is appended as one JSON line to bench/results/arch_bench.jsonl.
"""

import argparse
import gc
from pathlib import Path

import torch
from common import (
    append_jsonl,
    bench_ms,
    peak_memory_gb,
    print_step_and_kernel_tables,
    start_gpu_bench,
)

from flashsae.kernels import gated, jumprelu
from flashsae.train.gated import GatedSAE
from flashsae.train.jumprelu import PREACT_COEFF, TANH_SCALE, JumpReLUSAE
from flashsae.train.sae import SAEConfig

SHAPES = [(768, 32768), (2048, 65536)]
ARCHS = {"gated": (GatedSAE, 8), "jumprelu": (JumpReLUSAE, 5)}  # class, GEMMs per step
LAMBDA = {"gated": 2.0, "jumprelu": JumpReLUSAE.default_sparsity_coeff}
RESULTS = Path(__file__).parent / "results" / "arch_bench.jsonl"


class _Rectangle(torch.autograd.Function):
    """SAELens-style JumpReLU and Heaviside step with pseudo-derivatives for θ (torch only)."""

    @staticmethod
    def forward(ctx, z, theta, jump, eps):
        ctx.save_for_backward(z, theta)
        ctx.jump, ctx.eps = jump, eps
        active = z > theta
        return z * active if jump else active.to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        window = ((z - theta).abs() < eps / 2).to(grad.dtype) / eps
        if ctx.jump:
            return grad * (z > theta), (-theta * window * grad).sum(0).to(theta.dtype), None, None
        return None, (-window * grad).sum(0).to(theta.dtype), None, None


def _dense_gated(pre, b_gate, r_mag, b_mag):
    """The Gated epilogue in torch ops, with the [n] vectors cast to pre's dtype (so that the
    [B, n] intermediates stay bf16, not promoted to fp32)."""
    b_gate, r_mag, b_mag = (v.to(pre.dtype) for v in (b_gate, r_mag, b_mag))
    gate = pre + b_gate
    return (gate > 0) * torch.relu(torch.exp(r_mag) * pre + b_mag), torch.relu(gate)


def _dense_loss(arch, sae, x):
    """The training loss of ``sae`` in plain PyTorch (same math as its training_loss)."""
    if arch == "gated":
        pre = (x - sae.b_dec) @ sae.W_enc
        f, g = _dense_gated(pre, sae.b_gate, sae.r_mag, sae.b_mag)
        mse = (x - (f @ sae.W_dec + sae.b_dec)).square().sum(1).mean()
        aux = (x - (g @ sae.W_dec.detach() + sae.b_dec.detach())).square().sum(1).mean()
        return mse + LAMBDA[arch] * g.sum(1).mean() + aux
    z = torch.addmm(sae.b_enc, x, sae.W_enc)
    theta = sae.threshold
    f = _Rectangle.apply(z, theta, True, sae.bandwidth)
    mse = (x - (f @ sae.W_dec + sae.b_dec)).square().sum(1).mean()
    if sae.step_penalty:
        l0 = _Rectangle.apply(z, theta, False, sae.bandwidth).float().sum(1).mean()
        return mse + LAMBDA[arch] * l0
    penalty = torch.tanh(TANH_SCALE * f.float()).sum(1).mean()
    preact = torch.relu(theta.detach() - z.float()).sum(1).mean()
    return mse + LAMBDA[arch] * penalty + PREACT_COEFF * preact


def _build(arch, d, n):
    cls, _ = ARCHS[arch]
    sae = cls(SAEConfig(arch=arch, d=d, n_latents=n, sparsity_coeff=LAMBDA[arch])).cuda()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, betas=sae.adam_betas, fused=True)
    return sae, opt


def flashsae_step(arch, sae, opt, x, dead):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _, _ = sae.training_loss(x, dead, 1.0)
    loss.backward()
    sae.before_step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.after_step()


def dense_step(arch, sae, opt, x, dead):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = _dense_loss(arch, sae, x)
    loss.backward()
    with torch.no_grad():
        w, g = sae.W_dec, sae.W_dec.grad
        g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
        opt.step()
        opt.zero_grad(set_to_none=True)
        w /= w.norm(dim=1, keepdim=True)


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _step_ms(step, arch, x, d, n, rep):
    """(median ms, peak GB) of one training-step variant; (None, None) when out of memory."""
    sae, opt = _build(arch, d, n)
    dead = torch.zeros(n, dtype=torch.bool, device="cuda")

    def fn():
        step(arch, sae, opt, x, dead)

    try:
        fn()  # compile, warm up
        return bench_ms(fn, rep), peak_memory_gb(fn)
    except torch.cuda.OutOfMemoryError:
        return None, None


def _floor_ms(arch, x, d, n, rep):
    """(GEMM ms, Adam ms): one bf16 [B, d] @ [d, n] and one fused Adam step of the SAE."""
    sae, opt = _build(arch, d, n)
    for p in sae.parameters():
        p.grad = torch.randn_like(p)
    xb, Wb = x.bfloat16(), sae.W_enc.detach().bfloat16()
    return bench_ms(lambda: xb @ Wb, rep), bench_ms(opt.step, rep)


def bench_steps(arch, B, d, n, rep):
    """Rows for dense (the baseline), flashsae and floor at one shape."""
    x = torch.randn(B, d, device="cuda") + 0.5  # E||x||² about d, a nonzero mean
    rows = []
    for variant, step in (("dense", dense_step), ("flashsae", flashsae_step)):
        ms, peak = _step_ms(step, arch, x, d, n, rep)
        rows.append({"variant": variant, "median_ms": ms, "peak_mem_gb": peak})
        _free()
    gemm_ms, adam_ms = _floor_ms(arch, x, d, n, rep)
    _free()
    floor = ARCHS[arch][1] * gemm_ms + adam_ms
    rows.append({"variant": "floor", "median_ms": floor, "gemm_ms": gemm_ms, "adam_ms": adam_ms})
    base = rows[0]["median_ms"]
    for r in rows:
        if r["median_ms"] is not None:
            r["tokens_per_s"] = B / (r["median_ms"] * 1e-3)
            r["ratio_vs_baseline"] = base / r["median_ms"] if base else None
            r["measured_over_floor"] = r["median_ms"] / floor
    return rows


def _row(kernel, fn, torch_fn, floor_ms, rep):
    ms, torch_ms = bench_ms(fn, rep), bench_ms(torch_fn, rep)
    return {
        "kernel": kernel, "median_ms": ms, "torch_ms": torch_ms, "floor_ms": floor_ms,
        "ratio_vs_baseline": torch_ms / ms, "measured_over_floor": ms / floor_ms,
    }  # fmt: skip


def _grad_fn(outs, inputs):
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, inputs, grads, retain_graph=True)


def bench_kernels(arch, B, n, bandwidth, rep):
    """The epilogue alone, forward and backward (bf16 pre, fp32 vectors), against torch's."""

    def bw(nbytes):
        return nbytes / (bandwidth * 1e9) * 1e3

    pre = torch.randn(B, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    vec = [0.1 * torch.randn(n, device="cuda") for _ in range(3)]
    vec = [v.requires_grad_() for v in vec]
    if arch == "gated":
        fn = lambda: gated(pre, *vec)
        torch_fn = lambda: _dense_gated(pre, *vec)
        fwd_bytes, bwd_bytes = 3 * B * n * 2, 4 * B * n * 2
    else:
        theta = vec[1].detach().abs().add(0.5).requires_grad_()
        vec = [vec[0], theta]
        fn = lambda: jumprelu(pre, vec[0], theta)

        def torch_fn():
            z = pre + vec[0].to(pre.dtype)
            return _Rectangle.apply(z, theta, True), _Rectangle.apply(z, theta, False).sum(1)

        fwd_bytes, bwd_bytes = 2 * B * n * 2, 3 * B * n * 2
    inputs = [pre, *vec]
    with torch.no_grad():
        rows = [_row(f"{arch} fwd", fn, torch_fn, bw(fwd_bytes), rep)]
    rows.append(
        _row(
            f"{arch} bwd", _grad_fn(fn(), inputs), _grad_fn(torch_fn(), inputs), bw(bwd_bytes), rep
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8192, help="tokens per step (B)")
    parser.add_argument(
        "--shape",
        action="append",
        metavar="D,N",
        help="d_model, latents (repeatable); default: "
        + " ".join(",".join(map(str, s)) for s in SHAPES),
    )
    parser.add_argument("--arch", choices=list(ARCHS), action="append", help="default: both")
    parser.add_argument("--rep", type=int, default=500, help="do_bench time budget in ms")
    parser.add_argument("--skip-kernels", action="store_true", help="only the training step")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON lines file to append to")
    args = parser.parse_args()
    shapes, env, bandwidth = start_gpu_bench("arch_bench.py", args.shape, SHAPES, args.rep)
    print(f"copy bandwidth {bandwidth:.0f} GB/s, B = {args.batch}")
    step_rows, kernel_rows = [], []
    for arch in args.arch or list(ARCHS):
        for d, n in shapes:
            shape = {"B": args.batch, "d": d, "n": n}
            meta = {**env, "arch": arch, "shape": shape, "bandwidth_gbs": bandwidth}
            rows = bench_steps(arch, args.batch, d, n, args.rep)
            append_jsonl(args.out, [{"bench": "arch_step", **meta, **r} for r in rows])
            step_rows += [{"shape": f"{arch} {d},{n}", **r} for r in rows]
            if not args.skip_kernels:
                rows = bench_kernels(arch, args.batch, n, bandwidth, args.rep)
                _free()
                append_jsonl(args.out, [{"bench": "arch_kernel", **meta, **r} for r in rows])
                kernel_rows += [{"shape": f"{d},{n}", **r} for r in rows]

    print_step_and_kernel_tables(
        step_rows,
        kernel_rows,
        "arch d,n",
        "epilogue kernels (bf16 pre-activations, fp32 per-latent vectors)",
    )
    print(f"\nappended to {args.out}")


if __name__ == "__main__":
    main()
