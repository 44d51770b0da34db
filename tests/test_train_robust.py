"""Issue 13, the training side: nothing silently wrong, one writer per run directory, every bad
input one line and exit 2. Each test is named after the issue's item it covers."""

import errno
import hashlib
import json
import os
import random
import struct
import subprocess
import sys

import pytest
import torch

from flashsae.cache.errors import UserError
from flashsae.cache.locks import exclusive_lock
from flashsae.cache.shards import ShardWriter
from flashsae.train import RunConfig
from flashsae.train.__main__ import main as train_main
from flashsae.train.checkpoint import save_sae
from flashsae.train.eval import main as eval_main
from flashsae.train.export import main as export_main
from flashsae.train.files import open_output, write_output
from flashsae.train.metrics import CE_GAP_MIN, SpliceStats, metric_warnings
from flashsae.train.pipeline import resume_config
from flashsae.train.sae import SAEConfig
from flashsae.train.topk import TopKSAE
from flashsae.train.trainer import NonFiniteLoss, TrainConfig, train_sae
from flashsae.train.wandb_log import NullLogger
from tests.helpers import cli_env

SITE = "blocks.0.hook_resid_post"  # bytelm-tiny's default site; d_model 64
D = 64
FAST = ["--model", "bytelm-tiny", "--tokens", "4096", "--batch-size", "512", "--k", "4"]
FAST += ["--n-latents", "128", "--eval-tokens", "512", "--checkpoint-every", "2"]


pytestmark = pytest.mark.usefixtures("fast_cpu")  # conftest: torch path, no W&B


def write_cache(folder, x, model_key="other-model", dtype="float32", d=D):
    """A finished cache of rows ``x`` at SITE, as if captured from ``model_key``."""
    settings = {"model": model_key, "model_key": model_key, "sites": [SITE], "d": d}
    w = ShardWriter(folder, {**settings, "dtype": dtype}, 1000)
    i = torch.arange(len(x))
    w.add({SITE: x}, {"tokens": i, "doc": i, "pos": i, "seq": i})
    w.finish()
    return folder


