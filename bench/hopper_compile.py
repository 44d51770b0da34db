"""Compile every Triton kernel for Hopper (sm_90a) without a GPU and check its resources.

Each case is one launch configuration a launcher in kernels/ chooses at the benchmark shapes
(d, n, k) in SHAPES with B = 8192, bf16 and fp32 inputs, AuxK k_aux = d/2. It is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``; Triton's own ``ptxas -v``
log gives spill bytes, ``cuobjdump -res-usage`` on the cubin registers and static shared memory,
``cuobjdump -sass`` the instruction mix. A case fails on a compile error, any spill, more than
255 registers, or more shared memory than Hopper has (227 KiB per block, 228 KiB per SM).
Every ``@triton.jit`` kernel in kernels/ (a jit function no other jit function calls) must have
a case. The table is printed and written as markdown; the exit status is 1 on any failure.

Counts are static (instructions in the binary). MMA = HGMMA + HMMA. INT = vector integer
instructions: INT_OPS below (uniform-datapath U* instructions are not counted).

    python bench/hopper_compile.py [--out bench/results/hopper_compile.md] [--jobs 2]
"""

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = ROOT / "kernels"
RESULTS = Path(__file__).parent / "results" / "hopper_compile.md"

# Hopper (H100/H200) limits.
MAX_REGS = 255
MAX_SMEM_BLOCK = 227 * 1024  # dynamic shared memory one block may opt in to
MAX_SMEM_SM = 228 * 1024  # shared memory per SM (dynamic + static of one block)

INT_OPS = (
    "IADD3", "IMAD", "IMUL", "IABS", "IMNMX", "VIMNMX", "ISETP", "ISCADD", "LEA", "LOP3", "SEL",
    "SHF", "SHL", "SHR", "PRMT", "POPC", "FLO", "BREV", "BMSK", "SGXT", "SHFL",
)  # fmt: skip
MMA_OPS = ("HGMMA", "HMMA")


# ==== CASES: the launch configurations, one function per kernel file ========================
# Each function mirrors its launcher's choice of block sizes, flags, dtypes and num_warps at the
# benchmark shapes; update it with the launcher. MODULES maps a kernel file to its module name
# under flashsae.kernels (change it there when files are renamed). Arguments are given as the
# launcher passes them: Ptr(dtype) for a tensor, Python ints/floats/bools/None otherwise; they
# are specialized the way Triton's launcher does (ints equal to 1 and None become constexprs,
# ints and 16-byte aligned pointers divisible by 16 get tt.divisibility = 16).

SHAPES = [(768, 32768, 32), (2048, 65536, 64)]  # (d, n, k)
B = 8192
DTYPES = ("bf16", "fp32")  # input dtype; under bf16 autocast every float tensor is cast to bf16
SM_COUNTS = (132, 114)  # H100 SXM / H200, H100 PCIe: the SM counts the split logic can see

