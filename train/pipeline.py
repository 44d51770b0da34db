"""``run(cfg)``: the whole pipeline of one training run, as a function.

Subject model (trained on first use if bundled) -> activation cache (built or reused) -> SAE
training -> held-out evaluation with the SAE spliced in -> ``sae.safetensors`` + ``cfg.json`` +
``metrics.json`` + ``density.png`` in the run directory. The command line
(``python -m flashsae.train``) and the benchmark scripts call it; so can a notebook::

    from flashsae.train import RunConfig, load_sae, run
    metrics = run(RunConfig(arch="gated", tokens=1_000_000, out=Path("runs/gated")))
    sae = load_sae("runs/gated")

Under ``torchrun`` (data parallel, ``distributed``) every rank calls ``run`` with the same
settings: rank 0 does all of the above, the others train beside it on their share of each
batch (``follow``) and write nothing.

With ``--shard-latents`` the ranks instead form one shard group (``sharded``; not combined with
data parallel): each holds n/N latents and reads every batch whole; each writes its own training
state (rank 0 ``train_state.pt``, rank r ``train_state.rank{r}.pt``), and at the end the shards
are gathered on rank 0, which evaluates and saves the SAE as an unsharded run does.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from flashsae.cache.build import build, cache_settings, default_cache_dir, keep_mask
from flashsae.cache.errors import UserError
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.locks import exclusive_lock
from flashsae.cache.models.subjects import Subject, get_subject, pick_device
from flashsae.cache.shards import open_cache, site_stats

from . import distributed
from .checkpoint import save_sae
from .config import RunConfig
from .eval import EvalData, check_cache_model, evaluate
from .files import write_output
from .metrics import METRIC_KEYS, metric_warnings
from .plots import density_histogram
from .sae import SAE, input_scale, make_sae
from .sharded import ShardedSAE, gather_sae
from .trainer import SAETraining, TrainConfig, train_many
from .wandb_log import NullLogger, RunLogger


@dataclass
class RunData:
    """What a run trains and evaluates on: the subject model, its site, the cache."""

    cfg: RunConfig  # with site and n_latents resolved
    subject: Subject
    model: torch.nn.Module | None  # None on the ranks other than 0 (they do not evaluate)
    device: str
    cache: Path
    manifest: dict
    eval_data: EvalData | None  # None on the ranks other than 0
    eval_seqs: torch.Tensor | None  # the token sequences of eval_data the run is evaluated on

    def new_sae(self, cfg: RunConfig | None = None) -> SAE:
        """A freshly initialised SAE of ``cfg`` (default: this run's) for this data, on the
        run's device; weights are drawn from torch's global RNG."""
        cfg = cfg or self.cfg
        mean, mean_sq_norm = site_stats(self.manifest, cfg.site)
        sae = make_sae(
            cfg.arch,
            cfg.n_latents,
            mean,
            mean_sq_norm,
            k=cfg.k,
            sparsity_coeff=cfg.sparsity_coeff,
            site=cfg.site,
            model=cfg.model,
        )
        return sae.to(self.device)

    @property
    def input_scale(self) -> float:
        """The input scale of SAEs trained on this data (E||x||² = d)."""
        return input_scale(self.subject.d_model, site_stats(self.manifest, self.cfg.site)[1])

    def eval_sequences(self) -> torch.Tensor:
        """The token sequences of ``eval_data`` the run is evaluated on."""
        return self.eval_seqs

    def evaluate(self, sae: SAE) -> tuple[dict, torch.Tensor]:
        """``eval.evaluate`` of ``sae`` on ``eval_data`` (start and separator tokens not
        counted), with ``eval_data`` described under ``"eval_data"``."""
        seqs, subject = self.eval_sequences(), self.subject
        skip_first, special = int(subject.bos is not None), subject.special_tokens
        results, freqs = evaluate(
            sae, self.model, seqs, batch_size=self.cfg.eval_batch_size, skip_first=skip_first,
            drop_tokens=special,
        )  # fmt: skip
        n_tokens = int(keep_mask(seqs, special, skip_first).sum())
        return results | {"eval_data": self.eval_data.describe(n_tokens)}, freqs


def default_eval_data(cfg: RunConfig, settings: dict) -> EvalData:
    """All of ``cfg.eval_text`` when given, else the held-out split of the text the cache (its
    ``settings``) was built from: the stdlib's held-out files when that is the stdlib."""
    if cfg.eval_text is not None:
        return EvalData(cfg.eval_text, "all", cfg.text_field)
    return EvalData(settings.get("text"), "val", settings.get("text_field", "text"))


def resolved(cfg: RunConfig, subject: Subject) -> RunConfig:
    """``cfg`` with the subject's default site and 16 x d_model latents filled in, checked."""
    site = cfg.site or subject.default_site
    subject.check_site(site)
    cfg = replace(cfg, site=site, n_latents=cfg.n_latents or 16 * subject.d_model)
    cfg.check()
    return cfg


def prepare(cfg: RunConfig, subject: Subject | None = None) -> RunData:
    """Load the subject model (``subject``, or the one ``cfg.model`` names) and build (or reuse,
    or open) the activation cache of ``cfg``. Seeds torch's RNG with ``cfg.seed`` first.

    Under torchrun, rank 0 does this while the other ranks wait; then they open the cache rank
    0 uses (their own ``--cache`` when given), which must be on their file system too, without
    the subject model, and every rank checks that their caches' manifests are the same."""
    cfg.check()
    device = distributed.rank_device(pick_device(cfg.device))
    subject = subject or get_subject(cfg.model, cfg.seq_len)
    cfg = resolved(cfg, subject)
    torch.manual_seed(cfg.seed)
    model = cache = manifest = eval_data = eval_seqs = None
    if distributed.is_main():
        model, cache, manifest, eval_data, eval_seqs = _open_data(cfg, subject, device)
    cache = Path(distributed.share(None if cache is None else str(cache)))
    if not distributed.is_main():
        cache = cfg.cache or cache
        if not cache.exists():
            raise UserError(
                f"{distributed.current().name}: the activation cache {cache} is not on this "
                "machine; every machine of the job must see the same cache (a shared file "
                "system, or a copy at the same path, or --cache)"
            )
        manifest = open_cache(cache, cfg.site)
    distributed.check_agree(
        {"the activation cache (manifest digest)": distributed.digest(manifest)}
    )
    mean, mean_sq_norm = site_stats(manifest, cfg.site)
    if not (torch.isfinite(mean).all() and math.isfinite(mean_sq_norm) and mean_sq_norm > 0):
        raise UserError(
            f"{cache}: the activations of {cfg.site} are NaN, inf or all zero (mean squared "
            f"norm {mean_sq_norm:.4g}, finite mean: {bool(torch.isfinite(mean).all())}); "
            "rebuild the cache"
        )
    return RunData(
        replace(cfg, cache=cache), subject, model, device, cache, manifest, eval_data, eval_seqs
    )


def _open_data(
    cfg: RunConfig, subject: Subject, device: str
) -> tuple[torch.nn.Module, Path, dict, EvalData, torch.Tensor]:
    """``prepare``'s work on rank 0: (subject model, cache directory, its manifest, the
    evaluation data and its token sequences)."""
    if cfg.cache is None:
        settings = cache_settings(
            subject,
            [cfg.site],
            cfg.text,
            cfg.tokens,
            cfg.seq_len,
            cfg.seed,
            text_field=cfg.text_field,
        )
    else:
        if not cfg.cache.exists():
            raise UserError(f"--cache {cfg.cache} does not exist; omit --cache to build one")
        manifest = open_cache(cfg.cache, cfg.site)
        check_cache_model(manifest, cfg.cache, subject, cfg.allow_other_model)
        settings = manifest["settings"]
        if settings.get("text") is not None and "held_out" not in settings and not cfg.eval_text:
            raise UserError(
                f"{cfg.cache} was built from --text {settings['text']} before held-out splits "
                "existed: it holds the documents the evaluation would hold out; rebuild it "
                "(omit --cache) or name evaluation text with --eval-text"
            )
    eval_data = default_eval_data(cfg, settings)
    # made first, so that a held-out split too small to evaluate on fails before any work
    eval_seqs = subject.sequences(
        eval_data.split, cfg.eval_tokens, cfg.seq_len, cfg.seed, eval_data.text,
        eval_data.text_field,
    ).tokens  # fmt: skip
    model = subject.load(device)
    if cfg.cache is None:
        cache = default_cache_dir(settings)
        print(f"activation cache: {cache}")
        manifest = build(subject, model, settings, cache)
    else:
        cache = cfg.cache
    return model, cache, manifest, eval_data, eval_seqs


TARGET_L0_TOLERANCE = 0.1  # relative miss of --target-l0 beyond which the run warns

# the settings --resume may change (their flags): neither changes what is computed; --resume
# refuses to change any other
RESUMABLE = {"device": "--device", "verify": "--no-verify"}


def run_dir(cfg: RunConfig) -> tuple[Path, str]:
    """(run directory, run name): ``cfg.out`` or ``runs/<name>``, name =
    ``<arch>-<model>-<site>-<time>``."""
    name = f"{cfg.arch}-{cfg.model}-{cfg.site}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg.out or Path("runs") / name.replace("/", "_"), name


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse ``out`` when it holds a finished run, or an unfinished one that is not being
    resumed."""
    if (out / "metrics.json").exists():
        raise UserError(f"{out} already holds a finished run; choose another --out")
    if not resume and (out / "train_state.pt").exists():
        raise UserError(f"{out} holds an unfinished run; continue it with --resume {out}")


def resume_config(folder: Path, given: dict | None = None) -> RunConfig:
    """The config of the unfinished run in ``folder``. ``given`` are settings named on the
    command line beside ``--resume``: those of ``RESUMABLE`` are applied, any other must equal
    the saved value (a UserError otherwise: the run continues as it started)."""
    if not (folder / "train_state.pt").exists():
        raise UserError(f"{folder} has no train_state.pt to resume from")
    cfg = replace(RunConfig.load(folder / "config.json"), out=folder)
    given = given or {}
    differ = [k for k, v in given.items() if k not in RESUMABLE and not _same(v, getattr(cfg, k))]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')} {given[k]} (saved: {getattr(cfg, k)})"
                          for k in differ)  # fmt: skip
        allowed = ", ".join(RESUMABLE.values())
        raise UserError(
            f"--resume {folder} continues the run with its saved settings, and {flags} would "
            f"change them; only {allowed} may change on resume"
        )
    return replace(cfg, **{k: v for k, v in given.items() if k in RESUMABLE})


def _same(a: object, b: object) -> bool:
    """Equal settings; paths are equal when they name the same file."""
    if isinstance(a, Path) and isinstance(b, Path):
        return a.resolve() == b.resolve()
    return a == b


def run(cfg: RunConfig, resume: bool = False) -> dict:
    """Train, evaluate and save one SAE; returns its ``metrics.json`` dict. With ``resume``,
    continue the unfinished run in ``cfg.out`` (see ``resume_config``).

    The run directory is locked (``exclusive_lock``) from the start to the end. A run that
    fails before its first checkpoint (``train_state.pt``) leaves nothing behind; a later
    failure keeps what ``--resume`` needs. ``metrics.json``, written last, marks a finished run.
    """
    cfg.check()
    with distributed.started(pick_device(cfg.device)):
        if cfg.shard_latents and distributed.world_size() < 2:
            raise UserError(
                "--shard-latents splits the latents over the ranks of a torchrun job: run it "
                "under torchrun with more than one process (torchrun --nproc-per-node N -m "
                "flashsae.train ...)"
            )
        check_ranks([cfg])
        if not distributed.is_main():
            return follow([cfg])
        subject = get_subject(cfg.model, cfg.seq_len)
        out, name = run_dir(resolved(cfg, subject))
        check_run_dir(out, resume)
        existed = out.exists()
        try:
            with exclusive_lock(out, "a training run"):
                check_run_dir(out, resume)  # again: another run may have finished meanwhile
                with removed_on_failure(out, keep=lambda: (out / "train_state.pt").exists()):
                    return _train(prepare(cfg, subject), out, name)
        finally:
            if not existed:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only when empty: a run that failed before its first step


def check_ranks(cfgs: list[RunConfig]) -> None:
    """Under torchrun: refuse (on every rank) settings, code or torch that differ between the
    ranks, and a batch size that the ranks cannot share evenly."""
    if distributed.current() is None:
        return
    items: dict[str, object] = {
        "flashsae's source code (digest)": distributed.code_digest(),
        "the torch version": torch.__version__,
    }
    for i, cfg in enumerate(cfgs):
        flags = {f"--{k.replace('_', '-')}": v for k, v in json.loads(cfg.to_json()).items()}
        flags.pop("--cache")  # the path may differ between machines; the manifests may not
        items["the settings" if len(cfgs) == 1 else f"the settings of sweep member {i}"] = flags
    distributed.check_agree(items)
    world = distributed.world_size()
    if cfgs[0].batch_size % world and not cfgs[0].shard_latents:
        raise UserError(
            f"--batch-size {cfgs[0].batch_size} (the global batch) does not divide among "
            f"{world} ranks; choose a multiple of {world}"
        )


def follow(cfgs: list[RunConfig]) -> dict | list[dict]:
    """The work of a rank other than 0 in a run or sweep of ``cfgs``: train the members rank 0
    trains (from its start state, on this rank's share of each batch), write and log nothing;
    what rank 0 returns (the metrics of the run, or the list of the sweep's), once it has
    evaluated and saved."""
    data = prepare(cfgs[0])
    members = []
    todo = distributed.share(None)  # the members rank 0 trains
    out = Path(distributed.share(None)) if data.cfg.shard_latents else None  # the run directory
    for i in todo:
        cfg = resolved(cfgs[i], data.subject)
        state = None if out is None else out / state_name()
        sae = member_sae(data, cfg)
        members.append(SAETraining(sae, train_config(cfg, data.device), NullLogger(), state))
    if members:
        train_many(members, loader_of(data))
    for m in members:
        if isinstance(m.sae, ShardedSAE):
            gather_sae(m.sae)  # to rank 0
    return distributed.share(None)


def state_name() -> str:
    """The file name of this rank's training state: ``train_state.pt`` on rank 0 (and in one
    process), ``train_state.rank{r}.pt`` on rank r of a ``--shard-latents`` run."""
    r = distributed.rank()
    return "train_state.pt" if r == 0 else f"train_state.rank{r}.pt"


def member_sae(data: RunData, cfg: RunConfig) -> SAE | ShardedSAE:
    """A fresh SAE of ``cfg`` for ``data`` (torch's RNG seeded with ``cfg.seed`` first, so its
    weights depend on nothing else); with ``--shard-latents`` this rank's shard of it (the whole
    SAE drawn on the CPU: the initial weights of a one-process run)."""
    torch.manual_seed(cfg.seed)
    if not cfg.shard_latents:
        return data.new_sae(cfg)
    world = distributed.world_size()
    if cfg.n_latents % world:
        raise UserError(
            f"--shard-latents: --n-latents {cfg.n_latents} does not divide among {world} "
            f"ranks; choose a multiple of {world}"
        )
    sae = replace(data, device="cpu").new_sae(cfg)
    return ShardedSAE.from_sae(sae, distributed.current().group).to(data.device)


@contextlib.contextmanager
def removed_on_failure(out: Path, keep: Callable[[], bool]) -> Iterator[None]:
    """When the block raises, remove the files and folders it created in ``out`` unless
    ``keep()`` (e.g. a checkpoint exists that ``--resume`` needs), then re-raise."""
    before = {p.name for p in out.iterdir()}
    try:
        yield
    except BaseException:
        if not keep():
            for path in out.iterdir():
                if path.name not in before:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise


def _train(data: RunData, out: Path, name: str) -> dict:
    """``run``'s work in the locked run directory ``out``."""
    distributed.share([0])  # the members to train: the run's one
    if data.cfg.shard_latents:
        distributed.share(str(out))
    member = start_member(data, data.cfg, out, name)
    try:
        summary = train_many([member], loader_of(data))[0]
        if isinstance(member.sae, ShardedSAE):
            member.sae = gather_sae(member.sae).to(data.device)
    except BaseException:
        member.logger.abort()
        raise
    return distributed.share(finish_member(data, member, summary))


def loader_of(data: RunData) -> ActivationLoader:
    """The training batches of ``data`` (seeded by its ``seed``, of its ``batch_size``); under
    torchrun, this rank's share of them (``batch_size`` / N rows, disjoint from the others'),
    or with ``--shard-latents`` the whole batches on every rank."""
    cfg = data.cfg
    ranks = 1 if cfg.shard_latents else distributed.world_size()
    rank = 0 if cfg.shard_latents else distributed.rank()
    return ActivationLoader(
        data.cache, cfg.site, cfg.batch_size // ranks, seed=cfg.seed, device=data.device,
        verify=cfg.verify, rank=rank, world_size=ranks,
    )  # fmt: skip


def start_member(
    data: RunData, cfg: RunConfig, out: Path, name: str, group: str | None = None
) -> SAETraining:
    """A fresh SAE of ``cfg`` for ``data`` (``member_sae``), its ``config.json`` in ``out`` and
    its logger (W&B run ``name`` in ``group``): the loop state that training (or resuming from
    ``out/train_state.pt``) steps."""
    cfg = replace(cfg, out=out)
    sae = member_sae(data, cfg)
    write_output(out / "config.json", cfg.to_json())
    logger = RunLogger(out, json.loads(cfg.to_json()), name, group=group)
    try:
        train_cfg = train_config(cfg, data.device)
        return SAETraining(sae, train_cfg, logger, out / "train_state.pt")
    except BaseException:
        logger.abort()
        raise


def finish_member(data: RunData, member: SAETraining, summary: dict) -> dict:
    """Evaluate the trained SAE of ``member`` and write ``sae.safetensors``, ``cfg.json``,
    ``density.png`` and, last, ``metrics.json`` to its run directory; log them; the metrics."""
    sae, logger, train_cfg = member.sae, member.logger, member.cfg
    out = member.state_path.parent
    try:
        sae.eval()
        results, freqs = data.evaluate(sae)
        warnings = metric_warnings(results) + target_l0_warnings(results, summary)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        metrics = {k: results[k] for k in METRIC_KEYS} | summary | {"warnings": warnings}
        metrics["eval_data"] = results.pop("eval_data")
        save_sae(sae, out, train_cfg.dtype)
        density_histogram(freqs, out / "density.png")
        write_output(out / "metrics.json", json.dumps(metrics, indent=2))
    except BaseException:
        logger.abort()
        raise
    step = summary["tokens"]
    logger.log({f"metrics/{k}": v for k, v in results.items()}, step=step)
    logger.log_histogram("sparsity/log10_firing_freq", freqs.clamp_min(1e-10).log10().numpy(), step)
    logger.summary(metrics)
    files = [out / "sae.safetensors", out / "cfg.json", out / "metrics.json"]
    logger.log_artifact(f"sae-{sae.cfg.arch}", files)
    logger.finish()
    print(json.dumps(metrics, indent=2))
    print(f"run saved to {out}")
    return metrics


def target_l0_warnings(results: dict, summary: dict) -> list[str]:
    """A warning when a run with ``--target-l0`` ends with a held-out L0 more than
    ``TARGET_L0_TOLERANCE`` from its target."""
    target = summary.get("target_l0")
    if target is None or abs(results["l0"] / target - 1) <= TARGET_L0_TOLERANCE:
        return []
    return [
        f"--target-l0 {target:g} missed: held-out L0 {results['l0']:.3g} with λ ending at "
        f"{summary['sparsity_coeff']:.3g}; more steps (tokens / batch size) get closer, and "
        "some targets are out of an architecture's reach (jumprelu_step's L0 can stay below "
        "N even at λ = 0)"
    ]


def train_config(cfg: RunConfig, device: str) -> TrainConfig:
    """The trainer's settings for ``cfg`` on ``device`` (``dtype`` auto resolved)."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    return TrainConfig(
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        dead_window=cfg.dead_window,
        checkpoint_every=cfg.checkpoint_every,
        dtype=dtype,
        target_l0=cfg.target_l0,
    )