def poison(cache, value, every, stats=False):
    """Set every ``every``-th row of each shard to ``value`` and record the new checksums (the
    bytes are "valid"); with ``stats``, the manifest's statistics become those of ``value``."""
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = cache / entry["file"]
        data = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        begin, end = json.loads(data[8 : 8 + n])[SITE]["data_offsets"]
        rows = torch.frombuffer(data, dtype=torch.float32, offset=8 + n + begin,
                                count=(end - begin) // 4)  # fmt: skip
        rows.view(-1, D)[::every] = value
        path.write_bytes(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    if stats:
        manifest["stats"][SITE] |= {"sum": [value] * D, "sum_sq_norm": value}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    return cache


def random_rows(rows=4096, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g) * 2 + 0.5


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


class NaNAt:
    """A loader whose batch ``bad`` (0-based) holds a NaN, the others random; Ctrl-C instead
    of batch ``stop``."""

    def __init__(self, bad, d=16, stop=None):
        self.bad, self.d, self.stop = bad, d, stop

    def batches(self, start=0):
        for i in range(start, 10**9):
            if i == self.stop:
                raise KeyboardInterrupt
            x = torch.randn(64, self.d, generator=torch.Generator().manual_seed(i)) + 0.5
            if i == self.bad:
                x[3, 5] = float("nan")
            yield x


def tiny_sae():
    torch.manual_seed(0)
    return TopKSAE(SAEConfig("topk", 16, 64, k=4, k_aux=8))


# 1: a NaN loss never becomes a saved SAE


def test_item1_nan_loss_stops_at_its_step_and_keeps_the_last_good_state(tmp_path):
    state = tmp_path / "train_state.pt"
    cfg = TrainConfig(tokens=64 * 12, batch_size=64, log_every=10**6, checkpoint_every=3)
    with pytest.raises(NonFiniteLoss, match="at step 7 of 12") as err:
        train_sae(tiny_sae(), NaNAt(bad=7), cfg, NullLogger(), state)
    assert "keeps step 6" in str(err.value)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 6  # the checkpoint at step 9 came after the bad step: not written
    assert all(torch.isfinite(t).all() for t in saved["sae"].values())
    # it is the state of a clean run at step 6
    clean = tmp_path / "clean.pt"
    with pytest.raises(KeyboardInterrupt):
        train_sae(tiny_sae(), NaNAt(bad=-1, stop=7), cfg, NullLogger(), clean)
    reference = torch.load(clean, weights_only=True)
    assert reference["step"] == 6
    for name, t in reference["sae"].items():
        torch.testing.assert_close(saved["sae"][name], t, rtol=0, atol=0, msg=name)


def test_item1_a_run_on_nan_rows_with_valid_checksums_saves_nothing(tmp_path, capsys):
    """The run stops, exit 2, and, failing before its first checkpoint, leaves nothing behind
    (item 12)."""
    cache = poison(write_cache(tmp_path / "cache", random_rows()), float("nan"), every=97)
    out = tmp_path / "run"
    code = train_main([*FAST, "--cache", str(cache), "--allow-other-model", "--out", str(out)])
    assert code == 2
    assert last_error(capsys).startswith("error: ")
    assert not out.exists()


def test_item1_a_corrupt_shard_stops_training_unless_no_verify(tmp_path, capsys):
    """A flipped byte (finite value, stale checksum): refused with the shard named; with
    --no-verify the loader trusts the bytes and the run goes through."""
    cache = write_cache(tmp_path / "cache", random_rows())
    shard = cache / json.loads((cache / "manifest.json").read_text())["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01  # a low mantissa bit of the last row: still finite
    shard.write_bytes(data)
    args = [*FAST, "--cache", str(cache), "--allow-other-model"]
    assert train_main([*args, "--out", str(tmp_path / "a")]) == 2
    assert shard.name in last_error(capsys)
    assert not (tmp_path / "a" / "metrics.json").exists()
    assert train_main([*args, "--no-verify", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "metrics.json").exists()


# 2: one writer per run directory


def test_item2_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    save_sae(TopKSAE(SAEConfig("topk", D, 128, k=4, site=SITE, model="bytelm-tiny")), out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom flashsae.cache.locks import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'a training run'):\n print('locked', flush=True)\n"
         " time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in out.iterdir())
        assert train_main([*FAST, "--out", str(out)]) == 2
        line = last_error(capsys)
        assert f"pid {holder.pid} (a training run)" in line and "one writer" in line
        assert eval_main([str(out), "--tokens", "512"]) == 2
        assert f"pid {holder.pid}" in last_error(capsys)
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    finally:
        holder.kill()  # like kill -9: the lock goes with the process
        holder.wait()
    with exclusive_lock(out, "a test"):
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())
    assert not (out / ".lock").exists()


# 5: a cache of another model


def test_item5_train_and_eval_refuse_a_cache_of_another_model(tmp_path, capsys):
    cache = write_cache(tmp_path / "cache", random_rows(1024))
    out = tmp_path / "run"
    assert train_main([*FAST, "--cache", str(cache), "--out", str(out)]) == 2
    line = last_error(capsys)
    assert "'other-model'" in line and "'bytelm-tiny'" in line and "--allow-other-model" in line
    assert not out.exists()
    ckpt = tmp_path / "ckpt"
    save_sae(TopKSAE(SAEConfig("topk", D, 128, k=4, site=SITE, model="bytelm-tiny")), ckpt)
    assert eval_main([str(ckpt), "--cache", str(cache), "--tokens", "512"]) == 2
    assert "--allow-other-model" in last_error(capsys)
    assert not (ckpt / "eval.json").exists()


# 8: export into a run directory


def test_item8_export_refuses_to_write_into_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    save_sae(TopKSAE(SAEConfig("topk", 8, 16, k=4, k_aux=4, site=SITE)), run)
    cfg = (run / "cfg.json").read_bytes()
    for out in (run, run / "saelens"):
        assert export_main([str(run), str(out)]) == 2
        assert "inside the flashsae run directory" in last_error(capsys)
    assert (run / "cfg.json").read_bytes() == cfg and not (run / "saelens").exists()
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "train_state.pt").write_bytes(b"x")
    assert export_main([str(run), str(tmp_path / "unfinished")]) == 2
    assert export_main([str(run), str(tmp_path / "elsewhere")]) == 0


# 9: no writes through planted symbolic links


def test_item9_outputs_never_follow_a_planted_symlink(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").symlink_to(outside)
    write_output(run / "config.json", "{}")  # the link itself is replaced
    assert outside.read_text() == "keep" and not (run / "config.json").is_symlink()
    (run / "train_state.pt.tmp").symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        write_output(run / "train_state.pt", b"state")
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(UserError, match="symbolic link"):
        open_output(run / "metrics.jsonl", "a")
    assert outside.read_text() == "keep"


def test_item9_a_training_run_and_an_export_refuse_planted_links(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    cache = write_cache(tmp_path / "cache", random_rows(1024))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json.tmp").symlink_to(outside)
    args = [*FAST, "--cache", str(cache), "--allow-other-model", "--out", str(run)]
    assert train_main(args) == 2
    assert "symbolic link" in last_error(capsys)
    ckpt = tmp_path / "ckpt"
    save_sae(TopKSAE(SAEConfig("topk", 8, 16, k=4, k_aux=4, site=SITE)), ckpt)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "sae_weights.safetensors.tmp").symlink_to(outside)
    assert export_main([str(ckpt), str(tmp_path / "export")]) == 2
    assert "symbolic link" in last_error(capsys)
    assert outside.read_text() == "keep"


# 11: one line and exit 2, no traceback


def test_item11_bad_outputs_are_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert train_main([*FAST, "--out", str(a_file)]) == 2
    assert "is a file, not a directory" in last_error(capsys)
    ckpt = tmp_path / "ckpt"
    save_sae(TopKSAE(SAEConfig("topk", 8, 16, k=4, k_aux=4, site=SITE)), ckpt)
    assert export_main([str(ckpt), str(a_file)]) == 2
    assert "is a file, not a directory" in last_error(capsys)
    assert eval_main([str(ckpt), "--seq-len", "1"]) == 2
    assert "--seq-len must be at least 2" in last_error(capsys)

    def read_only(path, flags, mode=0o777):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(os, "open", read_only)  # as on a read-only filesystem (we are root)
    with pytest.raises(UserError, match="Read-only file system"):
        write_output(tmp_path / "x.json", "{}")
    with pytest.raises(UserError, match="Read-only file system"):
        with exclusive_lock(tmp_path / "run", "a test"):
            pass


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another SAE"])
def test_item11_a_damaged_train_state_is_one_error(tmp_path, damage):
    state = tmp_path / "train_state.pt"
    cfg = TrainConfig(tokens=64 * 4, batch_size=64, log_every=10**6, checkpoint_every=2)
    train_sae(tiny_sae(), NaNAt(bad=-1), cfg, NullLogger(), state)
    data = state.read_bytes()
    if damage == "truncated":
        state.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        state.write_bytes(random.Random(0).randbytes(4096))
    sae = tiny_sae() if damage != "another SAE" else TopKSAE(SAEConfig("topk", 16, 32, k=4))
    with pytest.raises(UserError, match="not a readable training state"):
        train_sae(sae, NaNAt(bad=-1), cfg, NullLogger(), state)


@pytest.mark.parametrize(
    "config, match",
    [(None, "does not exist"), ("{", "not valid JSON"), ('{"k": "8"}', "k must be int"),
     ('{"cache": 3}', "cache must be Path"), ('{"lr": null}', "lr must be float")],
)  # fmt: skip
def test_item11_resume_with_a_missing_or_malformed_config(tmp_path, capsys, config, match):
    (tmp_path / "train_state.pt").write_bytes(b"")
    if config is not None:
        (tmp_path / "config.json").write_text(config)
    assert train_main(["--resume", str(tmp_path)]) == 2
    assert match in last_error(capsys)


def test_item11_caches_of_another_width_or_non_finite_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_sae(TopKSAE(SAEConfig("topk", D, 128, k=4, site=SITE, model="bytelm-tiny")), ckpt)
    narrow = write_cache(tmp_path / "narrow", random_rows(1024, d=16), d=16)
    assert eval_main([str(ckpt), "--cache", str(narrow), "--allow-other-model"]) == 2
    assert "d=16" in last_error(capsys)
    inf = poison(write_cache(tmp_path / "inf", random_rows(1024)), float("inf"), 1, stats=True)
    args = [*FAST, "--cache", str(inf), "--allow-other-model", "--out", str(tmp_path / "r")]
    assert train_main(args) == 2
    assert "NaN, inf or all zero" in last_error(capsys)
    assert not (tmp_path / "r").exists()


def test_item11_ce_loss_recovered_of_a_site_that_does_not_matter_is_null():
    stats = SpliceStats()
    logits = torch.randn(2, 5, 11)
    same = {"clean": logits, "zero": logits, "sae": logits + 0.1 * torch.randn(2, 5, 11)}
    stats.update(torch.randint(0, 11, (2, 5)), same, torch.ones(2, 5, dtype=torch.bool))
    results = stats.result()
    assert results["ce_loss_recovered"] is None
    assert "undefined" in metric_warnings(results)[0]


# 12: --resume with other flags; the CE loss recovered warning


def test_item12_resume_refuses_changed_settings_but_takes_device(tmp_path, capsys):
    saved = RunConfig(model="bytelm-tiny", k=8, tokens=8192, out=tmp_path)
    (tmp_path / "config.json").write_text(saved.to_json())
    (tmp_path / "train_state.pt").write_bytes(b"")
    assert train_main(["--resume", str(tmp_path), "--tokens", "16384"]) == 2
    line = last_error(capsys)
    assert "--tokens 16384 (saved: 8192)" in line and "only --device, --no-verify" in line
    assert train_main(["--resume", str(tmp_path), "--k", "32"]) == 2  # 32 is the default
    assert "--k 32 (saved: 8)" in last_error(capsys)
    same = resume_config(tmp_path, {"k": 8, "tokens": 8192, "device": "cpu", "out": tmp_path})
    assert same == RunConfig(**{**vars(saved), "device": "cpu"})


def test_item12_ce_loss_recovered_with_a_tiny_gap_is_reported_with_a_warning():
    results = {"ce_clean": 2.0, "ce_zero": 2.0 + CE_GAP_MIN / 2, "ce_sae": 1.9}
    results["ce_loss_recovered"] = (results["ce_zero"] - 1.9) / (CE_GAP_MIN / 2)
    (warning,) = metric_warnings(results)
    assert "unreliable" in warning and "(3)" in warning
    assert metric_warnings({**results, "ce_zero": 2.0 + 2 * CE_GAP_MIN}) == []
