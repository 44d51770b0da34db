"""Sharded safetensors activation caches: an atomic, resumable writer and a checked reader.

A cache is a directory holding ``manifest.json`` and ``shard-00000.safetensors``, ...
Each shard holds one ``[rows, d]`` tensor per site (keyed by the site name) and, per
row, the token id (``tokens``), the document index (``doc``), the position in its
sequence (``pos``) and the sequence index (``seq``), all int32. A shard is streamed
to a temporary name, fsynced and renamed (``shard_file.py``), and only then added to
the manifest (itself replaced atomically), so a crash loses at most the shard in
flight and a rerun resumes from the manifest's ``cursor``. Manifests are checked on
reading (fields, types, shard names that are plain names inside the cache).

The manifest's ``stats`` hold running sums over the listed shards (row count,
per-dimension sum, sum of squared norms, float64), so the mean and the mean
squared norm are exact for whatever is complete on disk.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import torch

from flashsae.kernels.capture_kernels import row_stats

from .errors import UserError
from .shard_file import file_sha256, map_shard, write_atomic, write_shard

FORMAT_VERSION = 1
META = ("tokens", "doc", "pos", "seq")  # int32 per-row columns stored beside the activations
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def plain_name(name: object) -> bool:
    """Whether ``name`` is a plain file name in its directory: no separator, not ``.``/``..``."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _check_manifest(path: Path, manifest: object) -> dict:
    """``manifest`` if it has the manifest's fields and types; a UserError naming the first
    that is wrong otherwise. Shard file names must be plain names inside the cache."""

    def bad(why: str) -> UserError:
        return UserError(f"{path} is not a valid cache manifest ({why}); rebuild the cache")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has format version {manifest.get('format_version')!r}; "
            f"this flashsae reads version {FORMAT_VERSION}"
        )
    fields = {
        "settings": dict,
        "complete": bool,
        "total_rows": int,
        "cursor": list,
        "shards": list,
        "stats": dict,
    }
    for name, kind in fields.items():
        if not isinstance(manifest.get(name), kind):
            raise bad(f"no {kind.__name__} {name!r}")
    for i, entry in enumerate(manifest["shards"]):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("rows"), int)
            and isinstance(entry.get("sha256"), str)
        ):
            raise bad(f"shard entry {i} lacks file, rows or sha256")
        if not plain_name(entry.get("file")):
            raise bad(f"shard entry {i} names {entry.get('file')!r}, not a file in the cache")
    return manifest


