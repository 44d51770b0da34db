"""``RunConfig``: every setting of a training run, in one place.

The command line (``python -m flashsae.train --help``) is generated from the fields, the run
directory's ``config.json`` is the dataclass as JSON, and ``--resume`` rebuilds it from there.
"""

import argparse
import json
import math
import types
import typing
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path

from flashsae.cache.errors import UserError

from .sae import SAE_CLASSES
from .sharded import SHARDED_CLASSES

DTYPES = ("auto", "bf16", "fp32")


def lambda_archs() -> list[str]:
    """The architectures with a λ (a sparsity penalty), which ``--target-l0`` can steer."""
    return [name for name, cls in SAE_CLASSES.items() if cls.default_sparsity_coeff is not None]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class RunConfig:
    """One SAE training run: subject model and site, data, SAE, optimisation, outputs."""

    model: str = field(
        default="bytelm",
        metadata=_help("bytelm, bytelm-tiny, or a Hugging Face model id or path (extra hf)"),
    )
    site: str | None = field(
        default=None, metadata=_help("e.g. blocks.1.hook_resid_post (default: middle layer)")
    )
    arch: str = field(default="topk", metadata=_help("SAE architecture"))
    n_latents: int | None = field(
        default=None, metadata=_help("dictionary size (default 16 x d_model)")
    )
    k: int = field(default=32, metadata=_help("active latents per token (TopK family)"))
    tokens: int = field(default=2_000_000, metadata=_help("training tokens"))
    batch_size: int = field(default=4096, metadata=_help("tokens per SAE step"))
    lr: float = field(default=1e-3, metadata=_help("Adam learning rate"))
    sparsity_coeff: float = field(
        default=0.0, metadata=_help("λ of the L1/L0 penalty; 0: the arch's default")
    )
    target_l0: float | None = field(
        default=None,
        metadata=_help(
            "L0 to end the run at: λ is adjusted during training (λ architectures; starts from "
            "--sparsity-coeff), the final λ recorded in cfg.json"
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=_help(
            "compute dtype of the SAE step: bf16 (autocast, fp32 master weights and Adam state) "
            "or fp32 (TF32 allowed on GPUs); auto: bf16 on CUDA, fp32 on the CPU"
        ),
    )
    cache: Path | None = field(default=None, metadata=_help("existing activation cache directory"))
    out: Path | None = field(default=None, metadata=_help("run directory (default runs/<name>)"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    seed: int = field(default=0, metadata=_help("seed for data order and SAE init"))
    seq_len: int = field(default=128, metadata=_help("tokens per captured sequence"))
    text: str | None = field(
        default=None, metadata=_help("text file, directory, .jsonl or dataset (default: stdlib)")
    )
    text_field: str = field(default="text", metadata=_help("the text field of .jsonl and datasets"))
    eval_tokens: int = field(default=65536, metadata=_help("held-out tokens to evaluate on"))
    eval_text: str | None = field(
        default=None,
        metadata=_help("evaluation text, all of it (default: the held-out split of --text)"),
    )
    eval_batch_size: int = field(
        default=32,
        metadata=_help(
            "sequences per evaluation batch (after the site the model runs on 3x as many rows: "
            "clean, SAE and zero-ablated)"
        ),
    )
    dead_window: int = field(
        default=10_000_000, metadata=_help("tokens without firing after which a latent is dead")
    )
    checkpoint_every: int = field(
        default=100, metadata=_help("steps between resumable saves (0: only at the end)")
    )
    verify: bool = field(
        default=True,
        metadata=_help(
            "check each cache shard's checksum when the loader first maps it "
            "(--no-verify: skip the check)"
        ),
    )
    shard_latents: bool = field(
        default=False,
        metadata=_help(
            "under torchrun, split the dictionary's latents over the ranks (each rank reads "
            f"every batch; {', '.join(SHARDED_CLASSES)}; not with a sweep)"
        ),
    )
    allow_other_model: bool = field(
        default=False,
        metadata=_help("accept a --cache whose manifest names another model than --model"),
    )

    def check(self) -> None:
        """Raise UserError on settings that cannot run."""
        for name in (
            "tokens", "batch_size", "k", "eval_tokens", "eval_batch_size", "seq_len",
            "dead_window",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise UserError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.arch not in SAE_CLASSES:
            raise UserError(f"unknown --arch {self.arch!r}; known: {', '.join(SAE_CLASSES)}")
        if self.target_l0 is not None:
            if SAE_CLASSES[self.arch].default_sparsity_coeff is None:
                raise UserError(
                    f"--target-l0 steers λ, and --arch {self.arch} has none: its L0 is set by "
                    "--k; use --target-l0 with a λ architecture "
                    f"({', '.join(lambda_archs())})"
                )
            if not (math.isfinite(self.target_l0) and self.target_l0 > 0):
                raise UserError(f"--target-l0 must be a positive number, got {self.target_l0}")
            if self.n_latents is not None and self.target_l0 >= self.n_latents:
                raise UserError(
                    f"--target-l0 {self.target_l0:g} is not below --n-latents {self.n_latents}"
                )
        if self.shard_latents and self.arch not in SHARDED_CLASSES:
            raise UserError(
                f"--shard-latents supports --arch {', '.join(SHARDED_CLASSES)}, not {self.arch!r}"
            )
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.n_latents is not None and self.k > self.n_latents:
            raise UserError(f"--k {self.k} is larger than --n-latents {self.n_latents}")
        if self.tokens < self.batch_size:
            raise UserError(
                f"--tokens {self.tokens} is less than one batch (--batch-size {self.batch_size})"
            )
        if self.seq_len < 2:
            raise UserError("--seq-len must be at least 2 (BOS plus one token)")

    def to_json(self) -> str:
        raw = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        return json.dumps(raw, indent=2)

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        """The config saved as ``path`` (a run's ``config.json``), each value checked against its
        field's type. Files written before ``dtype`` existed were fp32 runs, and resume as such;
        settings added later take their defaults."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise UserError(
                f"{path} does not exist; is {Path(path).parent} a run directory?"
            ) from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e})") from e
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from e
        if not isinstance(raw, dict):
            raise UserError(f"{path} does not hold a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise UserError(f"{path} has settings this version does not know: {unknown}")
        raw.setdefault("dtype", "fp32")
        return replace(cls(), **{k: _parsed(path, known[k], v) for k, v in raw.items()})


def _parsed(path: Path, f: Field, value: object) -> object:
    """``value`` of field ``f`` from a JSON file, as its type (a str becomes a Path for Path
    fields, an int a float for float fields); a UserError when it is of another type."""
    base = _base_type(f.type)
    optional = base is not f.type
    if value is None and optional:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is Path and isinstance(value, str):
        return Path(value)
    if type(value) is not base:
        raise UserError(f"{path}: {f.name} must be {base.__name__}, got {value!r}")
    return value


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(annotation: object) -> type:
    """int for ``int`` and ``int | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation  # type: ignore[return-value]


def _listable(base: type, choices: list[str] | None) -> typing.Callable[[str], object]:
    """An argparse type: one value of ``base``, or a list of them for a comma list."""

    def parse(text: str) -> object:
        values = [base(v) for v in text.split(",")]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {', '.join(choices)}")
        return values if len(values) > 1 else values[0]

    parse.__name__ = base.__name__  # argparse names the type in its errors
    return parse


def add_arguments(parser: argparse.ArgumentParser, lists: typing.Collection[str] = ()) -> None:
    """One ``--flag`` per RunConfig field, with its type, default and help. The fields named in
    ``lists`` also take comma lists (``--k 16,32``), parsed as a list."""
    defaults = RunConfig()
    lam = ", ".join(
        f"{name} {cls.default_sparsity_coeff:g}"
        for name, cls in SAE_CLASSES.items()
        if cls.default_sparsity_coeff is not None
    )
    for f in fields(RunConfig):
        if f.type is bool:  # --name turns a False default on, --no-name a True one off
            off = getattr(defaults, f.name)
            parser.add_argument(
                f"--{'no-' if off else ''}{_flag(f.name)}",
                dest=f.name,
                action="store_false" if off else "store_true",
                help=f.metadata["help"],
            )
            continue
        extra: dict = {}
        help_text = f.metadata["help"]
        if f.name == "arch":
            extra["choices"] = list(SAE_CLASSES)
            help_text += f" ({', '.join(SAE_CLASSES)})"
        if f.name == "dtype":
            extra["choices"] = list(DTYPES)
        if f.name == "sparsity_coeff":
            help_text = f"{help_text} ({lam})"
        kind = _base_type(f.type)
        if f.name in lists:
            kind = _listable(kind, extra.pop("choices", None))
            help_text += "; a comma list trains one SAE per value (a sweep)"
        parser.add_argument(
            f"--{_flag(f.name)}",
            type=kind,
            default=getattr(defaults, f.name),
            help=help_text,
            **extra,
        )


def from_namespace(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed arguments (other attributes of ``args`` are ignored)."""
    return RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