MODULES = {
    "topk": "topk_kernels",
    "encode_topk": "encode_topk_kernels",
    "sparse_decode": "sparse_decode_kernels",
    "segment_matmul": "segment_matmul_kernels",
    "decoder_norm": "decoder_norm_kernels",
    "gated": "gated_kernels",
    "jumprelu": "jumprelu_kernels",
    "capture": "capture_kernels",
}


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: element type as Triton spells it (bf16, fp32, i32, i64, u1)."""

    dtype: str


@dataclass
class Case:
    """One compile: kernel `kernel` of flashsae.kernels.<module> with these arguments."""

    module: str
    kernel: str
    args: dict
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default, as when the launcher passes none
    maxnreg: int | None = None  # a register cap the launcher passes (None: none)
    where: list[str] = field(default_factory=list)  # the benchmark settings that reach it


def next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def topk_cases(B: int, N: int, k: int, dt: str, is_keys: bool) -> list[Case]:
    """kernels/topk.py launch_topk."""
    k_pad = next_pow2(k)
    block_n = max(k_pad, min(next_pow2(N), 256))
    block_m = max(1, min(next_pow2(B), 2048 // block_n, 8))
    args = dict(
        z_ptr=Ptr("i64" if is_keys else dt), val_ptr=Ptr(dt), idx_ptr=Ptr("i32"), B=B, N=N, K=k,
        K_PAD=k_pad, IS_KEYS=is_keys, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    warps = _import_kernels(MODULES["topk"]).topk_num_warps(block_m, block_n)
    return [Case(MODULES["topk"], "_topk_kernel", args, warps)]


def encode_topk_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/encode_topk_kernels.py _launch_encode_topk (fused backend: chunks, select, exact
    pass and its select), and AuxK's top-k over the gathered dead columns (train/sae.py
    auxk_loss; taken here as n/4 dead latents, so k_live = k_aux = d/2)."""
    enc = _import_kernels(MODULES["encode_topk"])
    module = MODULES["encode_topk"]
    k_pad = next_pow2(k)
    fp32 = dt == "fp32"
    precision = "tf32x3" if fp32 else "tf32"
    block_m, block_n, block_k, warps, stages, maxnreg = enc._fused_config(fp32)
    chunk = enc.chunk_size(n, k, block_n)
    n_chunks = cdiv(n, chunk)
    chunks = dict(
        xc_ptr=Ptr(dt), w_ptr=Ptr(dt), b_enc_ptr=Ptr("fp32"), key_ptr=Ptr("i64"),
        bound_ptr=Ptr("fp32"), B=B, D=d, N=n, N_CHUNKS=n_chunks, TOP=enc.TOP, CHUNK=chunk,
        EVEN_K=d % block_k == 0, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k,
    )  # fmt: skip
    cases = [Case(module, "_encode_chunks_kernel", chunks, warps, stages, maxnreg)]
    sel_m, sel_n, sel_warps = enc._select_config(k_pad)
    fb_m, fb_n, fb_k, fb_warps, fb_stages = enc._overflow_config(k_pad, fp32)
    n_tiles = cdiv(n, fb_n)
    tiles_per_split = cdiv(n_tiles, min(n_tiles, enc.OVERFLOW_SPLITS))
    splits = cdiv(n_tiles, tiles_per_split)
    for overflow, n_keys, n_bound in (
        (False, enc.TOP * n_chunks, n_chunks),
        (True, splits * k_pad, 0),
    ):
        select = dict(
            key_ptr=Ptr("i64"), bound_ptr=Ptr("fp32"), flag_ptr=Ptr("i32"), val_ptr=Ptr(dt),
            idx_ptr=Ptr("i32"), B=B, N_KEYS=n_keys, N_BOUND=n_bound, K=k, K_PAD=k_pad,
            OVERFLOW=overflow, BLOCK_M=sel_m, BLOCK_N=sel_n,
        )  # fmt: skip
        cases.append(Case(module, "_select_kernel", select, sel_warps))
    overflow = dict(
        xc_ptr=Ptr(dt), w_ptr=Ptr(dt), b_enc_ptr=Ptr("fp32"), flag_ptr=Ptr("i32"),
        part_ptr=Ptr("i64"), B=B, D=d, N=n, TILES_PER_SPLIT=tiles_per_split, K_PAD=k_pad,
        EVEN_K=d % fb_k == 0, DOT_PRECISION=precision, BLOCK_M=fb_m, BLOCK_N=fb_n, BLOCK_K=fb_k,
    )  # fmt: skip
    cases.append(Case(module, "_overflow_kernel", overflow, fb_warps, fb_stages))
    k_aux, n_dead = d // 2, n // 4
    cases += topk_cases(B, n_dead, min(k_aux, n_dead), dt, is_keys=False)
    return cases


def sparse_decode_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/sparse_decode_kernels.py _launch_gather_sum (decoder forward with k slots and
    AuxK's k_aux = d/2; the fused encoder's backward grad x with fp32 coefficients and no bias)
    and _launch_gather_dot (decoder backward)."""
    blocks = _import_kernels(MODULES["sparse_decode"])._blocks
    module = MODULES["sparse_decode"]
    cases = []
    for K in (k, d // 2):
        block_k, block_d = blocks(K, d)
        decode = dict(
            val_ptr=Ptr(dt), idx_ptr=Ptr("i32"), w_ptr=Ptr(dt), bias_ptr=Ptr(dt), out_ptr=Ptr(dt),
            K=K, D=d, HAS_BIAS=True, BLOCK_K=block_k, BLOCK_D=block_d,
        )  # fmt: skip
        dot = dict(
            grad_ptr=Ptr(dt), idx_ptr=Ptr("i32"), w_ptr=Ptr(dt), out_ptr=Ptr(dt), K=K, D=d,
            BLOCK_K=block_k, BLOCK_D=block_d,
        )  # fmt: skip
        cases.append(Case(module, "_gather_sum_kernel", decode, 4))
        cases.append(Case(module, "_gather_dot_kernel", dot))
        if K == k:
            grad_x = dict(
                decode, val_ptr=Ptr("fp32"), bias_ptr=Ptr(dt), out_ptr=Ptr("fp32"), HAS_BIAS=False
            )
            cases.append(Case(module, "_gather_sum_kernel", grad_x, 4))
    return cases


def segment_matmul_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/segment_matmul_kernels.py _launch_segment_matmul: grad W_dec ([n, d], coef =
    values, x = grad x̂) and grad W_enc / grad b_enc ([d, n] with colsum, fp32 coef and x - b_dec),
    the per-chunk kernel and the kernel that adds long latents' chunks."""
    sm = _import_kernels(MODULES["segment_matmul"])
    module = MODULES["segment_matmul"]
    cases = []
    for coef, x, transpose, colsum in ((dt, dt, False, False), ("fp32", "fp32", True, True)):
        stride_on, stride_od = (1, n) if transpose else (d, 1)
        strides = dict(N=n, D=d, stride_on=stride_on, stride_od=stride_od, HAS_COLSUM=colsum)
        main = dict(
            row_ptr=Ptr("i32"), coef_ptr=Ptr(coef), seg_ptr=Ptr("i32"), item_group_ptr=Ptr("i32"),
            group_end_ptr=Ptr("i32"), group_chunks_ptr=Ptr("i32"), part_base_ptr=Ptr("i32"),
            x_ptr=Ptr(x), out_ptr=Ptr(dt), colsum_ptr=Ptr(dt), part_ptr=Ptr("fp32"),
            part_colsum_ptr=Ptr("fp32"), **strides, CHUNK=sm.CHUNK, BLOCK_N=sm.BLOCK_N,
            BLOCK_J=sm.BLOCK_J, BLOCK_D=min(64, next_pow2(d)),
        )  # fmt: skip
        chunks = dict(
            long_lat_ptr=Ptr("i32"), seg_ptr=Ptr("i32"), part_base_ptr=Ptr("i32"),
            part_ptr=Ptr("fp32"), part_colsum_ptr=Ptr("fp32"), out_ptr=Ptr(dt),
            colsum_ptr=Ptr(dt), **strides, CHUNK=sm.CHUNK, BLOCK_D=min(256, next_pow2(d)),
        )  # fmt: skip
        cases.append(Case(module, "_segment_matmul_kernel", main, 4))
        cases.append(Case(module, "_segment_matmul_chunks_kernel", chunks, 4))
    return cases