def read_manifest(folder: Path) -> dict:
    """The manifest of the cache in ``folder``; a UserError if missing, malformed or too new."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise UserError(f"{folder} is not an activation cache (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild the cache") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    return _check_manifest(path, manifest)


class ShardWriter:
    """Buffers captured rows and writes fixed-size shards; resumes an unfinished cache.

    ``settings`` describe what the cache is (model, sites, d, dtype, data, ...). An
    existing manifest with different settings is an error, never overwritten. Shards
    are written by a background thread (at most ``queue_size`` waiting), so capturing
    overlaps writing; an error there is raised by the next ``add`` or ``finish``.
    """

    def __init__(
        self, folder: Path, settings: dict, rows_per_shard: int, queue_size: int = 2
    ) -> None:
        self.folder = Path(folder)
        self.sites: list[str] = list(settings["sites"])
        self.d: int = settings["d"]
        self.dtype_name: str = settings["dtype"]
        self.dtype = DTYPES[self.dtype_name]
        self.rows_per_shard = rows_per_shard
        self._start_shard()
        settings = {**settings, "rows_per_shard": rows_per_shard}
        if (self.folder / "manifest.json").exists():
            self.manifest = read_manifest(self.folder)
            if self.manifest["settings"] != settings:
                raise UserError(
                    f"{self.folder} holds a cache built with different settings; "
                    "choose another --out or delete it"
                )
        else:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create cache directory {self.folder}: {e.strerror}") from e
            stats = {s: {"count": 0, "sum": [0.0] * self.d, "sum_sq_norm": 0.0} for s in self.sites}
            self.manifest = {
                "format_version": FORMAT_VERSION,
                "settings": settings,
                "complete": False,
                "total_rows": 0,
                "cursor": [0, 0],
                "shards": [],
                "stats": stats,
            }  # saved with the first shard: a build failing before it leaves no cache
        self.n_shards = len(self.manifest["shards"])  # including those queued for writing
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None  # started by the first shard

    @property
    def rows_done(self) -> int:
        """Rows in complete shards on disk."""
        return self.manifest["total_rows"]

    @property
    def cursor(self) -> tuple[int, int]:
        """(sequence s, rows of s already on disk): where the next shard's rows start."""
        seq, written = self.manifest["cursor"]
        return seq, written

    @property
    def complete(self) -> bool:
        return self.manifest["complete"]

    @property
    def room(self) -> int:
        """Rows that fit before the current shard is full."""
        return self.rows_per_shard - self.buffered

    def add(
        self,
        acts: dict[str, torch.Tensor],
        meta: dict[str, torch.Tensor],
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """Append rows: ``acts[site]`` ``[rows, d]``, ``meta[name]`` ``[rows]`` for each META.

        ``stats[site]`` may give ``row_stats`` of the rows before any cast (as the capture
        kernel computes them) when they fit in ``room``; otherwise they are computed here.
        Rows already on the CPU in the storage dtype are kept, not copied, until their shard
        is on disk: do not modify them after handing them in. Rows that are not finite after
        the cast to the storage dtype (float16 overflows past 65504) are a UserError.
        """
        n = len(meta["seq"])
        start = 0
        while start < n:
            take = min(self.room, n - start)
            part = slice(start, start + take)
            for site in self.sites:
                rows = acts[site][part]
                total, sq = stats[site] if stats is not None and take == n else row_stats(rows)
                self.pending[site] = (
                    self.pending[site][0] + total.cpu(),
                    self.pending[site][1] + sq.cpu(),
                )
                cast = rows.to("cpu", self.dtype)
                if not all_finite(cast):  # NaN in, or beyond float16's range
                    raise UserError(
                        f"non-finite activations (NaN/inf) at {site} after the cast to "
                        f"{self.dtype_name}; check the model, or use --dtype float32"
                    )
                self.buffer[site].append(cast)
            for name in META:
                self.buffer[name].append(meta[name][part].to("cpu", torch.int32))
            self.buffered += take
            start += take
            if self.buffered == self.rows_per_shard:
                self._flush()

    def finish(self) -> dict:
        """Write the last partial shard, wait for the writer, mark the cache complete."""
        if self.buffered:
            self._flush()
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self._raise_writer_error()
        self.manifest["complete"] = True
        self._save_manifest()
        return self.manifest

    def replace_shard(self, i: int, parts: dict[str, list[torch.Tensor]]) -> None:
        """Rewrite listed shard ``i`` from ``parts`` (``{name: [tensors]}`` for every site and
        META; rows in the storage dtype), to repair it in place; the statistics stay those of
        the first write. Only before the first ``add``."""
        assert self.thread is None, "replace_shard runs before any shard is queued"
        entry = self.manifest["shards"][i]
        if sum(len(p) for p in parts["seq"]) != entry["rows"]:
            raise UserError(f"rebuilt {entry['file']} does not hold {entry['rows']} rows")
        entry["sha256"] = write_shard(self.folder / entry["file"], parts)
        self._save_manifest()

    def _flush(self) -> None:
        self._raise_writer_error()
        if self.thread is None:
            self.thread = threading.Thread(target=self._write_loop, daemon=True)
            self.thread.start()
        self.queue.put((shard_name(self.n_shards), self.buffer, self.pending))
        self.n_shards += 1
        self._start_shard()

    def _start_shard(self) -> None:
        """Empty the buffer: its rows, and the statistics of those rows per site."""
        self.buffer: dict[str, list[torch.Tensor]] = {k: [] for k in [*self.sites, *META]}
        self.buffered = 0
        self.pending = {site: row_stats(torch.zeros(0, self.d)) for site in self.sites}

    def _raise_writer_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _write_loop(self) -> None:
        """Background thread: write queued shards in order, then update the manifest."""
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write_shard(*item)
                except BaseException as e:  # handed to the capturing thread
                    self.error = e
            self.queue.task_done()

    def _write_shard(self, name: str, parts: dict, pending: dict) -> None:
        sha256 = write_shard(self.folder / name, parts)
        seqs = torch.cat(parts["seq"])
        rows = len(seqs)
        for site, (total, sq) in pending.items():
            stats = self.manifest["stats"][site]
            stats["count"] += rows
            stats["sum"] = (torch.tensor(stats["sum"], dtype=torch.float64) + total).tolist()
            stats["sum_sq_norm"] += sq.item()
        last = seqs[-1].item()
        seq, written = self.manifest["cursor"]
        written = (written if seq == last else 0) + (seqs == last).sum().item()
        self.manifest["cursor"] = [last, written]
        entry = {"file": name, "rows": rows, "sha256": sha256}
        self.manifest["shards"].append(entry)
        self.manifest["total_rows"] += rows
        self._save_manifest()

    def _save_manifest(self) -> None:
        write_atomic(self.folder / "manifest.json", [json.dumps(self.manifest, indent=1).encode()])


def site_stats(manifest: dict, site: str) -> tuple[torch.Tensor, float]:
    """(per-dimension mean, mean squared norm) of ``site`` over the whole cache."""
    stats = manifest["stats"][site]
    count = max(stats["count"], 1)
    return torch.tensor(stats["sum"], dtype=torch.float64) / count, stats["sum_sq_norm"] / count


def open_cache(folder: Path, site: str | None = None) -> dict:
    """Read and check a finished cache's manifest; ``site`` must be one of its sites."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest["complete"]:
        raise UserError(f"{folder} is an unfinished cache; rerun the build to resume it")
    sites = manifest["settings"]["sites"]
    if site is not None and site not in sites:
        raise UserError(f"{folder} has no site {site!r}; it holds {', '.join(sites)}")
    return manifest


def all_finite(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is finite, from its max and min (NaN propagates through
    both, +inf shows in the max, -inf in the min): faster than ``isfinite(x).all()``."""
    return not x.numel() or bool(torch.isfinite(x.amax()) and torch.isfinite(x.amin()))


def _nonfinite(path: Path, site: str, x: torch.Tensor) -> UserError | None:
    """A UserError naming the shard and row if ``x`` holds a NaN or inf."""
    if all_finite(x):
        return None
    for start in range(0, len(x), 8192):
        block = x[start : start + 8192]
        if not torch.isfinite(block).all():
            row = start + int((~torch.isfinite(block)).any(1).nonzero()[0, 0])
            return UserError(
                f"{path} holds non-finite values (NaN/inf) at {site}, row {row}; "
                "rebuild the cache (in float32 or bfloat16 if float16 overflowed)"
            )
    return None


def damaged_shards(folder: Path, manifest: dict, verify: bool = False) -> dict[int, str]:
    """``{index: reason}`` for each listed shard that fails ``check_shard``."""
    bad = {}
    for i, entry in enumerate(manifest["shards"]):
        try:
            check_shard(folder, entry, manifest["settings"]["sites"], verify)
        except UserError as e:
            bad[i] = str(e)
    return bad


def load_shard(folder: Path, entry: dict, site: str, verify: bool = False) -> torch.Tensor:
    """One shard's ``[rows, d]`` activations for ``site``, memory-mapped (rows are read when
    used); checks the file's layout and row count, and if ``verify`` its checksum and that
    every value of ``site`` is finite (a UserError naming the shard otherwise)."""
    return check_shard(folder, entry, [site], verify)[site]


def check_shard(
    folder: Path, entry: dict, sites: list[str], verify: bool = False
) -> dict[str, torch.Tensor]:
    """The memory-mapped ``[rows, d]`` activations of each of ``sites`` in one shard.

    A UserError naming the shard unless it is on disk with the layout and row count of
    ``entry`` for every site (a size check: the header is checked against the file size);
    with ``verify`` also unless its sha256 matches and every value of ``sites`` is finite.
    """
    path = Path(folder) / entry["file"]
    if verify:
        try:
            corrupt = file_sha256(path) != entry["sha256"]
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}; rebuild the cache") from e
        if corrupt:
            raise UserError(f"{path} is corrupt (checksum mismatch); rebuild the cache")
    tensors = map_shard(path)
    out = {}
    for site in sites:
        x = tensors.get(site)
        if x is None or x.shape[0] != entry["rows"]:
            raise UserError(f"{path} lacks {entry['rows']} rows of {site}; rebuild the cache")
        if verify and (error := _nonfinite(path, site, x)) is not None:
            raise error
        out[site] = x
    return out
