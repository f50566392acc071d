from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

from mnr.config import TrainConfig, load_toml
from mnr.config import defaults as config_defaults
from mnr.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"best-nli.toml", "nli-bert-base.toml", "nli-minilm-cpu.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_differs_from_defaults_only_where_it_says(path):
    values = load_toml(path)
    config = TrainConfig.from_sources(str(path))
    defaults = config_defaults()
    for key, value in values.items():
        assert config.flat()[key] == value
        assert value != defaults[key], f"{path.name}: {key} repeats the default"
    assert path.read_text().startswith("#") and "mnr train --config configs/" in path.read_text()


def test_the_classic_sbert_recipe():
    config = TrainConfig.from_sources("configs/nli-bert-base.toml")
    assert config.model.model == "google-bert/bert-base-uncased"
    assert config.data.data == ["hf:stanfordnlp/snli:train", "hf:nyu-mll/multi_nli:train"]
    t = config.training
    assert (t.loss, t.batch_size, t.lr, t.warmup_ratio, t.epochs, config.model.max_seq_length,
            config.model.pooling) == ("mnr", 32, 2e-5, 0.1, 1, 128, "mean")


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('batch_size = 64\nlr = 3e-5\ndata = ["a.jsonl"]\n')
    config = TrainConfig.from_sources(str(path), batch_size=16, lr=None)
    assert (config.training.batch_size, config.training.lr, config.data.data) == (16, 3e-5, ["a.jsonl"])


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
    from mnr.config import keys

    for key, (_, f) in keys().items():
        assert isinstance(f.metadata.get("weights"), bool), f"{key}: declare weights=True or False in setting(...)"
    config = TrainConfig(mine_negatives=1, symmetric=True)
    changing = {key for key in config.flat() if key in keys() and keys()[key][1].metadata["weights"]}
    assert set(config.weight_settings()) == changing - {"data"}  # the data are compared by content, not by name
    assert {"lr", "batch_size", "seed", "loss", "model", "scale", "mine_range_max"} <= set(config.weight_settings())
    assert not {"output", "resume", "eval_steps", "save_every"} & set(config.weight_settings())


def test_one_file_where_a_list_is_expected_is_a_list_of_one(tmp_path):
    """config.toml files written before --sts-dev/--ir-dev took several files hold one string."""
    path = tmp_path / "old.toml"
    path.write_text('data = "one.jsonl"\nsts_dev = "sts.jsonl"\nir_dev = ""\n')
    config = TrainConfig.from_sources(str(path))
    assert (config.data.data, config.eval.sts_dev, config.eval.ir_dev) == (["one.jsonl"], ["sts.jsonl"], [])


def test_dev_sets_are_named_by_kind_then_by_file():
    one = TrainConfig(sts_dev=["sts/stsb_dev.jsonl.gz"], ir_dev=["retrieval/scifact:train[:100]"])
    assert one.eval.dev_sets() == {"sts_dev": ("sts", "sts/stsb_dev.jsonl.gz"),
                                   "ir_dev": ("retrieval", "retrieval/scifact:train[:100]")}
    several = TrainConfig(sts_dev=["sts/stsb_dev.jsonl.gz", "other/stsb_dev.csv", "sick.tsv"],
                          ir_dev=["retrieval/scifact:train[:100]", "beir/nfcorpus:dev"],
                          best_metric="ir_dev/nfcorpus:recall@100")
    assert list(several.eval.dev_sets()) == ["sts_dev/stsb_dev", "sts_dev/stsb_dev-2", "sts_dev/sick", "ir_dev/scifact",
                                        "ir_dev/nfcorpus"]
    with pytest.raises(ConfigError, match=r"--best-metric must name a dev set of this run \(sts_dev/stsb_dev, "):
        TrainConfig(sts_dev=["a/stsb_dev.jsonl", "b.jsonl"], best_metric="sts_dev")


# config.toml as mnr wrote it before settings were grouped: every key of every component, at its default
OLD_CONFIG_TOML = """\
# resolved mnr training config: `mnr train --config THIS_FILE --output NEW_DIR` repeats the run
model = "sentence-transformers/all-MiniLM-L6-v2"
data = ["a.jsonl"]
data_dir = ""
columns = ""
output = "o"
max_examples = 0
strict_qrels = false
loss = "softmax"
hard_negatives = false
mine_negatives = 0
mine_corpus = ""
mine_model = ""
mine_range_max = 50
mine_relative_margin = 0.05
symmetric = false
scale = 20.0
pooling = ""
max_seq_length = 0
layout = "auto"
batch_size = 32
mini_batch_size = 0
epochs = 1
lr = 2e-05
warmup_ratio = 0.1
weight_decay = 0.01
max_grad_norm = 1.0
seed = 0
# bf16: not set (decided at run time)
device = "auto"
sts_dev = []
ir_dev = []
ignore_identical_ids = false
best_metric = ""
eval_steps = 500
tensorboard = false
save_every = 500
keep_checkpoints = 2
resume = false
nproc = 1
"""


def test_a_config_toml_written_before_settings_were_grouped_still_loads(tmp_path):
    """Old files hold the other loss's settings and mining's at their defaults of the time, with mining off."""
    path = tmp_path / "config.toml"
    path.write_text(OLD_CONFIG_TOML)
    config = TrainConfig.from_sources(str(path))
    assert (config.training.loss, config.mining, config.data.data) == ("softmax", None, ["a.jsonl"])
    assert config == TrainConfig(loss="softmax", data=["a.jsonl"], output="o")
    mined = TrainConfig.from_sources(str(path), loss="mnr", mine_negatives=1)
    assert (mined.mining.range_max, mined.mining.relative_margin) == (50, 0.05)  # as the file says


def test_a_flat_key_read_as_an_attribute_names_its_group():
    config = TrainConfig(lr=3e-5, mine_negatives=2, symmetric=True)
    assert (config.training.lr, config.mining.num_negatives, config.loss.symmetric) == (3e-5, 2, True)
    for key, where in (("lr", "config.training.lr"), ("mine_range_max", "config.mining.range_max"),
                       ("scale", "config.loss.scale"), ("sts_dev", "config.eval.sts_dev")):
        with pytest.raises(AttributeError, match=f"settings are grouped, read {where}"):
            getattr(config, key)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        config.nope  # noqa: B018

