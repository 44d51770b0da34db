"""The shard writer and loader: atomic shards, exact resume, and clear errors."""

import json

import pytest
import torch

from flashsae.cache.errors import UserError
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.shards import ShardWriter, load_shard, open_cache, site_stats

SETTINGS = {"model": "m", "sites": ["a", "b"], "d": 8, "dtype": "float32"}


def rows(n, seed):
    """n rows of two sites, from sequences of 10 rows each."""
    g = torch.Generator().manual_seed(seed)
    acts = {"a": torch.randn(n, 8, generator=g), "b": torch.randn(n, 8, generator=g)}
    i = torch.arange(n)
    return acts, {"tokens": i % 256, "doc": i // 30, "pos": i % 10 + 1, "seq": i // 10}


def part(meta, lo, hi):
    return {k: v[lo:hi] for k, v in meta.items()}


def read_all(folder, site):
    manifest = open_cache(folder, site)
    return torch.cat([load_shard(folder, e, site, verify=True) for e in manifest["shards"]])


def test_shards_stats_and_resume(tmp_path):
    acts, toks = rows(250, 0)
    whole = ShardWriter(tmp_path / "whole", SETTINGS, rows_per_shard=64)
    for i in range(0, 250, 50):
        whole.add(part(acts, i, i + 50), part(toks, i, i + 50))
    manifest = whole.finish()
    assert [s["rows"] for s in manifest["shards"]] == [64, 64, 64, 58]
    torch.testing.assert_close(read_all(tmp_path / "whole", "a"), acts["a"])
    mean, msn = site_stats(manifest, "b")
    torch.testing.assert_close(mean.float(), acts["b"].mean(0))
    assert abs(msn - acts["b"].square().sum(1).mean().item()) < 1e-4

    # interrupted after 150 rows: only the two complete shards survive
    crashed = ShardWriter(tmp_path / "part", SETTINGS, rows_per_shard=64)
    crashed.add(part(acts, 0, 150), part(toks, 0, 150))
    crashed.queue.join()  # the shards handed to the writer thread are on disk; then it dies
    resumed = ShardWriter(tmp_path / "part", SETTINGS, rows_per_shard=64)
    assert resumed.rows_done == 128 and not resumed.complete
    assert resumed.cursor == (12, 8)  # rows 120..127 of sequence 12 are on disk
    resumed.add(part(acts, 128, 250), part(toks, 128, 250))
    resumed.finish()
    for site in ("a", "b"):
        torch.testing.assert_close(read_all(tmp_path / "part", site), acts[site])
    m2 = json.loads((tmp_path / "part" / "manifest.json").read_text())
    for site in ("a", "b"):  # the same sums, added in other chunks
        torch.testing.assert_close(*(site_stats(m, site)[0] for m in (m2, manifest)))


def test_different_settings_refused(tmp_path):
    ShardWriter(tmp_path, {**SETTINGS, "d": 16}, rows_per_shard=64)
    assert not (tmp_path / "manifest.json").exists()  # nothing written, nothing to refuse
    ShardWriter(tmp_path, SETTINGS, rows_per_shard=64).finish()
    with pytest.raises(UserError, match="different settings"):
        ShardWriter(tmp_path, {**SETTINGS, "d": 16}, rows_per_shard=64)


def test_corrupt_and_truncated_shards(tmp_path):
    acts, toks = rows(100, 1)
    w = ShardWriter(tmp_path, SETTINGS, rows_per_shard=64)
    w.add(acts, toks)
    manifest = w.finish()
    path = tmp_path / manifest["shards"][0]["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        load_shard(tmp_path, manifest["shards"][0], "a", verify=True)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UserError, match="truncated"):
        load_shard(tmp_path, manifest["shards"][0], "a")
    with pytest.raises(UserError, match="no site"):
        open_cache(tmp_path, "c")


def test_loader_covers_every_row_once_per_epoch_across_ranks(tmp_path):
    acts, toks = rows(256, 2)
    acts["a"][:, 0] = torch.arange(256).float()  # row id in column 0
    w = ShardWriter(tmp_path, SETTINGS, rows_per_shard=32)
    w.add(acts, toks)
    w.finish()
    seen = []
    for rank in range(2):
        loader = ActivationLoader(
            tmp_path, "a", 16, seed=3, rank=rank, world_size=2, buffer_shards=3
        )
        seen += [b[:, 0] for b in loader.epoch_batches(0)]
    ids = torch.cat(seen).long()
    assert sorted(ids.tolist()) == list(range(256))
    assert ids[:32].tolist() != list(range(32))  # shuffled
    batches = iter(ActivationLoader(tmp_path, "a", 16, seed=3))
    assert next(batches).shape == (16, 8)


def test_loader_carries_rows_between_buffers(tmp_path):
    acts, toks = rows(150, 4)
    acts["a"][:, 0] = torch.arange(150).float()
    w = ShardWriter(tmp_path, SETTINGS, rows_per_shard=32)  # shards of 32, 32, 32, 32, 22
    w.add(acts, toks)
    w.finish()
    loader = ActivationLoader(tmp_path, "a", 20, seed=5, buffer_shards=2)
    batches = list(loader.epoch_batches(0))
    assert len(batches) == loader.batches_per_epoch(0) == 7  # 150 // 20; 10 rows dropped
    ids = torch.cat(batches)[:, 0].long()
    assert len(set(ids.tolist())) == 140  # no row twice, even across buffers
    for b in batches:  # each row intact: both columns from the same cached row
        torch.testing.assert_close(b, acts["a"][b[:, 0].long()])
    again = list(ActivationLoader(tmp_path, "a", 20, seed=5, buffer_shards=2).epoch_batches(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    other = torch.cat(list(loader.epoch_batches(1)))[:, 0]
    assert not torch.equal(other, ids.float())  # each epoch its own order