def decoder_norm_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/decoder_norm.py _blocks (both kernels, W_dec [n, d])."""
    block_d = next_pow2(d)
    block_m = max(1, min(next_pow2(n), 4096 // block_d))
    warps = min(16, max(4, block_m * block_d // 1024))
    blocks = dict(N=n, D=d, BLOCK_M=block_m, BLOCK_D=block_d)
    module = MODULES["decoder_norm"]
    return [
        Case(module, "_normalize_rows_kernel", dict(w_ptr=Ptr(dt), **blocks), warps),
        Case(
            module, "_remove_parallel_grad_kernel", dict(w_ptr=Ptr(dt), g_ptr=Ptr(dt), **blocks),
            warps,
        ),
    ]  # fmt: skip


def column_split_rows(n: int, block_m: int, block_n: int, sms: int) -> int:
    """ROWS_PER_SPLIT from kernels/utils.py column_splits and the backward launchers."""
    col_blocks = cdiv(n, block_n)
    splits = max(1, min(cdiv(B, block_m), cdiv(4 * sms, col_blocks)))
    return cdiv(cdiv(B, splits), block_m) * block_m


def gated_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/gated.py gated_forward / gated_backward (pre in dt, [n] vectors fp32; grad pre
    written or not, WRITE_DPRE)."""
    block_m, block_n, warps = 16, 256, 8
    vec = dict(b_gate_ptr=Ptr("fp32"), r_mag_ptr=Ptr("fp32"), b_mag_ptr=Ptr("fp32"))
    module = MODULES["gated"]
    fwd = dict(
        pre_ptr=Ptr(dt), **vec, f_ptr=Ptr(dt), g_ptr=Ptr(dt), B=B, N=n, BLOCK_M=block_m,
        BLOCK_N=block_n,
    )  # fmt: skip
    cases = [Case(module, "_gated_fwd_kernel", fwd, warps)]
    for sms in SM_COUNTS:
        for write in (True, False):
            bwd = dict(
                pre_ptr=Ptr(dt), **vec, df_ptr=Ptr(dt), dg_ptr=Ptr(dt),
                dpre_ptr=Ptr(dt) if write else None, partial_ptr=Ptr("fp32"), B=B, N=n,
                ROWS_PER_SPLIT=column_split_rows(n, block_m, block_n, sms), WRITE_DPRE=write,
                BLOCK_M=block_m, BLOCK_N=block_n,
            )  # fmt: skip
            cases.append(Case(module, "_gated_bwd_kernel", bwd, warps))
    return cases


