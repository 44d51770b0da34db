"""``python -m flashsae.train``: capture activations, train an SAE, evaluate it, log to W&B.

The flags are ``RunConfig``'s fields (``flashsae.train.config``); the work is
``flashsae.train.run`` (``pipeline.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flashsae.cache.errors import report_errors

from .config import add_arguments, from_namespace
from .pipeline import resume_config, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flashsae.train",
        description="Capture activations, train a sparse autoencoder, evaluate it, log to W&B.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    p.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="continue the unfinished run in DIR with its saved config.json (other flags ignored)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume is not None:
        return report_errors(lambda: run(resume_config(args.resume), resume=True))
    return report_errors(lambda: run(from_namespace(args)))


if __name__ == "__main__":
    sys.exit(main())
