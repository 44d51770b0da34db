"""``python -m flashsae.train``: capture activations, train an SAE, evaluate it, log to W&B.

The flags are ``RunConfig``'s fields (``flashsae.train.config``); the work is
``flashsae.train.run`` (``pipeline.py``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from flashsae.cache.errors import report_errors

from .config import RunConfig, add_arguments, from_namespace
from .pipeline import RESUMABLE, resume_config, run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flashsae.train",
        description="Capture activations, train a sparse autoencoder, evaluate it, log to W&B.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    allowed = ", ".join(RESUMABLE.values())
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help=f"continue the unfinished run in DIR with its saved config.json; {allowed} may "
        "change, other flags must repeat the saved values",
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
    return {k: v for k, v in vars(given).items() if k != "resume" and v is not unset}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume is not None:
        folder = args.resume
        return report_errors(lambda: run(resume_config(folder, given_settings(argv)), resume=True))
    return report_errors(lambda: run(from_namespace(args)))


if __name__ == "__main__":
    sys.exit(main())