def jumprelu_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/jumprelu.py jumprelu_forward / jumprelu_backward (pre in dt, b_enc and θ fp32)."""
    module = MODULES["jumprelu"]
    fwd = dict(
        pre_ptr=Ptr(dt), b_ptr=Ptr("fp32"), theta_ptr=Ptr("fp32"), f_ptr=Ptr(dt),
        l0_ptr=Ptr("fp32"), B=B, N=n, BLOCK_M=8, BLOCK_N=512,
    )  # fmt: skip
    cases = [Case(module, "_jumprelu_fwd_kernel", fwd, 8)]
    for sms in SM_COUNTS:
        bwd = dict(
            pre_ptr=Ptr(dt), b_ptr=Ptr("fp32"), theta_ptr=Ptr("fp32"), df_ptr=Ptr(dt),
            dl0_ptr=Ptr("fp32"), dpre_ptr=Ptr(dt), partial_ptr=Ptr("fp32"), B=B, N=n,
            ROWS_PER_SPLIT=column_split_rows(n, 16, 256, sms), INV_EPS=1e3, BLOCK_M=16,
            BLOCK_N=256,
        )  # fmt: skip
        cases.append(Case(module, "_jumprelu_bwd_kernel", bwd, 8))
    return cases


def capture_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/capture.py launch_compact_rows (B rows of a dt hidden state, stored as bf16, the
    default cache dtype, and as dt)."""
    block_d = min(next_pow2(d), 256)
    block_r = max(1, min(64, 8192 // block_d))
    return [
        Case(
            MODULES["capture"], "_compact_rows_kernel",
            dict(
                h_ptr=Ptr(dt), keep_ptr=Ptr("u1"), dest_ptr=Ptr("i32"), out_ptr=Ptr(out),
                psum_ptr=Ptr("fp32"), psq_ptr=Ptr("fp32"), N=B, D=d, BLOCK_R=block_r,
                BLOCK_D=block_d,
            ),
        )
        for out in sorted({"bf16", dt})
    ]  # fmt: skip


def direct_topk_cases(d: int, n: int, k: int, dt: str) -> list[Case]:
    """kernels/topk.py topk on a dense z [B, n] (bench/topk_bench.py's kernel benchmark)."""
    return topk_cases(B, n, k, dt, is_keys=False)


CASE_BUILDERS = [
    encode_topk_cases, direct_topk_cases, sparse_decode_cases, segment_matmul_cases,
    decoder_norm_cases, gated_cases, jumprelu_cases, capture_cases,
]  # fmt: skip

# ==== end of CASES ===========================================================================


def specialize(value: object) -> tuple[str, object, bool]:
    """(signature type, constexpr value or None, divisible by 16) as Triton's launcher does."""
    if value is None:
        return "constexpr", None, False
    if isinstance(value, Ptr):
        return "*" + value.dtype, None, True  # torch allocations are 16-byte aligned
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"unsupported argument {value!r}")


def _is_jit(decorator: ast.expr) -> bool:
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name == "jit"


def _jit_functions(kernels_dir: Path) -> dict[tuple[str, str], ast.FunctionDef]:
    """(module, name) -> definition of every top-level @triton.jit function in kernels_dir."""
    return {
        (path.stem, node.name): node
        for path in sorted(kernels_dir.glob("*.py"))
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and any(map(_is_jit, node.decorator_list))
    }


def kernel_params(kernels_dir: Path = KERNELS_DIR) -> dict[tuple[str, str], list[tuple[str, bool]]]:
    """(module, name) -> [(parameter, is tl.constexpr)] of every @triton.jit function."""
    return {
        key: [
            (a.arg, a.annotation is not None and "constexpr" in ast.unparse(a.annotation))
            for a in fn.args.args
        ]
        for key, fn in _jit_functions(kernels_dir).items()
    }


def specialization(case: Case, params: list[tuple[str, bool]]) -> list[tuple]:
    """(name, signature type, constexpr value, divisible by 16) per argument of a case; raises
    ValueError when the case's arguments are not the kernel's parameters."""
    names = [name for name, _ in params]
    if names != list(case.args):
        raise ValueError(
            f"{case.module}.{case.kernel}: case arguments {list(case.args)} != parameters {names}"
        )
    spec = []
    for name, is_constexpr in params:
        value = case.args[name]
        if is_constexpr:
            spec.append((name, "constexpr", value, False))
        else:
            spec.append((name, *specialize(value)))
    return spec


def all_cases(kernels_dir: Path = KERNELS_DIR) -> list[Case]:
    """Every case at every benchmark shape and dtype; cases that compile to the same binary
    (same specialization and options) merged, their `where` joined. The launchers' GPU
    choices are read with the interpreter off (they pick small tiles under it)."""
    interpreting = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return _all_cases(kernels_dir)
    finally:
        if interpreting is not None:
            os.environ["TRITON_INTERPRET"] = interpreting


def _all_cases(kernels_dir: Path) -> list[Case]:
    params = kernel_params(kernels_dir)
    merged: dict[tuple, Case] = {}
    for d, n, k in SHAPES:
        for dt in DTYPES:
            for build in CASE_BUILDERS:
                for case in build(d, n, k, dt):
                    spec = specialization(case, params.get((case.module, case.kernel), []))
                    key = (case.module, case.kernel, tuple(spec), case.num_warps, case.num_stages)
                    case = merged.setdefault(key, case)
                    where = f"{dt} d={d} n={n} k={k}"
                    if where not in case.where:
                        case.where.append(where)
    return list(merged.values())


def config_label(case: Case, spec: list[tuple]) -> str:
    """The compile-time part of a case: pointer dtypes, constexprs, ints not divisible by 16,
    num_warps, num_stages."""
    parts = []
    for name, kind, value, div16 in spec:
        short = name.removesuffix("_ptr")
        if kind.startswith("*"):
            parts.append(f"{short}:{kind[1:]}")
        elif kind == "constexpr":
            parts.append(f"{short}={value}")
        elif kind in ("i32", "i64") and not div16:
            parts.append(f"{short}%16!=0")
    parts.append(f"warps={case.num_warps}")
    if case.num_stages is not None:
        parts.append(f"stages={case.num_stages}")
    if case.maxnreg is not None:
        parts.append(f"maxnreg={case.maxnreg}")
    return " ".join(parts)


@dataclass
class Record:
    """What one compile gave; counts are static SASS instruction counts."""

    module: str
    kernel: str
    config: str
    where: list[str]
    num_warps: int = 0
    regs: int = 0
    spill_bytes: int = 0
    stack_bytes: int = 0
    smem_dynamic: int = 0
    smem_static: int = 0
    mma: int = 0
    int_ops: int = 0
    opcodes: dict = field(default_factory=dict)
    estimate: dict | None = None
    case: Case | None = None  # the case the estimate was made for (its block sizes)
    seconds: float = 0.0
    error: str = ""


def check(record: Record) -> list[str]:
    """The reasons a record fails (empty: it passes)."""
    name = f"{record.module}.{record.kernel} [{record.config}]"
    if record.error:
        return [f"{name}: failed: {record.error}"]
    problems = []
    if record.spill_bytes > 0:
        problems.append(f"{name}: {record.spill_bytes} bytes of register spills")
    if record.regs > MAX_REGS:
        problems.append(f"{name}: {record.regs} registers > {MAX_REGS}")
    if record.smem_dynamic > MAX_SMEM_BLOCK:
        problems.append(f"{name}: {record.smem_dynamic} B dynamic shared > {MAX_SMEM_BLOCK}")
    if record.smem_dynamic + record.smem_static > MAX_SMEM_SM:
        total = record.smem_dynamic + record.smem_static
        problems.append(f"{name}: {total} B shared memory > {MAX_SMEM_SM} per SM")
    return problems


def discover_kernels(kernels_dir: Path = KERNELS_DIR) -> set[tuple[str, str]]:
    """(module, name) of every @triton.jit function in kernels_dir that no jit function calls:
    the kernels a launcher launches (helpers are compiled into them)."""
    jit_fns = _jit_functions(kernels_dir)
    called = {
        n.id if isinstance(n, ast.Name) else n.attr
        for fn in jit_fns.values()
        for n in ast.walk(fn)
        if isinstance(n, (ast.Name, ast.Attribute))
    }
    return {key for key in jit_fns if key[1] not in called}


def coverage_problems(cases: list[Case], kernels_dir: Path = KERNELS_DIR) -> list[str]:
    """Kernels in kernels_dir without a case, and cases naming no kernel there."""
    found = discover_kernels(kernels_dir)
    covered = {(c.module, c.kernel) for c in cases}
    return [f"{m}.{k}: @triton.jit kernel without a case" for m, k in sorted(found - covered)] + [
        f"{m}.{k}: case for a kernel not found in kernels/" for m, k in sorted(covered - found)
    ]


def _import_kernels(module: str) -> object:
    """flashsae.kernels.<module>, loading kernels/ from this checkout if flashsae is not
    installed (as on an offline GPU box)."""
    if importlib.util.find_spec("flashsae") is None and "flashsae" not in sys.modules:
        import types

        pkg = types.ModuleType("flashsae")
        pkg.__path__ = []
        sys.modules["flashsae"] = pkg
        spec = importlib.util.spec_from_file_location(
            "flashsae.kernels",
            KERNELS_DIR / "__init__.py",
            submodule_search_locations=[str(KERNELS_DIR)],
        )
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["flashsae.kernels"] = kernels
        spec.loader.exec_module(kernels)
    return importlib.import_module(f"flashsae.kernels.{module}")


def _tool(name: str) -> str:
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {out.stderr.strip()[-2000:]}")
    return out.stdout + out.stderr


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode without modifiers or predicate, instruction text) per instruction."""
    instrs = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        text = m.group(2).strip()
        body = re.sub(r"^@!?U?P\w+\s+", "", text)
        instrs.append((int(m.group(1), 16), body.split()[0].split(".")[0], text))
    return instrs


def count_ops(instrs: list[tuple[int, str, str]]) -> Counter:
    return Counter(op for _, op, _ in instrs)


# Cycle model (an estimate, per SM of an H100 SXM, dense rates): wgmma m64nNk16 bf16 retires
# 4096 FLOP/clk/SM (989 TFLOP/s = 132 SMs x 1.83 GHz x 4096), tf32 m64nNk8 half that; a
# warp-instruction of 32-bit integer ALU/IMAD work takes 2 clocks of its SM sub-partition
# (64 lanes/clk/SM, 16 per sub-partition, CUDA guide throughput table, cc 9.0), SHFL 4
# (32 lanes/clk/SM); 4 sub-partitions work in parallel, each issuing 1 warp-instruction/clk.
MMA_FLOP_PER_CLK = {"BF16": 4096, "F16": 4096, "TF32": 2048}
INT_CLK_PER_WARP_INSTR = 2 / 4  # SM clocks per warp-instruction, ALU and IMAD
SHFL_CLK_PER_WARP_INSTR = 4 / 4


def loops(instrs: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(start, end) address ranges of loops: each backward BRA closes one."""
    found = []
    for addr, op, text in instrs:
        target = re.search(r"0x([0-9a-f]+)\s*$", text)
        if op == "BRA" and target and int(target.group(1), 16) <= addr:
            found.append((int(target.group(1), 16), addr))
    return found


