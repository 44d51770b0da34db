"""Evaluation data: separators not counted, the held-out split of the user's text by default,
eval --text beside eval.json, frontier series per evaluation data."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashsae.cache.build import keep_mask
from flashsae.cache.hooks import capture
from flashsae.cache.models.bytelm import BOS, ByteLM, ByteLMConfig
from flashsae.train import eval as eval_cli
from flashsae.train.__main__ import main as train_cli
from flashsae.train.eval import EvalData, evaluate, sibling_runs
from flashsae.train.plots import frontier_series
from tests.test_train import Scaled

SEP = 10  # a byte standing in for a separator token


class Recording(Scaled):
    """x̂ = x / 2; remembers every input row it encoded."""

    def __init__(self, d, site):
        super().__init__(d, 0.5, site)
        self.seen = []

    def encode(self, x):
        self.seen.append(x.detach().clone())
        return x


def test_separators_are_not_reconstructed_spliced_or_counted():
    torch.manual_seed(0)
    model = ByteLM(ByteLMConfig(n_layer=2, d_model=32, n_head=2, seq_len=16)).eval()
    seqs = torch.randint(11, 256, (6, 16))
    seqs[:, 0] = BOS
    seqs[torch.rand(6, 16) < 0.2] = SEP
    seqs[:, 0] = BOS
    site = "blocks.0.hook_resid_post"
    sae = Recording(32, site)
    results, _ = evaluate(sae, model, seqs, drop_tokens=(SEP,))
    keep = keep_mask(seqs, (SEP,))
    with torch.no_grad():
        h = capture(model, seqs, [site])[site]
        logits = model(seqs)
    assert torch.equal(sae.seen[0], h[keep])  # exactly the rows of kept positions, in order
    mask = keep[:, :-1]  # predictions made at kept positions
    ce = F.cross_entropy(logits[:, :-1][mask].double(), seqs[:, 1:][mask])
    assert results["ce_clean"] == pytest.approx(ce.item(), rel=1e-6)
    every, _ = evaluate(Recording(32, site), model, seqs)
    assert every["ce_clean"] != pytest.approx(results["ce_clean"], rel=1e-6)


def test_frontier_series_separate_evaluation_data():
    on = lambda name: {"name": name}  # noqa: E731
    runs = [
        {"arch": "topk", "l0": 8, "fvu": 0.4, "eval_data": on("docs held-out")},
        {"arch": "topk", "l0": 32, "fvu": 0.2, "eval_data": on("docs held-out")},
        {"arch": "topk", "l0": 16, "fvu": 0.5, "eval_data": on("manpages")},
    ]
    series, data = frontier_series(runs[:2])
    assert series == {"topk": [(8, 0.4), (32, 0.2)]} and data == "docs held-out"
    series, data = frontier_series(runs)
    assert data is None and series == {
        "topk, docs held-out": [(8, 0.4), (32, 0.2)],
        "topk, manpages": [(16, 0.5)],
    }


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_user_text_is_evaluated_on_its_held_out_split(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch path: fast on the CPU
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from flashsae.cache.models.bytelm import split_files

    files = split_files("val")[:40]
    texts = [p.read_text()[i : i + 400] for p in files for i in range(0, 2000, 400)]
    train_text = write_jsonl(tmp_path / "docs.jsonl", texts)
    other = write_jsonl(tmp_path / "other.jsonl", texts[::-1][:60])
    tiny = ["--model", "bytelm-tiny", "--tokens", "4096", "--batch-size", "1024"]
    tiny += ["--eval-tokens", "1024", "--n-latents", "256", "--k", "8", "--seq-len", "64"]
    run = tmp_path / "runs" / "a"

    (tmp_path / "one.txt").write_text("a single document " * 200)
    one = str(tmp_path / "one.txt")
    assert train_cli([*tiny, "--text", one, "--out", str(tmp_path / "runs" / "one")]) == 2
    refused = capsys.readouterr().err
    assert "held-out split" in refused and "--eval-text" in refused and "capturing" not in refused

    assert train_cli([*tiny, "--text", train_text, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    data = metrics["eval_data"]
    assert (data["kind"], data["name"], data["split"], data["text"]) == (
        "text", "docs held-out", "val", train_text,
    )  # fmt: skip
    assert data["tokens"] == 17 * 63 and len(data["digest"]) == 16  # 17 sequences after BOS

    assert eval_cli.main([str(run), "--tokens", "1024", "--seq-len", "64"]) == 0
    own = json.loads((run / "eval.json").read_text())
    assert own["eval_data"]["name"] == "docs held-out"
    assert own["fvu"] == pytest.approx(metrics["fvu"], rel=1e-3)

    assert eval_cli.main([str(run), "--text", other, "--tokens", "1024", "--seq-len", "64"]) == 0
    beside = json.loads((run / "eval-other.json").read_text())
    assert beside["eval_data"]["name"] == "other" and beside["eval_data"]["split"] == "all"
    assert beside["fvu"] != own["fvu"]
    assert json.loads((run / "eval.json").read_text()) == own  # not overwritten
    assert "Evaluated on other" in (run / "eval-other.md").read_text()
    assert {r["eval_data"]["name"] for r in sibling_runs(run.parent)} == {"docs held-out", "other"}
    assert EvalData.of(beside["eval_data"]) == EvalData(other, "all")

    # the same data again overwrites its file; a cache's rows are other data again
    assert eval_cli.main([str(run), "--text", other, "--tokens", "512", "--seq-len", "64"]) == 0
    assert json.loads((run / "eval-other.json").read_text())["eval_data"]["tokens"] == 9 * 63
    cache = Path(json.loads((run / "config.json").read_text())["cache"])
    assert (
        eval_cli.main([str(run), "--cache", str(cache), "--tokens", "1024", "--seq-len", "64"]) == 0
    )
    on_cache = json.loads((run / f"eval-cache-{cache.name}.json").read_text())["eval_data"]
    assert (on_cache["kind"], on_cache["cache"], on_cache["split"]) == ("cache", str(cache), "val")
    assert on_cache["text"] == train_text and on_cache["tokens"] == 4096  # one loader batch
    assert sorted(p.name for p in run.glob("eval*.json")) == sorted(
        ["eval.json", "eval-other.json", f"eval-cache-{cache.name}.json"]
    )


def test_a_text_cache_from_before_held_out_splits_is_refused(tmp_path):
    """Its rows include the held-out documents, so evaluating on them would not be held out."""
    from flashsae.cache.errors import UserError
    from flashsae.cache.models.subjects import get_subject
    from flashsae.cache.shards import ShardWriter
    from flashsae.train.config import RunConfig
    from flashsae.train.pipeline import prepare

    subject = get_subject("bytelm-tiny", 128)
    site = subject.default_site
    settings = {"model": "bytelm-tiny", "model_key": subject.key, "sites": [site], "d": 64}
    writer = ShardWriter(tmp_path / "old", {**settings, "dtype": "float32", "text": "d.jsonl"}, 64)
    i = torch.arange(64)
    writer.add({site: torch.randn(64, 64)}, {"tokens": i, "doc": i, "pos": i, "seq": i})
    writer.finish()
    cfg = RunConfig(model="bytelm-tiny", site=site, cache=tmp_path / "old", device="cpu")
    with pytest.raises(UserError, match="before held-out splits existed.*--eval-text"):
        prepare(cfg)
