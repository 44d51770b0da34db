"""Issue 11, item 1: a sweep of many SAEs from one pass over the cache."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flashsae.cache.errors import UserError
from flashsae.train import RunConfig, sweep, wandb_log
from flashsae.train.__main__ import main as train_main
from tests.test_train import FakeRun
from tests.test_train_robust import SITE, random_rows, write_cache

COMMON = ["--model", "bytelm-tiny", "--site", SITE, "--tokens", "4096", "--batch-size", "512"]
COMMON += ["--n-latents", "128", "--eval-tokens", "512", "--checkpoint-every", "2"]
COMMON += ["--allow-other-model", "--seed", "3"]
MEMBERS = [  # (directory name in the sweep, flags of the separate run)
    ("topk-k4-lam0.0", ["--arch", "topk", "--k", "4"]),
    ("batchtopk-k8-lam0.0", ["--arch", "batchtopk", "--k", "8"]),
    ("relu-k32-lam2.0", ["--arch", "relu", "--sparsity-coeff", "2.0"]),
]
SWEEP_TOML = """
arch = "topk"
[[runs]]
k = 4
[[runs]]
arch = "batchtopk"
k = 8
[[runs]]
arch = "relu"
sparsity_coeff = 2.0
"""


pytestmark = pytest.mark.usefixtures("fast_cpu")  # conftest: torch path, no W&B


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("sweep") / "cache", random_rows(rows=6000))


LOADER_OF = sweep.loader_of


class CountingLoader:
    """The sweep's loader, counting the batches it hands out; Ctrl-C at batch ``stop``."""

    def __init__(self, loader, stop=None):
        self.loader, self.stop, self.count = loader, stop, 0
        self.batch_size = loader.batch_size

    def batches(self, start=0):
        for i, batch in enumerate(self.loader.batches(start), start):
            if i == self.stop:
                raise KeyboardInterrupt
            self.count += 1
            yield batch


def counting(monkeypatch, stop=None):
    loaders = []

    def make(data):
        loaders.append(CountingLoader(LOADER_OF(data), stop))
        return loaders[-1]

    monkeypatch.setattr(sweep, "loader_of", make)
    return loaders


def weights(folder):
    return load_file(folder / "sae.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0, msg=f"{a}: {name}")


def test_a_sweep_gives_each_member_the_weights_of_its_separate_run(tmp_path, cache, monkeypatch):
    toml = tmp_path / "sweep.toml"
    toml.write_text(SWEEP_TOML)
    loaders = counting(monkeypatch)
    out = tmp_path / "sweep"
    assert (
        train_main([*COMMON, "--cache", str(cache), "--sweep", str(toml), "--out", str(out)]) == 0
    )
    (loader,) = loaders
    assert loader.count == 4096 // 512  # one read per step, shared by the three SAEs
    assert json.loads((out / "sweep.json").read_text())["members"] == [n for n, _ in MEMBERS]
    table = (out / "sweep.md").read_text()
    assert "Evaluated on stdlib held-out." in table
    for name, flags in MEMBERS:
        member = out / name
        metrics = json.loads((member / "metrics.json").read_text())
        assert f"| {name} |" in table and format(metrics["fvu"], ".4g") in table
        saved = RunConfig.load(member / "config.json")
        assert saved.arch == flags[1] and saved.seed == 3 and saved.out == member
        alone = tmp_path / f"alone-{name}"
        assert train_main([*COMMON, "--cache", str(cache), *flags, "--out", str(alone)]) == 0
        assert_same_weights(member, alone)
        assert json.loads((alone / "metrics.json").read_text())["fvu"] == metrics["fvu"]
    assert (out / "frontier_fvu.png").stat().st_size > 0
    assert (out / "frontier_ce.png").stat().st_size > 0


def test_comma_lists_and_wandb_groups_and_resume(tmp_path, cache, monkeypatch):
    """``--arch a,b --k c,d`` trains every combination; an interrupted sweep resumes every
    member and ends with the weights of an uninterrupted one."""
    runs = []

    class Run(FakeRun):
        def finish(self, exit_code=0):
            pass

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb_log._wandb(), "init", lambda **kw: runs.append(Run(**kw)) or runs[-1])
    flags = [*COMMON, "--cache", str(cache), "--arch", "topk,batchtopk", "--k", "4,8"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train_main([*flags, "--out", str(whole)]) == 0
    names = ["topk-k4", "topk-k8", "batchtopk-k4", "batchtopk-k8"]
    assert [r.init["name"] for r in runs] == [f"whole/{n}" for n in names]
    assert {r.init["group"] for r in runs} == {"whole"}
    assert [(r.init["config"]["arch"], r.init["config"]["k"]) for r in runs] == [
        ("topk", 4), ("topk", 8), ("batchtopk", 4), ("batchtopk", 8)
    ]  # fmt: skip
    assert all(r.summary["fvu"] > 0 for r in runs)

    counting(monkeypatch, stop=5)  # Ctrl-C after 5 steps: every member saved step 4
    assert train_main([*flags, "--out", str(cut)]) == 130
    for n in names:
        assert torch.load(cut / n / "train_state.pt", weights_only=True)["step"] == 4
        assert not (cut / n / "metrics.json").exists()
    assert train_main([*flags, "--out", str(cut)]) == 2  # not without --resume
    loaders = counting(monkeypatch)
    assert train_main(["--resume", str(cut), "--no-verify"]) == 0
    assert loaders[0].count == 8 - 4  # every member continued from its step 4
    for n in names:
        assert_same_weights(cut / n, whole / n)
    assert train_main(["--resume", str(cut)]) == 2  # finished


def test_a_sweep_refuses_what_it_cannot_share(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('arch = ["topk", "relu"]\nbatch_size = [256, 512]\n')
    with pytest.raises(UserError, match="cannot vary 'batch_size'"):
        sweep.read_sweep_file(toml)
    toml.write_text("[[runs]]\nseed = 1\n[[runs]]\nseed = 2\n")
    with pytest.raises(UserError, match="seed"):
        sweep.check_members(sweep.read_sweep_file(toml))
    toml.write_text("k = [4, 4]\n")
    with pytest.raises(UserError, match="same settings"):
        sweep.member_names(sweep.read_sweep_file(toml))
    toml.write_text('k = "four"\n')
    with pytest.raises(UserError, match="k must be int"):
        sweep.read_sweep_file(toml)
    toml.write_text("k = [4, 8\n")
    with pytest.raises(UserError, match="not valid TOML"):
        sweep.read_sweep_file(toml)
    toml.write_text("k = [4, 8]\nlr = [1e-3, 3e-3]\n")
    cfgs = sweep.read_sweep_file(toml, {"lr": 2e-3, "arch": ["topk", "relu"]})
    # the file's axes first (slowest), then the command line's; its lr replaces the file's
    assert [(c.k, c.arch, c.lr) for c in cfgs] == [
        (4, "topk", 2e-3), (4, "relu", 2e-3), (8, "topk", 2e-3), (8, "relu", 2e-3)
    ]  # fmt: skip