SMS, CLOCK_HZ = 132, 1.83e9  # H100 SXM, for the time estimates


def _int_clk(group: list[tuple[int, str, str]], times: int, warps: int) -> tuple[float, Counter]:
    """SM clocks of the integer work of ``group`` run ``times`` by ``warps`` warps, and its ops."""
    ops = Counter()
    for _, op, _ in group:
        if op in INT_OPS:
            ops[op] += times
    alu = sum(v for op, v in ops.items() if op != "SHFL")
    return warps * (alu * INT_CLK_PER_WARP_INSTR + ops["SHFL"] * SHFL_CLK_PER_WARP_INSTR), ops


def tile_estimate(instrs: list[tuple[int, str, str]], case: Case) -> dict | None:
    """Integer-pipe vs MMA clocks of one tile of the fused encoder's chunks kernel (an estimate).

    The innermost loop holding HGMMA is the K-loop, run D / BLOCK_K times; everything else (the
    bias, the TOP rounds of chunk maxima, the key and bound stores) is the epilogue, run once.
    The tile time is bounded below by max(MMA, K-loop INT + epilogue INT) when two CTAs share
    an SM (one's epilogue under the other's MMA) and by max(MMA, K-loop INT) + epilogue INT
    with one; ``tiles_us`` takes the bound for the CTAs per SM the registers allow."""
    ranges = loops(instrs)
    has_mma = [
        (s, e) for s, e in ranges if any(s <= a <= e and op in MMA_OPS for a, op, _ in instrs)
    ]
    if not has_mma:
        return None
    k_lo, k_hi = min(has_mma, key=lambda r: r[1] - r[0])
    inner = [i for i in instrs if k_lo <= i[0] <= k_hi]
    rest = [i for i in instrs if not k_lo <= i[0] <= k_hi]
    warps = case.num_warps
    warpgroup_clk = sass_flops = 0.0
    for _, op, text in inner:
        if op == "HGMMA":
            m, n, k = map(int, re.search(r"HGMMA\.(\d+)x(\d+)x(\d+)", text).groups())
            dtype = re.search(r"\.(BF16|F16|TF32)", text).group(1)
            warpgroup_clk += 2 * m * n * k / MMA_FLOP_PER_CLK[dtype]
            sass_flops += 2 * m * n * k * warps / 4
    epi_clk, epi_ops = _int_clk(rest, 1, warps)
    a = case.args
    return {
        "mma_clk_per_iter": warpgroup_clk * warps / 4,  # HGMMA is issued per warpgroup
        "flop_ratio": sass_flops / (2 * a["BLOCK_M"] * a["BLOCK_N"] * a["BLOCK_K"]),
        "k_int_clk_per_iter": _int_clk(inner, 1, warps)[0],
        "epi_int_clk": epi_clk,
        "top_epi": epi_ops.most_common(6),
    }


