"""Shuffled, prefetched batches of cached activations.

Each epoch visits the shards in a seeded random order, ``buffer_shards`` at a
time; the rows of a buffer are shuffled together and dealt out to ranks
(rank r takes rows r, r + world_size, ...), so the ranks of one epoch read
disjoint rows that together cover every row once. Shards are memory-mapped and
each batch is gathered straight from the maps (into pinned memory when the
target is a GPU), so a row is copied once on its way to the device. A
background thread loads the next batches while the trainer works.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import UserError
from .shards import DTYPES, load_shard, open_cache


def _gather(
    sources: list[torch.Tensor], starts: list[int], picks: torch.Tensor, pin: bool
) -> torch.Tensor:
    """Rows ``picks`` of ``torch.cat(sources)`` (``starts``: where each source begins), in
    ascending order, copied from each source without concatenating them."""
    picks = picks.sort().values
    cuts = torch.searchsorted(picks, torch.tensor(starts)).tolist()
    out = torch.empty(len(picks), sources[0].shape[1], dtype=sources[0].dtype, pin_memory=pin)
    for src, start, lo, hi in zip(sources, starts, cuts, cuts[1:], strict=False):
        if hi > lo:
            torch.index_select(src, 0, picks[lo:hi] - start, out=out[lo:hi])
    return out


class ActivationLoader:
    """Iterate ``[batch_size, d]`` batches of ``site`` from the cache in ``folder``, forever.

    With ``verify`` (the default) each shard is checked the first time it is mapped: its
    sha256 against the manifest and every value of ``site`` finite, a UserError naming the
    shard otherwise. That reads each shard once more in the first epoch, in the prefetch
    thread of ``batches`` (measured in bench/cache_bench.py, "read" rows); ``verify=False``
    skips it.
    """

    def __init__(
        self,
        folder: Path,
        site: str,
        batch_size: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        buffer_shards: int = 4,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.manifest = open_cache(self.folder, site)
        self.site = site
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self.buffer_shards = buffer_shards
        self.rank, self.world_size = rank, world_size
        self.verify = verify
        self.verified: set[int] = set()  # shards checked already

    def _load(self, j: int) -> torch.Tensor:
        """Shard ``j``'s rows of the site, memory-mapped; checked on first use if ``verify``."""
        check = self.verify and j not in self.verified
        x = load_shard(self.folder, self.manifest["shards"][j], self.site, verify=check)
        if check:
            self.verified.add(j)
        return x

    @property
    def rows(self) -> int:
        return self.manifest["total_rows"]

    def _shard_order(self, epoch: int) -> tuple[list[int], torch.Generator]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.manifest["shards"]), generator=gen).tolist(), gen

    def batches_per_epoch(self, epoch: int) -> int:
        """How many batches ``epoch_batches(epoch)`` yields, from the manifest alone."""
        order, _ = self._shard_order(epoch)
        shards = self.manifest["shards"]
        total = carry = 0
        for i in range(0, len(order), self.buffer_shards):
            rows = sum(shards[j]["rows"] for j in order[i : i + self.buffer_shards])
            rows = carry + len(range(self.rank, rows, self.world_size))
            total, carry = total + rows // self.batch_size, rows % self.batch_size
        return total

    def epoch_batches(self, epoch: int, pin: bool = False) -> Iterator[torch.Tensor]:
        """The batches of one epoch, on the CPU (in pinned memory if ``pin``); rows left
        over from one buffer start the next, and the last partial batch is dropped.

        A buffer's rows are gathered straight from the memory-mapped shards, so each row
        is copied once, into its batch.
        """
        order, gen = self._shard_order(epoch)
        settings = self.manifest["settings"]
        carry = torch.empty(0, settings["d"], dtype=DTYPES[settings["dtype"]])
        for i in range(0, len(order), self.buffer_shards):
            sources = [carry] + [self._load(j) for j in order[i : i + self.buffer_shards]]
            starts = [0, *itertools.accumulate(len(x) for x in sources)]
            n_new = starts[-1] - len(carry)
            picks = torch.randperm(n_new, generator=gen)[self.rank :: self.world_size]
            picks = torch.cat([torch.arange(len(carry)), len(carry) + picks])
            full = len(picks) // self.batch_size * self.batch_size
            for b in range(0, full, self.batch_size):
                yield _gather(sources, starts, picks[b : b + self.batch_size], pin)
            carry = _gather(sources, starts, picks[full:], pin=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches()

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches on ``device``, epoch after epoch, from the ``start``-th on (to resume),
        loaded ahead by a background thread."""
        epoch, per_epoch = 0, self.batches_per_epoch(0)
        if per_epoch == 0:
            raise UserError(f"{self.folder} holds fewer rows than one batch of {self.batch_size}")
        pin = self.device.type == "cuda"
        q: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()
        while start >= per_epoch:
            start -= per_epoch
            epoch += 1
            per_epoch = self.batches_per_epoch(epoch)

        def produce(epoch: int, skip: int) -> None:
            try:
                while not stop.is_set():
                    for batch in itertools.islice(self.epoch_batches(epoch, pin), skip, None):
                        while not stop.is_set():
                            try:
                                q.put(batch, timeout=0.1)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                    epoch, skip = epoch + 1, 0
            except Exception as e:  # handed to the consumer, raised there
                q.put(e)

        thread = threading.Thread(target=produce, args=(epoch, start), daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, Exception):
                    raise item
                yield item.to(self.device, non_blocking=True)
        finally:
            stop.set()
