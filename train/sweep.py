"""Sweeps: many SAEs trained from one pass over the activation cache.

A sweep is a list of ``RunConfig`` that share every setting of the data (model, site, cache,
text, tokens, batch size, seed, device, ...) and differ only in those of ``SWEEPABLE`` (the SAE
and its optimisation). ``run_sweep`` prepares the data once, builds every SAE (each from
``torch.manual_seed(seed)``, as a separate run would), and steps them all from each batch of one
loader: a batch is read and copied to the device once and shared (``trainer.train_many``). So
each member ends with exactly the weights of a separate run with its settings.

On disk, the sweep directory holds ``sweep.json`` (its members), one run directory per member
(named after the settings that vary, e.g. ``topk-k16``: ``config.json``, ``train_state.pt``,
``metrics.json``, ... as a single run's), and, at the end, ``sweep.md`` (one table of every
member's metrics) and the frontier plots ``frontier_fvu.png`` and ``frontier_ce.png``. Each
member has its own W&B run; the runs share the W&B group of the sweep's directory name.
``resume_sweep`` continues every unfinished member.

Members are given as comma lists on the flags (``--arch topk,batchtopk --k 16,32``: every
combination) or in a TOML file (``--sweep sweep.toml``, see ``read_sweep_file``).

Under torchrun (data parallel) every member trains as a single run does: each rank steps every
member on its share of the batch, each member's gradients averaged over the ranks; rank 0 alone
writes, logs and evaluates.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from dataclasses import fields, replace
from pathlib import Path

from flashsae.cache.errors import UserError
from flashsae.cache.locks import exclusive_lock
from flashsae.cache.models.subjects import pick_device

from . import distributed
from .config import RunConfig, _parsed
from .eval import sibling_runs
from .files import write_output
from .metrics import METRIC_KEYS
from .pipeline import (
    RESUMABLE,
    _same,
    check_ranks,
    check_run_dir,
    finish_member,
    follow,
    loader_of,
    prepare,
    removed_on_failure,
    resolved,
    start_member,
)
from .plots import frontier_plot
from .trainer import train_many

# the settings the members of one sweep may differ in (with their short names in directory
# names); every other setting is the data's, shared by all members
SWEEPABLE = {
    "arch": "",
    "n_latents": "n",
    "k": "k",
    "lr": "lr",
    "sparsity_coeff": "lam",
    "target_l0": "target",
    "dtype": "",
    "dead_window": "dw",
    "checkpoint_every": "ckpt",
}
SWEEP_FILE = "sweep.json"
TABLE_KEYS = ("l0", "fvu", "ce_loss_recovered", "dead_frac", "dense_frac")


def grid(base: RunConfig, axes: dict[str, list]) -> list[RunConfig]:
    """Every combination of the ``axes`` values (field name -> values) applied to ``base``, the
    first axis varying slowest."""
    for name in axes:
        if name not in SWEEPABLE:
            raise UserError(
                f"a sweep cannot vary {name!r} (its members share the data); "
                f"it may vary: {', '.join(SWEEPABLE)}"
            )
    combos = itertools.product(*axes.values())
    return [replace(base, **dict(zip(axes, combo, strict=True))) for combo in combos]


def read_sweep_file(path: Path, given: dict[str, object] | None = None) -> list[RunConfig]:
    """The members of the TOML sweep file ``path``.

    Top-level keys are ``RunConfig`` settings (the flag names with ``_`` or ``-``); a list
    value of a ``SWEEPABLE`` setting is a sweep axis, and every combination of the axes is a
    member. Each ``[[runs]]`` table, when there are any, is expanded the same way on top of the
    top-level settings, and the sweep is all of them::

        model = "bytelm"
        tokens = 2_000_000
        arch = ["topk", "batchtopk"]
        k = [16, 32, 64]            # 6 members

        [[runs]]                    # and, with these two tables, 2 more
        arch = "relu"
        sparsity_coeff = [1.0, 3.0]

    ``given`` (settings named on the command line, comma lists as lists) apply to every
    member, over the file.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise UserError("--sweep needs Python 3.11+ (tomllib) or `pip install tomli`") from e
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise UserError(f"--sweep {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --sweep {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--sweep {path} is not valid TOML ({e})") from e
    tables = raw.pop("runs", [{}])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{path}: runs must be an array of tables ([[runs]])")
    cfgs = []
    for table in tables:
        settings = _settings(path, raw | table) | (given or {})
        axes = {k: v for k, v in settings.items() if isinstance(v, list)}
        base = replace(RunConfig(), **{k: v for k, v in settings.items() if k not in axes})
        cfgs += grid(base, axes)
    return cfgs