def tile_clocks(e: dict, case: Case, d: int) -> tuple[float, float, float]:
    """(MMA, K-loop INT, epilogue INT) SM clocks of one tile at width d."""
    iters = cdiv(d, case.args["BLOCK_K"])
    return e["mma_clk_per_iter"] * iters, e["k_int_clk_per_iter"] * iters, e["epi_int_clk"]


def tile_time_us(e: dict, case: Case, d: int, n: int, ctas_per_sm: int) -> float:
    """The chunks kernel's time at (B, d, n) from its tile estimate (see tile_estimate)."""
    mma, k_int, epi = tile_clocks(e, case, d)
    if ctas_per_sm >= 2:
        clk = max(mma, k_int + epi)
    else:
        clk = max(mma, k_int) + epi
    tiles = cdiv(B, case.args["BLOCK_M"]) * cdiv(n, case.args["BLOCK_N"])
    return tiles / SMS * clk / CLOCK_HZ * 1e6


def select_estimate(instrs: list[tuple[int, str, str]], case: Case) -> dict:
    """Integer clocks of the select kernel's first pass (an estimate): the key loop (the loop
    with the most instructions: load and bitonic merge) run N_KEYS / BLOCK_N times, the bound
    loop N_BOUND / BLOCK_N times, the rest once per program; integer-bound, so the time is the
    total over B / BLOCK_M programs spread over the SMs."""
    ranges = sorted(loops(instrs), key=lambda r: -sum(r[0] <= i[0] <= r[1] for i in instrs))
    key_loop = ranges[0]
    bound_loops = [r for r in ranges[1:] if not (key_loop[0] <= r[0] <= key_loop[1])]
    warps = case.num_warps
    clk, in_loops = [], set()
    for lo, hi in [key_loop] + bound_loops[:1]:
        body = [i for i in instrs if lo <= i[0] <= hi]
        in_loops |= {i[0] for i in body}
        clk.append(_int_clk(body, 1, warps)[0])
    rest = _int_clk([i for i in instrs if i[0] not in in_loops], 1, warps)[0]
    return {"key_clk_per_iter": clk[0], "bound_clk_per_iter": sum(clk[1:]), "rest_clk": rest}


