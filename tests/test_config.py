"""RunConfig: the command line is generated from it, config.json round-trips, old files load."""

import json
from dataclasses import fields
from pathlib import Path

import pytest

from flashsae.cache.errors import UserError
from flashsae.train import RunConfig
from flashsae.train.__main__ import parse_args
from flashsae.train.config import from_namespace
from flashsae.train.trainer import TrainConfig


def test_every_field_is_a_flag_with_help_and_the_same_default():
    args = parse_args([])
    assert from_namespace(args) == RunConfig()
    for f in fields(RunConfig):
        assert f.metadata["help"], f.name
    flags = parse_args(["--k", "8", "--n-latents", "64", "--cache", "c", "--dtype", "bf16"])
    cfg = from_namespace(flags)
    assert (cfg.k, cfg.n_latents, cfg.cache, cfg.dtype) == (8, 64, Path("c"), "bf16")
    assert TrainConfig(tokens=1).lr == RunConfig().lr  # one place for the defaults


def test_config_json_round_trips(tmp_path):
    cfg = RunConfig(arch="gated", k=8, cache=Path("a/b"), out=tmp_path, text="t.jsonl")
    (tmp_path / "config.json").write_text(cfg.to_json())
    assert RunConfig.load(tmp_path / "config.json") == cfg


def test_a_config_written_before_dtype_resumes_as_fp32(tmp_path):
    old = json.loads(RunConfig().to_json())
    del old["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert RunConfig.load(tmp_path / "config.json").dtype == "fp32"


@pytest.mark.parametrize(
    "text, match",
    [("{", "not valid JSON"), ("[1]", "JSON object"), ('{"colour": 1}', "does not know")],
)
def test_bad_config_json_is_one_clear_error(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=match):
        RunConfig.load(tmp_path / "config.json")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"k": 0}, "--k must be positive"),
        ({"lr": float("nan")}, "--lr must be a positive number"),
        ({"k": 65, "n_latents": 64}, "larger than --n-latents"),
        ({"tokens": 10, "batch_size": 64}, "less than one batch"),
        ({"checkpoint_every": -1}, "--checkpoint-every"),
        ({"dtype": "fp8"}, "--dtype"),
    ],
)
def test_check_refuses_settings_that_cannot_run(change, match):
    with pytest.raises(UserError, match=match):
        RunConfig(**change).check()