def _settings(path: Path, table: dict) -> dict[str, object]:
    """``table``'s keys as RunConfig field names, each value (or each value of a list) checked
    against its field's type."""
    known = {f.name: f for f in fields(RunConfig)}
    out: dict[str, object] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"{path}: unknown setting {key!r}")
        if isinstance(value, list):
            if not value:
                raise UserError(f"{path}: {key} is an empty list")
            out[name] = [_parsed(path, known[name], v) for v in value]
        else:
            out[name] = _parsed(path, known[name], value)
    return out


def member_names(cfgs: list[RunConfig]) -> list[str]:
    """Directory names of the members: the values of the settings that vary among them, e.g.
    ``topk-k16``, ``batchtopk-k32`` (``run`` for a sweep of one)."""
    varied = [n for n in SWEEPABLE if len({getattr(c, n) for c in cfgs}) > 1]
    names = ["-".join(f"{SWEEPABLE[n]}{getattr(c, n)}" for n in varied) or "run" for c in cfgs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"the sweep has several members with the same settings: {dupes}")
    return names


def check_members(cfgs: list[RunConfig]) -> None:
    """Raise UserError unless the members share every setting outside ``SWEEPABLE``."""
    if not cfgs:
        raise UserError("the sweep has no members")
    for f in fields(RunConfig):
        if f.name in SWEEPABLE:
            continue
        values = {str(getattr(c, f.name)) for c in cfgs}
        if len(values) > 1:
            raise UserError(
                f"the members of a sweep share the data, but their --{f.name.replace('_', '-')} "
                f"differ ({', '.join(sorted(values))}); a sweep may vary: {', '.join(SWEEPABLE)}"
            )
    for cfg in cfgs:
        cfg.check()


def sweep_dir(cfg: RunConfig) -> Path:
    """``cfg.out``, or ``runs/sweep-<model>-<time>``."""
    name = f"sweep-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.out or Path("runs") / name.replace("/", "_")


def run_sweep(cfgs: list[RunConfig], resume: bool = False) -> list[dict]:
    """Train, evaluate and save every member of the sweep ``cfgs`` from one pass over the data;
    their ``metrics.json`` dicts, in order. The sweep directory is the members' shared ``out``
    (default ``sweep_dir``). With ``resume``, ``cfgs`` are those of ``resume_sweep``: finished
    members are read back, the others continue from their ``train_state.pt`` (or from the
    start, when they had none). The sweep directory and every member's are locked throughout.
    A sweep that fails before any member's first checkpoint leaves nothing behind.
    """
    check_members(cfgs)
    if cfgs[0].shard_latents:
        raise UserError(
            "--shard-latents trains one SAE over the ranks; it does not combine with a sweep "
            "(comma lists or --sweep): run the members one by one"
        )
    with distributed.started(pick_device(cfgs[0].device)):
        check_ranks(cfgs)
        if not distributed.is_main():
            return follow(cfgs)
        return _sweep_locked(cfgs, resume)


def _sweep_locked(cfgs: list[RunConfig], resume: bool) -> list[dict]:
    """``run_sweep`` on rank 0 (or the one process): check and lock the directories, train."""
    out = sweep_dir(cfgs[0])
    names = member_names(cfgs)
    dirs = [out / n for n in names]
    if not resume and (out / SWEEP_FILE).exists():
        raise UserError(f"{out} already holds a sweep; continue it with --resume {out}")
    for d in dirs if not resume else ():
        check_run_dir(d, resume=False)
    if resume and all((d / "metrics.json").exists() for d in dirs):
        raise UserError(f"{out} already holds a finished sweep; choose another --out")
    existed = out.exists()
    try:
        with contextlib.ExitStack() as locks:
            locks.enter_context(exclusive_lock(out, "a sweep"))
            checkpointed = lambda: any((d / "train_state.pt").exists() for d in dirs)
            locks.enter_context(removed_on_failure(out, keep=checkpointed))
            for d in dirs:
                locks.enter_context(exclusive_lock(d, "a sweep"))
            return _sweep(cfgs, out, names, dirs, resume)
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty


