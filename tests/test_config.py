from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from mnr.config import TrainConfig, load_toml
from mnr.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"best-nli.toml", "nli-bert-base.toml", "nli-minilm-cpu.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_differs_from_defaults_only_where_it_says(path):
    values = load_toml(path)
    config = TrainConfig.from_sources(str(path))
    defaults = TrainConfig()
    for key, value in values.items():
        assert getattr(config, key) == value
        assert value != getattr(defaults, key), f"{path.name}: {key} repeats the default"
    assert path.read_text().startswith("#") and "mnr train --config configs/" in path.read_text()


def test_the_classic_sbert_recipe():
    config = TrainConfig.from_sources("configs/nli-bert-base.toml")
    assert config.model == "google-bert/bert-base-uncased"
    assert config.data == ["hf:stanfordnlp/snli:train", "hf:nyu-mll/multi_nli:train"]
    assert (config.loss, config.batch_size, config.lr, config.warmup_ratio, config.epochs,
            config.max_seq_length, config.pooling) == ("mnr", 32, 2e-5, 0.1, 1, 128, "mean")


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('batch_size = 64\nlr = 3e-5\ndata = ["a.jsonl"]\n')
    config = TrainConfig.from_sources(str(path), batch_size=16, lr=None)
    assert (config.batch_size, config.lr, config.data) == (16, 3e-5, ["a.jsonl"])


def test_resolved_config_round_trips(tmp_path):
    config = TrainConfig(data=["x.jsonl", 'we"ird.csv'], lr=3e-5, bf16=True, output="o")
    path = tmp_path / "resolved.toml"
    path.write_text(config.to_toml())
    assert TrainConfig(**tomllib.loads(path.read_text())) == config


@pytest.mark.parametrize("text, message", [
    ("batch_sise = 8", r"c.toml: unknown key 'batch_sise'"),
    ('batch_size = "32"', r"c.toml: --batch-size must be an integer, got '32'"),
    ("batch_size = 0", r"c.toml: --batch-size must be at least 2 .*got 0"),
    ("lr = -1e-5", r"c.toml: --lr must be a positive number, got -1e-05"),
    ("scale = 0", r"c.toml: --scale must be a positive number, got 0.0"),
    ("warmup_ratio = 1.5", r"--warmup-ratio must be between 0 and 1"),
    ('data = "one.jsonl"', r"--data must be a list of text"),
    ("bf16 = 1", r"--bf16 must be true or false, got 1"),
    ('loss = "triplet"', r"--loss must be one of mnr, softmax, got 'triplet'"),
    ("[optim]\nlr = 1", r"\[optim\] tables are not used"),
    ("lr = ", r"c.toml: malformed TOML"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_sources(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.toml: no such config file"):
        TrainConfig.from_sources("nope.toml")


def test_bad_flag_values():
    with pytest.raises(ConfigError, match="--epochs must be at least 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="--hard-negatives adds negatives to ranking rows; --loss softmax"):
        TrainConfig(loss="softmax", hard_negatives=True)
    with pytest.raises(ConfigError, match="--symmetric applies to --loss mnr only, got --loss softmax"):
        TrainConfig(loss="softmax", symmetric=True)
    with pytest.raises(ConfigError, match="--scale applies to --loss mnr only"):
        TrainConfig(loss="softmax", scale=10.0)
    with pytest.raises(ConfigError, match="--lr must be a positive number, got nan"):
        TrainConfig(lr=float("nan"))


def test_every_setting_says_whether_it_changes_the_weights():
    """A checkpoint resumes only under the same weight-changing settings: a new setting must say which it is."""
    import dataclasses

    from mnr.rundir import RESULT_SETTINGS

    for f in dataclasses.fields(TrainConfig):
        assert isinstance(f.metadata.get("weights"), bool), f"{f.name}: declare weights=True or False in _f(...)"
    changing = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["weights"]}
    assert set(RESULT_SETTINGS) == changing - {"data"}  # the data are compared by content, not by name
    assert {"lr", "batch_size", "seed", "loss", "model"} <= set(RESULT_SETTINGS)
    assert not {"output", "resume", "eval_steps", "save_every"} & set(RESULT_SETTINGS)
