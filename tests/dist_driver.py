"""``python -m flashsae.train`` for one rank of a torchrun job, with a fault injected (used by
tests/test_distributed.py)::

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_driver.py \
        [--kill-at STEP] [--stop-at STEP] :: TRAIN_FLAGS [:: RANK1_FLAGS]

``--kill-at``: rank 1 sends itself SIGKILL before training step STEP. ``--stop-at``: every rank
raises KeyboardInterrupt (Ctrl-C) before step STEP. RANK1_FLAGS: added on rank 1 only.
"""

import argparse
import os
import signal
import sys

from flashsae.train import trainer
from flashsae.train.__main__ import main


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    cut = argv.index("::")
    p = argparse.ArgumentParser()
    p.add_argument("--kill-at", type=int)
    p.add_argument("--stop-at", type=int)
    flags = argv[cut + 1 :]
    extra = flags.index("::") if "::" in flags else len(flags)
    return p.parse_args(argv[:cut]), flags[:extra], flags[extra + 1 :]


def _faulty(step_fn, kill_at: int | None, stop_at: int | None, rank: int):  # noqa: ANN202
    def step(self, batch, step):  # noqa: ANN001, ANN202
        if step == kill_at and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == stop_at:
            raise KeyboardInterrupt
        return step_fn(self, batch, step)

    return step


if __name__ == "__main__":
    args, flags, rank1 = _parse(sys.argv[1:])
    rank = int(os.environ["RANK"])
    trainer.SAETraining.step = _faulty(trainer.SAETraining.step, args.kill_at, args.stop_at, rank)
    sys.exit(main(flags + (rank1 if rank == 1 else [])))
