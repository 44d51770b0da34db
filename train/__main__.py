"""``python -m flashsae.train``: capture activations, train an SAE, evaluate it, log to W&B.

The flags are ``RunConfig``'s fields (``flashsae.train.config``); the work is
``flashsae.train.run`` (``pipeline.py``). Comma lists on the flags of ``sweep.SWEEPABLE``
settings (``--arch topk,batchtopk --k 16,32``) or ``--sweep FILE.toml`` train a sweep of SAEs
from one pass over the data instead (``sweep.run_sweep``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from flashsae.cache.errors import UserError, report_errors

from .config import RunConfig, add_arguments, from_namespace
from .pipeline import RESUMABLE, resume_config, run
from .sweep import SWEEPABLE, grid, is_sweep, read_sweep_file, resume_sweep, run_sweep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flashsae.train",
        description="Capture activations, train a sparse autoencoder, evaluate it, log to W&B.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p, lists=SWEEPABLE)
    p.add_argument(
        "--sweep",
        type=Path,
        default=None,
        help="train the SAEs of this TOML file from one pass over the data (flags given beside "
        "it apply to every member; see flashsae.train.sweep)",
    )
    allowed = ", ".join(RESUMABLE.values())
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help=f"continue the unfinished run (or every member of the sweep) in DIR with its saved "
        f"config.json; {allowed} may change, other flags must repeat the saved values",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def given_settings(argv: list[str] | None = None) -> dict[str, object]:
    """The RunConfig settings named on the command line ``argv``, with their values."""
    unset = object()
    # argparse fills in a default only where the namespace lacks the attribute
    given = argparse.Namespace(**{f.name: unset for f in fields(RunConfig)})
    _parser().parse_args(argv, namespace=given)
    skip = ("resume", "sweep")
    return {k: v for k, v in vars(given).items() if k not in skip and v is not unset}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    axes = {k: v for k, v in vars(args).items() if isinstance(v, list)}
    if args.resume is not None:
        folder, given = args.resume, given_settings(argv)
        if args.sweep is not None or axes:
            return report_errors(_refuse("--resume continues a run or sweep as saved; drop "
                                         "--sweep and the comma lists"))  # fmt: skip
        if is_sweep(folder):
            return report_errors(lambda: run_sweep(resume_sweep(folder, given), resume=True))
        return report_errors(lambda: run(resume_config(folder, given), resume=True))
    if args.sweep is not None:
        return report_errors(lambda: run_sweep(read_sweep_file(args.sweep, given_settings(argv))))
    if axes:
        base = from_namespace(
            argparse.Namespace(**(vars(args) | {k: v[0] for k, v in axes.items()}))
        )
        return report_errors(lambda: run_sweep(grid(base, axes)))
    return report_errors(lambda: run(from_namespace(args)))


def _refuse(message: str):  # noqa: ANN202 - a callable for report_errors
    def fail() -> None:
        raise UserError(message)

    return fail


if __name__ == "__main__":
    sys.exit(main())
