"""Issue 13, the cache side: nothing silently wrong. One test per numbered item (1-4, 6, 7,
9-12) and a kill -9 during the manifest write."""

import errno
import io
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from flashsae.cache import errors, locks, shard_file
from flashsae.cache.__main__ import main
from flashsae.cache.build import cache_settings, default_cache_dir
from flashsae.cache.errors import UserError
from flashsae.cache.loader import ActivationLoader
from flashsae.cache.models.subjects import get_subject, weights_digest
from flashsae.cache.shards import ShardWriter, read_manifest
from tests.helpers import cli_env
from tests.test_cache_cli import BUILD

SETTINGS = {"model": "m", "sites": ["a"], "d": 8, "dtype": "float32"}


@pytest.fixture(autouse=True)
def _torch_reference(monkeypatch):
    """In-process builds use the CPU torch path, as the CLI in a subprocess does."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def small_cache(folder, n=96, rows_per_shard=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n)
    w = ShardWriter(folder, SETTINGS, rows_per_shard)
    w.add({"a": torch.randn(n, 8, generator=g)}, {"tokens": i, "doc": i, "pos": i, "seq": i})
    return w.finish()


def plant(folder, entry, x):
    """Rewrite a shard with rows ``x`` and a valid checksum in the manifest."""
    i = torch.arange(len(x), dtype=torch.int32)
    parts = {"a": [x], **{k: [i] for k in ("tokens", "doc", "pos", "seq")}}
    entry["sha256"] = shard_file.write_shard(folder / entry["file"], parts)


def cache_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_1_loader_refuses_corrupt_and_nonfinite_shards(tmp_path):
    m = small_cache(tmp_path)
    shard = tmp_path / m["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-9] ^= 0x40  # one flipped bit in the last row
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard-00001.*checksum"):
        list(ActivationLoader(tmp_path, "a", 16).epoch_batches(0))
    assert len(list(ActivationLoader(tmp_path, "a", 16, verify=False).epoch_batches(0))) == 6

    x = torch.randn(32, 8)
    x[5, 3] = float("nan")
    plant(tmp_path, m["shards"][1], x)
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"shard-00001.*non-finite.*row 5"):
        next(iter(ActivationLoader(tmp_path, "a", 16)))


def test_2_second_build_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    with locks.exclusive_lock(out, "a cache build"):
        assert main([*BUILD, "--tokens", "500", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is being written by pid {os.getpid()} (a cache build); wait for it" in err, err
    assert not (out / "manifest.json").exists()
    assert main([*BUILD, "--tokens", "500", "--out", str(out)]) == 0  # released


def test_3_short_write_is_an_error_and_never_renamed_in(tmp_path):
    out = tmp_path / "c"
    # a shard of 1000 rows: two bf16 sites of d=64 (widest dtype first: int32 columns, then
    # the sites), so a file size limit 100 bytes short of it cuts the shard's last write short
    limit = 1000 * (4 * 4 + 2 * 64 * 2) - 100

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "flashsae.cache", *BUILD, "--tokens", "1500", "--out", str(out)],
        env=cli_env(),
        capture_output=True,
        text=True,
        preexec_fn=cap,
        timeout=300,
    )
    assert result.returncode == 2 and "File too large" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()


def test_4_cache_key_follows_text_and_weight_contents(tmp_path):
    subject = get_subject("bytelm-tiny", 64)
    text = tmp_path / "corpus.txt"
    text.write_text("one corpus " * 100)
    args = (subject, ["blocks.0.hook_resid_post"], str(text), 1000, 64, 0)
    before = cache_settings(*args)
    text.write_text("another corpus " * 100)
    after = cache_settings(*args)
    assert before != after and default_cache_dir(before) != default_cache_dir(after)
    assert before["model_key"] == after["model_key"] == subject.key

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights one")
    first = weights_digest(model)
    (model / "model.safetensors").write_bytes(b"weights two")
    assert weights_digest(model) != first


def test_6_build_rebuilds_missing_and_corrupt_shards_in_place(tmp_path, capsys):
    args = [*BUILD, "--tokens", "3000"]
    whole, out = tmp_path / "whole", tmp_path / "c"
    assert main([*args, "--out", str(whole)]) == 0
    shutil.copytree(whole, out)
    names = [e["file"] for e in manifest(whole)["shards"]]
    assert len(names) == 4
    (out / names[1]).unlink()
    (out / names[3]).write_bytes((out / names[3]).read_bytes()[:-7])
    capsys.readouterr()
    assert main(["info", str(out)]) == 1
    info = capsys.readouterr()
    assert "complete" not in info.out and "2 of 4 shards missing or bad" in info.out
    assert main([*args, "--out", str(out)]) == 0
    assert cache_files(out) == cache_files(whole)

    data = bytearray((out / names[2]).read_bytes())
    data[len(data) // 2] ^= 1  # same size: only a checksum sees it
    (out / names[2]).write_bytes(bytes(data))
    assert main([*args, "--out", str(out), "--verify"]) == 0
    assert cache_files(out) == cache_files(whole)
    assert main(["verify", str(out)]) == 0


def test_7_float16_overflow_is_caught_after_the_cast(tmp_path, capsys):
    w = ShardWriter(tmp_path / "w", {**SETTINGS, "dtype": "float16"}, 32)
    x = torch.randn(10, 8)
    x[3, 1] = 1e5  # finite in float32, inf in float16
    i = torch.arange(10)
    with pytest.raises(UserError, match="non-finite.*after the cast to float16"):
        w.add({"a": x}, {"tokens": i, "doc": i, "pos": i, "seq": i})

    m = small_cache(tmp_path / "v")
    x = torch.randn(32, 8)
    x[0, 0] = float("inf")
    plant(tmp_path / "v", m["shards"][2], x)  # valid checksum, inf inside
    (tmp_path / "v" / "manifest.json").write_text(json.dumps(m))
    assert main(["verify", str(tmp_path / "v")]) == 1
    assert "shard-00002.safetensors holds non-finite values" in capsys.readouterr().err


def test_9_symlinks_not_followed_and_manifest_names_kept_inside(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    victims = {}
    for name in ("shard-00000.safetensors.tmp", "manifest.json.tmp"):
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("precious")
        (out / name).symlink_to(victims[name])
    assert main([*BUILD, "--tokens", "500", "--out", str(out)]) == 0
    assert all(v.read_text() == "precious" for v in victims.values())
    assert not any(p.is_symlink() for p in out.iterdir())

    m = manifest(out)
    for name in ("../victim-manifest.json.tmp", str(victims["manifest.json.tmp"]), "a/b", ".."):
        m["shards"][0]["file"] = name
        (out / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(UserError, match="not a file in the cache"):
            read_manifest(out)


def test_10_sites_validated(tmp_path, capsys):
    for sites, needle in [
        (",", "names no site"),
        ("blocks.0.hook_resid_post,blocks.0.hook_resid_post", "more than once"),
        ("blocks.0.fc", "is 256 wide, not d_model=64"),
    ]:
        argv = [*BUILD[:4], sites, *BUILD[5:], "--tokens", "300", "--out", str(tmp_path / "x")]
        assert main(argv) == 2, sites
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


def test_11_bad_inputs_are_one_line(tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "x")]
    (tmp_path / "null.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    cases = [
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--text", str(tmp_path / "null.jsonl")], "null.jsonl:2: the 'text' field is null"),
        (["--text", str(tmp_path / "num.jsonl")], "num.jsonl:1: the 'text' field is 3"),
    ]
    for extra, needle in cases:
        assert main([*BUILD, "--tokens", "300", *extra, *out]) == 2
        assert needle in capsys.readouterr().err

    for bad in ("[1, 2]", '{"format_version": 1, "settings": {}}'):
        (tmp_path / "manifest.json").write_text(bad)
        assert main(["info", str(tmp_path)]) == 2
        assert "not a valid cache manifest" in capsys.readouterr().err

    ro = tmp_path / "ro"  # a read-only --out, as a non-root user sees it
    ro.mkdir()
    real_open = os.open

    def denied(path, *a, **k):
        if str(path).startswith(str(ro)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    assert main([*BUILD, "--tokens", "300", "--out", str(ro)]) == 2
    err = capsys.readouterr().err
    assert "Permission denied" in err and "Traceback" not in err
    monkeypatch.undo()

    def raises_oserror():
        raise PermissionError(errno.EROFS, "Read-only file system", "/somewhere")

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)  # even with no stderr to print to
    assert errors.report_errors(raises_oserror) == 2


def test_12_missing_paths_stay_offline_and_failed_builds_leave_no_folders(tmp_path, capsys):
    for extra, needle in [
        (["--text", "data/missing.txt"], "--text data/missing.txt: no such file"),
        (["--model", "nobody/no-such-model"], "--model nobody/no-such-model: no such file"),
        (["--model", "ckpts/run1/final"], "--model ckpts/run1/final: no such file"),
    ]:
        deep = tmp_path / "a" / "b"
        assert main([*BUILD, *extra, "--tokens", "300", "--out", str(deep)]) == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / "a").exists()


def test_kill_9_during_the_manifest_write_resumes_to_the_same_cache(tmp_path):
    args = [*BUILD, "--tokens", "3000"]
    whole, out = tmp_path / "whole", tmp_path / "killed"
    assert main([*args, "--out", str(whole)]) == 0
    # the third manifest write dies halfway through its temporary file
    script = f"""
import os, signal, sys
from flashsae.cache import shard_file, shards
from flashsae.cache.__main__ import main
calls = []
real = shard_file.write_atomic
def dying(path, chunks):
    if path.name == "manifest.json":
        calls.append(path)
        if len(calls) == 3:
            data = b"".join(bytes(c) for c in chunks)
            with open(path.with_name("manifest.json.tmp"), "wb") as fh:
                fh.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, chunks)
shards.write_atomic = dying
sys.exit(main({[*args, "--out", str(out)]!r}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], env=cli_env(), capture_output=True, timeout=300
    )
    assert proc.returncode == -9
    assert (out / "manifest.json.tmp").exists() and len(manifest(out)["shards"]) == 2
    assert main([*args, "--out", str(out)]) == 0
    assert cache_files(out) == cache_files(whole)
