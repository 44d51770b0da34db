"""`python -m flashsae.cache`: build, info, verify; resume after kill -9; disk errors."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flashsae.cache import shard_file, shards
from flashsae.cache.__main__ import main
from flashsae.cache.errors import UserError
from tests.helpers import cli_env, run_cli

BUILD = [
    "build",
    "--model",
    "bytelm-tiny",
    "--sites",
    "blocks.0.hook_resid_post,blocks.1.hook_mlp_out",
]
BUILD += ["--seq-len", "64", "--batch-size", "4", "--shard-rows", "1000"]


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def test_build_info_verify(tmp_path):
    out = tmp_path / "c"
    built = run_cli("flashsae.cache", *BUILD, "--tokens", "5000", "--out", str(out))
    assert built.returncode == 0, built.stderr
    m = manifest(out)
    assert m["complete"] and m["total_rows"] == 5040 and len(m["shards"]) == 6
    info = run_cli("flashsae.cache", "info", str(out))
    assert info.returncode == 0 and "5040 in 6 shards" in info.stdout
    assert run_cli("flashsae.cache", "verify", str(out)).returncode == 0
    again = run_cli("flashsae.cache", *BUILD, "--tokens", "5000", "--out", str(out), "--seed", "1")
    assert again.returncode == 2 and "different settings" in again.stderr
    shard = out / m["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    bad = run_cli("flashsae.cache", "verify", str(out))
    assert bad.returncode == 1 and m["shards"][2]["file"] in bad.stderr


def test_resume_after_kill_9_gives_the_same_cache(tmp_path):
    args = [*BUILD, "--tokens", "30000", "--shard-rows", "500"]
    whole = run_cli("flashsae.cache", *args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashsae.cache", *args, "--out", str(out)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "manifest.json").exists() and len(manifest(out)["shards"]) >= 5:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = manifest(out)
    assert not partial["complete"] and 5 <= len(partial["shards"]) < 60
    resumed = run_cli("flashsae.cache", *args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert manifest(out) == manifest(tmp_path / "whole")  # same rows, checksums and statistics
    assert run_cli("flashsae.cache", "verify", str(out)).returncode == 0


@pytest.mark.parametrize(
    "err, needle",
    [(errno.ENOSPC, "disk full"), (errno.EROFS, "Read-only file system")],
)
def test_write_errors_leave_earlier_shards_intact(tmp_path, monkeypatch, capsys, err, needle):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "c"
    assert main([*BUILD, "--tokens", "3000", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fsync = os.fsync

    def failing_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("shard-00001.safetensors.tmp"):
            raise OSError(err, os.strerror(err))
        fsync(fd)

    monkeypatch.setattr(shard_file.os, "fsync", failing_fsync)
    assert main([*BUILD, "--tokens", "6000", "--out", str(tmp_path / "d")]) == 2
    assert needle in capsys.readouterr().err
    assert not list((tmp_path / "d").glob("*.tmp"))
    assert manifest(tmp_path / "d")["shards"] == manifest(out)["shards"][:1]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_input(tmp_path):
    for extra, needle in [
        (["--sites", "blocks.7.hook_resid_post"], "unknown site"),
        (["--text", str(tmp_path / "missing.txt")], "does not exist"),
        (["--tokens", "0"], "must be positive"),
    ]:
        result = run_cli(
            "flashsae.cache", *BUILD, "--tokens", "100", *extra, "--out", str(tmp_path / "x")
        )
        assert result.returncode == 2 and needle in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    with pytest.raises(UserError, match="not an activation cache"):
        shards.read_manifest(tmp_path)


def test_build_from_jsonl_field_dropping_tokens(tmp_path):
    from safetensors import safe_open

    docs = [{"body": f"document {i}: " + "lorem ipsum dolor sit amet " * 20} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    out = tmp_path / "c"
    args = [*BUILD, "--tokens", "2000", "--text", str(tmp_path / "d.jsonl"), "--drop-tokens", "32"]
    result = run_cli("flashsae.cache", *args, "--text-field", "body", "--out", str(out))
    assert result.returncode == 0, result.stderr
    m = manifest(out)
    assert m["settings"]["dataset"].endswith("d.jsonl") and m["settings"]["drop_tokens"] == [32]
    assert m["settings"]["text_field"] == "body"
    with safe_open(out / m["shards"][0]["file"], "pt") as fh:
        tokens, pos = fh.get_tensor("tokens"), fh.get_tensor("pos")
    assert 32 not in tokens.tolist() and 256 not in tokens.tolist() and pos.min() >= 1
    assert m["total_rows"] < 32 * 63  # spaces dropped from 32 sequences of 63 tokens


def test_unreachable_hub_dataset_is_one_clear_error(tmp_path):
    pytest.importorskip("datasets")
    args = [*BUILD, "--tokens", "500", "--text", "someone/no-such-corpus"]
    out = ["--out", str(tmp_path / "c")]
    result = run_cli("flashsae.cache", *args, *out, env_extra={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "cannot read dataset" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