def _sweep(
    cfgs: list[RunConfig], out: Path, names: list[str], dirs: list[Path], resume: bool
) -> list[dict]:
    """``run_sweep``'s work in the locked directories."""
    data = prepare(cfgs[0])
    subject = data.subject
    cfgs = [
        replace(resolved(c, subject), cache=data.cache, out=d)
        for c, d in zip(cfgs, dirs, strict=True)
    ]
    write_output(out / SWEEP_FILE, json.dumps({"members": names}, indent=2))
    finished = {i: json.loads((d / "metrics.json").read_text())
                for i, d in enumerate(dirs) if (d / "metrics.json").exists()}  # fmt: skip
    todo = distributed.share([i for i in range(len(cfgs)) if i not in finished])
    members = []
    try:
        for i in todo:
            members.append(start_member(data, cfgs[i], dirs[i], f"{out.name}/{names[i]}", out.name))
        summaries = train_many(members, loader_of(data)) if members else []
    except BaseException:
        for m in members:
            m.logger.abort()
        raise
    for i, m, summary in zip(todo, members, summaries, strict=True):
        finished[i] = finish_member(data, m, summary)
    results = [finished[i] for i in range(len(cfgs))]
    write_output(out / "sweep.md", table(cfgs, names, results))
    runs = sibling_runs(out)
    for y, png in (("fvu", "frontier_fvu"), ("ce_loss_recovered", "frontier_ce")):
        frontier_plot([r for r in runs if r.get(y) is not None], out / f"{png}.png", "l0", y)
    print(table(cfgs, names, results))
    print(f"sweep saved to {out}")
    return distributed.share(results)


def table(cfgs: list[RunConfig], names: list[str], results: list[dict]) -> str:
    """A markdown table: one row per member, its settings that vary and its metrics; then the
    data they were evaluated on."""
    varied = [n for n in SWEEPABLE if len({getattr(c, n) for c in cfgs}) > 1] or ["arch"]
    keys = [k for k in TABLE_KEYS if k in METRIC_KEYS]
    head = ["run", *varied, *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cfg, res in zip(names, cfgs, results, strict=True):
        values = [getattr(cfg, n) for n in varied]
        values += ["n/a" if res.get(k) is None else format(res[k], ".4g") for k in keys]
        lines.append("| " + " | ".join(map(str, [name, *values])) + " |")
    data = sorted({r["eval_data"]["name"] for r in results if r.get("eval_data")})
    lines += ["", f"Evaluated on {', '.join(data)}."] if data else []
    return "\n".join(lines) + "\n"


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / SWEEP_FILE).exists()


def resume_sweep(folder: Path, given: dict | None = None) -> list[RunConfig]:
    """The members of the sweep in ``folder``, from their saved ``config.json``. ``given``
    (settings named beside ``--resume``) follow ``pipeline.resume_config``'s rule: those of
    ``RESUMABLE`` apply to every member, any other must equal every member's saved value."""
    try:
        names = json.loads((folder / SWEEP_FILE).read_text())["members"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder / SWEEP_FILE} is not a readable sweep file ({e})") from e
    given = given or {}
    cfgs = []
    for name in names:
        cfg = replace(RunConfig.load(folder / name / "config.json"), out=folder)
        differ = [
            k for k, v in given.items() if k not in RESUMABLE and not _same(v, getattr(cfg, k))
        ]
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (saved: {getattr(cfg, k)})"
                              for k in differ)  # fmt: skip
            raise UserError(
                f"--resume {folder} continues the sweep with its saved settings, and {flags} "
                f"would change member {name}; only {', '.join(RESUMABLE.values())} may change"
            )
        cfgs.append(replace(cfg, **{k: v for k, v in given.items() if k in RESUMABLE}))
    if not cfgs:
        raise UserError(f"{folder / SWEEP_FILE} lists no members")
    if member_names(cfgs) != names:
        raise UserError(f"{folder}: the members' config.json do not match {SWEEP_FILE}")
    return cfgs
