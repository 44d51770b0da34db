"""Issue 11, ``--shard-latents`` on the command line (2 gloo ranks under torchrun): the run ends
with the weights of the same run in one process, writes a checkpoint ``load_sae`` reads and one
training state per rank; settings it cannot run are refused with one ``error:`` line."""

import json

import pytest
import torch

from flashsae.train.__main__ import main as train_main
from flashsae.train.checkpoint import load_sae
from flashsae.train.topk import TopKSAE
from tests.test_distributed import COMMON, assert_close_weights, torchrun
from tests.test_train_robust import last_error, random_rows, write_cache

pytestmark = pytest.mark.usefixtures("fast_cpu")  # conftest: torch path, no W&B


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("shard") / "cache", random_rows(rows=4096))


def test_two_shards_train_one_process_weights(tmp_path, cache):
    """TopK sharded over 2 ranks ends with the weights and metrics of one unsharded process;
    each rank saved its shard's training state."""
    flags = [*COMMON, "--cache", str(cache)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main([*flags, "--out", str(one)]) == 0
    done, _ = torchrun("::", *flags, "--shard-latents", "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    w_dec = torch.load(one / "train_state.pt", weights_only=True)["sae"]["W_dec"]
    for r, name in enumerate(("train_state.pt", "train_state.rank1.pt")):
        state = torch.load(two / name, weights_only=True)
        assert (state["step"], state["world_size"]) == (8, 2)
        assert state["sae"]["W_dec"].shape == (64, 64)  # 128 latents over 2 ranks
        torch.testing.assert_close(state["sae"]["W_dec"], w_dec[64 * r : 64 * (r + 1)])
    assert_close_weights(one, two)
    sae = load_sae(two)
    assert isinstance(sae, TopKSAE) and sae.cfg.n_latents == 128
    metrics, want = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert metrics.keys() == want.keys() and metrics["tokens"] == 4096
    assert abs(metrics["fvu"] - want["fvu"]) < 1e-4 * max(abs(want["fvu"]), 1.0)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--arch", "relu"], "--shard-latents supports --arch"),
        ([], "under torchrun with more than one process"),
        (["--arch", "topk,batchtopk"], "does not combine with a sweep"),
    ],
)
def test_refusals(tmp_path, cache, capsys, extra, says):
    argv = [*COMMON, "--cache", str(cache), "--out", str(tmp_path / "run"), "--shard-latents"]
    assert train_main([*argv, *extra]) == 2
    err = last_error(capsys)
    assert err.startswith("error:") and says in err, err
    assert not (tmp_path / "run").exists()
