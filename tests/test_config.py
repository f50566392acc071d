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
    ("data = [1, 2]", r"--data must be a list of text"),
    ('sts_dev = ["a.jsonl", 2]', r"--sts-dev must be a list of text"),
    ("max_seq_length = 1", r"--max-seq-length must be 0 \(the model's own\) or at least 2"),
    ('sts_dev = ["a.jsonl"]\nbest_metric = "ir_dev"', r"--best-metric must name a dev set of this run \(sts_dev\)"),
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


def test_one_file_where_a_list_is_expected_is_a_list_of_one(tmp_path):
    """config.toml files written before --sts-dev/--ir-dev took several files hold one string."""
    path = tmp_path / "old.toml"
    path.write_text('data = "one.jsonl"\nsts_dev = "sts.jsonl"\nir_dev = ""\n')
    config = TrainConfig.from_sources(str(path))
    assert (config.data, config.sts_dev, config.ir_dev) == (["one.jsonl"], ["sts.jsonl"], [])


def test_dev_sets_are_named_by_kind_then_by_file():
    one = TrainConfig(sts_dev=["sts/stsb_dev.jsonl.gz"], ir_dev=["retrieval/scifact:train[:100]"])
    assert one.dev_sets() == {"sts_dev": ("sts_dev", "sts/stsb_dev.jsonl.gz"),
                              "ir_dev": ("ir_dev", "retrieval/scifact:train[:100]")}
    several = TrainConfig(sts_dev=["sts/stsb_dev.jsonl.gz", "other/stsb_dev.csv", "sick.tsv"],
                          ir_dev=["retrieval/scifact:train[:100]", "beir/nfcorpus:dev"],
                          best_metric="ir_dev/nfcorpus:recall@100")
    assert list(several.dev_sets()) == ["sts_dev/stsb_dev", "sts_dev/stsb_dev-2", "sts_dev/sick", "ir_dev/scifact",
                                        "ir_dev/nfcorpus"]
    with pytest.raises(ConfigError, match=r"--best-metric must name a dev set of this run \(sts_dev/stsb_dev, "):
        TrainConfig(sts_dev=["a/stsb_dev.jsonl", "b.jsonl"], best_metric="sts_dev")