def select_time_us(e: dict, case: Case, n_keys: int, n_bound: int) -> float:
    """The select kernel's first pass over n_keys keys and n_bound bounds per row, from
    select_estimate."""
    a = case.args
    clk = (
        e["key_clk_per_iter"] * cdiv(n_keys, a["BLOCK_N"])
        + e["bound_clk_per_iter"] * cdiv(n_bound, a["BLOCK_N"])
        + e["rest_clk"]
    )
    return cdiv(B, a["BLOCK_M"]) / SMS * clk / CLOCK_HZ * 1e6


def compile_case(case: Case) -> Record:
    """Compile one case for sm_90a and measure it (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    record = Record(case.module, case.kernel, "", case.where, case.num_warps)
    start = time.perf_counter()
    try:
        params = kernel_params().get((case.module, case.kernel), [])
        spec = specialization(case, params)
        record.config = config_label(case, spec)
        fn = getattr(_import_kernels(case.module), case.kernel)
        signature, constexprs, attrs = {}, {}, {}
        for i, (name, kind, value, div16) in enumerate(spec):
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = value
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        options = {"num_warps": case.num_warps}
        if case.num_stages is not None:
            options["num_stages"] = case.num_stages
        if case.maxnreg is not None:
            options["maxnreg"] = case.maxnreg
        log = io.StringIO()  # Triton's own ptxas -v log (TRITON_DUMP_PTXAS_LOG), printed
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options=options,
            )
        record.smem_dynamic = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = _run([_tool("cuobjdump"), "-res-usage", str(cubin)])
            sass = _run([_tool("cuobjdump"), "-sass", str(cubin)])
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
        if not spills:
            raise RuntimeError(f"no ptxas -v log captured: {log.getvalue()[-500:]!r}")
        record.spill_bytes = sum(int(st) + int(ld) for st, ld in spills)
        res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        record.regs, record.stack_bytes, record.smem_static = map(int, res.groups()[:3])
        instrs = parse_sass(sass)
        ops = count_ops(instrs)
        record.opcodes = dict(ops)
        record.mma = sum(ops[op] for op in MMA_OPS)
        record.int_ops = sum(ops[op] for op in INT_OPS)
        if case.kernel == "_encode_chunks_kernel":
            record.estimate = tile_estimate(instrs, case)
            if record.estimate is None:
                raise RuntimeError("no K-loop found in the SASS")
            record.case = case
        elif case.kernel == "_select_kernel" and not case.args["OVERFLOW"]:
            record.estimate = select_estimate(instrs, case)
            record.case = case
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the others
        record.error = f"{type(e).__name__}: {e}".strip()[-3000:]
    record.seconds = time.perf_counter() - start
    return record


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated


def compile_all(cases: list[Case], jobs: int = 2) -> list[Record]:
    """Compile the cases in `jobs` fresh processes, the interpreter off, an empty Triton cache."""
    with tempfile.TemporaryDirectory(prefix="hopper_compile_") as cache:
        with ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(cache,)
        ) as pool:
            return list(pool.map(compile_case, cases))


def _num(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def markdown(records: list[Record], seconds: float, failures: list[str]) -> str:
    import triton

    lines = [
        "# Triton kernels compiled for Hopper (sm_90a, no GPU)",
        "",
        f"`python bench/hopper_compile.py`, triton {triton.__version__}, {len(records)} "
        f"configurations in {seconds:.0f} s. Shapes (d, n, k) {SHAPES}, B = {B}, dtypes "
        f"{', '.join(DTYPES)}, k_aux = d/2, SM counts {SM_COUNTS}.",
        "",
        f"Limits: {MAX_REGS} registers/thread, {MAX_SMEM_BLOCK // 1024} KiB dynamic shared "
        f"memory/block, {MAX_SMEM_SM // 1024} KiB/SM, no spills. smem = dynamic + static bytes. "
        "MMA = HGMMA + HMMA; INT = " + ", ".join(INT_OPS) + " (vector only, U* uniform ops not "
        "counted). All counts are static SASS instructions.",
        "",
        "| kernel | config | regs | spills (B) | smem (B) | MMA | INT | SASS total | used at |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        kernel = f"{r.module}.{r.kernel}"
        if r.error:
            lines.append(f"| {kernel} | {r.config} | - | - | - | - | - | - | ERROR |")
            continue
        smem = f"{r.smem_dynamic} + {r.smem_static}"
        total = sum(r.opcodes.values())
        lines.append(
            f"| {kernel} | {r.config} | {r.regs} | {r.spill_bytes} | {smem} | {r.mma} | "
            f"{r.int_ops} | {total} | {'; '.join(r.where)} |"
        )
    lines += [
        "",
        "## encode_topk: integer-pipe vs MMA clocks (ESTIMATE, not measured)",
        "",
        "Cycle model, per SM of an H100 SXM (132 SMs, 1.83 GHz): wgmma bf16 4096 FLOP/clk "
        "(989 TFLOP/s), tf32 2048 FLOP/clk (the fp32 path's tf32x3 issues three); HGMMA counted "
        "once per warpgroup. Integer: a 32-bit ALU or IMAD warp-instruction costs 2 clocks of one "
        "of the 4 sub-partitions (64 lanes/clk/SM), SHFL 4 (32 lanes/clk/SM), so per SM "
        "int clk = warps x (ALU+IMAD x 0.5 + SHFL x 1). Chunks kernel, per tile: the K-loop "
        "(innermost SASS loop with HGMMA) x D/BLOCK_K, the epilogue (everything else: bias, TOP "
        "rounds of chunk maxima, stores) once. A tile takes at least max(MMA, K-loop INT + "
        "epilogue INT) with two CTAs per SM, max(MMA, K-loop INT) + epilogue INT with one. The "
        "select kernel (first pass) is integer-bound: its key loop x N_KEYS/BLOCK_N, bound loop "
        "x N_BOUND/BLOCK_N, rest once, per program, over the SMs. The exact pass runs for the "
        "few flagged rows only (not counted). FLOP check: HGMMA FLOP counted this way over "
        "2 x BLOCK_M x BLOCK_N x D (1 for one bf16 pass).",
        "",
        "| chunks kernel config | used at | K iters | MMA clk | K-loop INT clk | epilogue INT "
        "clk | K-loop INT/MMA | epilogue INT/MMA | CTAs/SM | FLOP check | top epilogue INT ops |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    enc = _import_kernels(MODULES["encode_topk"])
    totals: dict[str, dict] = {}
    for r in records:
        e = r.estimate
        if e is None:
            continue
        for where in r.where:
            dt, d, n, k = map(_num, re.match(r"(\w+) d=(\d+) n=(\d+) k=(\d+)", where).groups())
            t = totals.setdefault(where, {})
            if r.kernel == "_select_kernel":
                n_chunks = cdiv(n, enc.chunk_size(n, k, enc._fused_config(dt == "fp32")[1]))
                t["select"] = select_time_us(e, r.case, enc.TOP * n_chunks, n_chunks)
                continue
            ctas = min(
                65536 // (r.regs * r.num_warps * 32),
                MAX_SMEM_SM // (r.smem_dynamic + r.smem_static),
            )
            t["chunks"] = tile_time_us(e, r.case, d, n, ctas)
            mma, k_int, epi = tile_clocks(e, r.case, d)
            top = ", ".join(f"{op} {c}" for op, c in e["top_epi"])
            lines.append(
                f"| {r.config} | {where} | {cdiv(d, r.case.args['BLOCK_K'])} | {mma:.0f} | "
                f"{k_int:.0f} | {epi:.0f} | {k_int / mma:.2f} | {epi / mma:.2f} | {ctas} | "
                f"{e['flop_ratio']:.2f} | {top} |"
            )
    lines += [
        "",
        f"Estimated fused forward at B = {B} (chunks kernel + select first pass), against the "
        "GEMM alone at the peak MMA rate (989 TFLOP/s bf16; tf32x3: three tf32 passes at 494, so "
        "165 effective):",
        "",
        "| used at | chunks kernel us | select us | fused us | GEMM at peak us | fused / GEMM |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for where, t in totals.items():
        if "chunks" not in t or "select" not in t:
            continue
        dt, d, n, _ = map(_num, re.match(r"(\w+) d=(\d+) n=(\d+) k=(\d+)", where).groups())
        gemm = 2 * B * d * n / (989e12 if dt == "bf16" else 165e12) * 1e6
        fused = t["chunks"] + t["select"]
        lines.append(
            f"| {where} | {t['chunks']:.0f} | {t['select']:.0f} | {fused:.0f} | {gemm:.0f} | "
            f"{fused / gemm:.2f} |"
        )
    lines += ["", "## Failures", ""] + ([f"- {f}" for f in failures] or ["none"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    cases = all_cases()
    start = time.perf_counter()
    records = compile_all(cases, args.jobs)
    seconds = time.perf_counter() - start
    failures = coverage_problems(cases) + [p for r in records for p in check(r)]
    text = markdown(records, seconds, failures)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if failures:
        print(f"{len(failures)} failures:", *failures, sep="\n", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
