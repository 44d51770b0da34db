"""Shard files: the streamed writer speaks safetensors, and the mapped reader checks layout."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flashsae.cache.errors import UserError
from flashsae.cache.shard_file import map_shard, write_shard


def parts_of(x, cuts):
    return [x[a:b] for a, b in zip([0, *cuts], [*cuts, len(x)], strict=True)]


def test_written_shards_are_safetensors_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    # odd sizes, so a careless order would leave the int32 and fp32 tensors misaligned
    tensors = {
        "h16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, 2, generator=g).half(),
        "f32": torch.randn(7, 5, generator=g),
        "seq": torch.randint(0, 1000, (7,), generator=g, dtype=torch.int32),
    }
    path = tmp_path / "s.safetensors"
    sha = write_shard(path, {k: parts_of(v, [2, 2, 6]) for k, v in tensors.items()})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))
    with safe_open(path, framework="pt") as fh:
        assert set(fh.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(fh.get_tensor(k), v), k
    mapped = map_shard(path)
    for k, v in tensors.items():
        assert mapped[k].dtype == v.dtype and torch.equal(mapped[k], v), k
        assert mapped[k].data_ptr() % v.element_size() == 0, k


def test_mapped_tensors_are_private_views(tmp_path):
    x = torch.randn(16, 4)
    path = tmp_path / "x.safetensors"
    save_file({"x": x}, path, metadata={"note": "written by safetensors itself"})
    before = path.read_bytes()
    mapped = map_shard(path)["x"]
    assert torch.equal(mapped, x)
    mapped.zero_()  # copy-on-write: the file is never changed through the map
    assert path.read_bytes() == before


def damaged(data: bytes):
    """(what was done, the damaged bytes) for a valid safetensors file ``data``."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    gap = dict(header)
    gap["x"] = {**gap["x"], "data_offsets": [4, gap["x"]["data_offsets"][1] + 4]}
    odd = {**header, "x": {**header["x"], "dtype": "C64"}}

    def with_header(h):
        text = json.dumps(h).encode()
        return struct.pack("<Q", len(text)) + text + data[8 + n :]

    return [
        ("empty", b""),
        ("cut in the header", data[: 8 + n // 2]),
        ("cut in the data", data[:-10]),
        ("one byte too many", data + b"\0"),
        ("header length past the end", struct.pack("<Q", 10**9) + data[8:]),
        ("header not JSON", data[:8] + b"\xff" * n + data[8 + n :]),
        ("offsets with a gap", with_header(gap)),
        ("unknown dtype", with_header(odd)),
        ("header a list", with_header([1, 2])),
    ]


def test_damaged_files_are_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    write_shard(good, {"x": [torch.randn(8, 4)], "seq": [torch.arange(8, dtype=torch.int32)]})
    for what, data in damaged(good.read_bytes()):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(data)
        with pytest.raises(UserError, match="bad.safetensors") as e:
            map_shard(bad)
        assert "rebuild the cache" in str(e.value), what
    with pytest.raises(UserError, match="missing.safetensors"):
        map_shard(tmp_path / "missing.safetensors")
