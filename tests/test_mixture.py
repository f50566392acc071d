"""Several datasets in one run: each batch from one dataset, each dataset with its own loss, batch size and prompts."""

from __future__ import annotations

import json
import re

import pytest

from mnr.batching import process_batches
from mnr.cli import main
from mnr.config import TrainConfig, load_toml
from mnr.errors import ConfigError
from mnr.mixture import plan
from mnr.model import SentenceEncoder
from mnr.recipe import batches_of_epoch, prepare
from mnr.settings import toml_value
from mnr.train import forward_backward

from .conftest import SENTENCES, write_jsonl
from .test_checkpoint import SLOW as SLOWED
from .test_checkpoint import assert_bitwise_equal, run_to_end, stop_at, weights
from .test_retrieval import beir_folder


@pytest.fixture
def pairs(tmp_path):
    rows = [{"anchor": f"question {i}: {SENTENCES[i % 24]}", "positive": f"answer {i}: {SENTENCES[(i + 7) % 24]}"}
            for i in range(20)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def datasets(nli_file, pairs, **nli) -> dict:
    """NLI (36 rows) with the softmax classifier, batches of 6; pairs (20 rows) with MNR, batches of 4."""
    return {"nli": {"data": [str(nli_file)], "loss": "softmax", "batch_size": 6, **nli},
            "pairs": {"data": [str(pairs)]}}


def config_file(path, tables: dict, **keys):
    lines = [f"{key} = {toml_value(value)}" for key, value in keys.items()]
    for name, table in tables.items():
        lines += [f"[datasets.{name}]"] + [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batches_never_mix_datasets_and_each_is_used_once_per_epoch(nli_file, pairs):
    config = TrainConfig(datasets=datasets(nli_file, pairs), batch_size=4, seed=3)
    s_data = prepare_data(config)
    nli, mnr = s_data.parts
    for epoch in range(3):
        batches = batches_of_epoch(s_data, config, epoch)
        owners = [s_data.part_of(b)[0] for b in batches]
        for b, k in zip(batches, owners, strict=True):  # every row of a batch is of the batch's dataset
            part = s_data.parts[k]
            assert all(part.offset <= i < part.offset + len(part.data) for i in b)
        # each dataset's own batches (its batch size, its seed), each once, in its own order
        for k, (part, duplicate_free) in enumerate([(nli, False), (mnr, True)]):
            own = process_batches(part.data, part.dataset.batch_size, 3 + k, epoch, duplicate_free=duplicate_free)
            assert [b for b, o in zip(batches, owners, strict=True) if o == k] == \
                [[i + part.offset for i in b] for b in own]
        assert owners != sorted(owners)  # interleaved, not one dataset after the other
    assert batches_of_epoch(s_data, config, 0) == batches_of_epoch(s_data, config, 0)
    assert batches_of_epoch(s_data, config, 0) != batches_of_epoch(s_data, config, 1)


def prepare_data(config):
    from mnr.recipe import training_data

    return training_data(config, None, None)


def test_round_robin_takes_one_of_each_in_turn_until_one_runs_out(nli_file, pairs):
    config = TrainConfig(datasets=datasets(nli_file, pairs), batch_size=4, dataset_sampling="round-robin")
    data = prepare_data(config)
    owners = [data.part_of(b)[0] for b in batches_of_epoch(data, config, 0)]
    assert owners == [0, 1] * 5  # pairs: 5 batches of 4; nli: 6 batches of 6, the last one unused


def test_each_dataset_trains_with_its_own_loss_batch_size_and_prompts(no_dropout_model, nli_file, pairs):
    """A step on a dataset's batch is that dataset's step alone: the two-dataset run's first batch of each equals the
    one-dataset run of it (same loss, same prompts); the NLI table gives its columns no prompt."""
    common = {"model": str(no_dropout_model), "max_seq_length": 32, "bf16": False, "batch_size": 4,
              "prompts": {"query": "query: ", "passage": "passage: "}}
    config = TrainConfig(datasets=datasets(nli_file, pairs, prompt_columns={}), **common)
    s = prepare(config)
    assert [t.prompts for t in s.tasks] == [["", ""], ["query: ", "passage: "]]
    assert [type(t.objective).__name__ for t in s.tasks] == ["SoftmaxLoss", "MultipleNegativesRankingLoss"]
    batches = batches_of_epoch(s.data, config, 0)
    alone = {0: TrainConfig(data=[str(nli_file)], loss="softmax", **(common | {"batch_size": 6, "prompts": {}})),
             1: TrainConfig(data=[str(pairs)], **common)}
    for k in (0, 1):
        batch = next(b for b in batches if s.data.part_of(b)[0] == k)
        assert len(batch) == (6 if k == 0 else 4)
        together = forward_backward(s, batch, config).item()
        single = prepare(alone[k])
        assert forward_backward(single, s.data.part_of(batch)[1], alone[k]).item() == pytest.approx(together,
                                                                                                     rel=1e-6)


def test_a_run_of_two_datasets_logs_and_describes_each(tiny_model_dir, nli_file, pairs, tmp_path, capsys):
    path = config_file(tmp_path / "two.toml", datasets(nli_file, pairs), model=str(tiny_model_dir),
                       max_seq_length=32, batch_size=4, epochs=2, save_every=0,
                       prompts={"query": "query: ", "passage": "passage: "})
    output = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output", str(output)]) == 0
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    config = TrainConfig.from_sources(str(output / "config.toml"))
    data = prepare_data(config)
    expected = [data.parts[data.part_of(b)[0]].name for epoch in range(2) for b in batches_of_epoch(data, config,
                                                                                                    epoch)]
    assert [e["dataset"] for e in log if "loss" in e] == expected
    summary = log[-1]["summary"]["datasets"]
    assert summary["nli"]["rows"] == 36 and summary["pairs"]["rows"] == 20
    assert summary["nli"]["steps"] == expected.count("nli") and summary["pairs"]["steps"] == expected.count("pairs")
    out = capsys.readouterr().out
    assert "dataset:     nli: 36 rows" in out and "dataset:     pairs: 20 rows" in out
    card = (output / "final" / "README.md").read_text()
    assert f"| dataset `nli` | `{nli_file}` (36 rows): 36 rows of (premise, hypothesis); SoftmaxLoss, batches of 6 |" \
        in card
    assert "| dataset `pairs` |" in card and "MultipleNegativesRankingLoss, batches of 4 |" in card
    assert "| batches | each from one dataset, proportional" in card
    assert "Trained with prompts before the texts of its columns (dataset `nli`: none; dataset `pairs`: anchor " \
           "`query`, positive `passage`; the prompts: `query` 'query: ', `passage` 'passage: ')" in card
    assert (output / "curves.png").exists()
    # config.toml keeps the tables, and repeats the run's settings
    saved = load_toml(output / "config.toml")
    assert saved["datasets"]["nli"] == {"data": [str(nli_file)], "loss": "softmax", "batch_size": 6}
    assert TrainConfig(**saved).datasets() == TrainConfig.from_sources(str(path)).datasets()


def test_mining_gives_negatives_to_the_datasets_of_pairs_only(tiny_model_dir, nli_file, tmp_path, capsys):
    """--mine-negatives beside another dataset: the (anchor, positive) pairs of a retrieval folder are mined, from
    its corpus, as `mnr mine` mines them alone; NLI premise/hypothesis rows for the classifier train as they are."""
    folder = beir_folder(tmp_path)
    alone = tmp_path / "alone.jsonl"
    settings = ["--range-max", "12", "--relative-margin", "0"]  # a random model ranks at random: no margin
    assert main(["mine", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(alone), "--num-negatives",
                 "1", *settings, "--device", "cpu"]) == 0
    capsys.readouterr()
    length = SentenceEncoder.load(str(tiny_model_dir)).max_seq_length
    path = config_file(tmp_path / "two.toml", {"nli": {"data": [str(nli_file)], "loss": "softmax", "batch_size": 6},
                                              "search": {"data": [f"{folder}:train"]}},
                       model=str(tiny_model_dir), max_seq_length=length, batch_size=4, save_every=0, bf16=False,
                       mine_negatives=1, mine_range_max=12, mine_relative_margin=0.0)
    run = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output", str(run)]) == 0
    assert (run / "mined-search.jsonl").read_text() == alone.read_text()
    assert not (run / "mined.jsonl").exists() and not (run / "mined-nli.jsonl").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    record = next(e["mining"] for e in log if "mining" in e)
    assert list(record["datasets"]) == ["search"] and record["datasets"]["search"]["kept"] == len(
        alone.read_text().splitlines())
    assert log[-1]["summary"]["datasets"]["nli"]["rows"] == 36
    card = (run / "final" / "README.md").read_text()
    assert "| hard negatives | 1 per row of `search`, mined before training: the base model's" in card
    assert "of (anchor, positive, negative); MultipleNegativesRankingLoss" in card
    assert "36 rows of (premise, hypothesis); SoftmaxLoss" in card


def test_a_dataset_that_says_mine_false_trains_on_its_pairs_as_they_are(tiny_model_dir, pairs, tmp_path):
    """Two datasets of pairs in a mined run: the one whose table says ``mine = false`` keeps its rows and columns,
    the other is mined from its own corpus."""
    folder = beir_folder(tmp_path)
    tables = {"search": {"data": [f"{folder}:train"]}, "pairs": {"data": [str(pairs)], "mine": False}}
    config = TrainConfig(model=str(tiny_model_dir), max_seq_length=32, batch_size=4, bf16=False, device="cpu",
                         mine_negatives=1, mine_range_max=12, mine_relative_margin=0.0, datasets=tables)
    setup = prepare(config, progress=False)
    search, kept = setup.data.parts
    assert search.mined and search.data.columns == ("anchor", "positive", "negative")
    assert not kept.mined and kept.data.columns == ("anchor", "positive")
    assert kept.data.rows == prepare_data(TrainConfig(datasets={"pairs": {"data": [str(pairs)]}})).parts[0].data.rows
    assert list(setup.mining["datasets"]) == ["search"]
    # without the opt-out both are mined
    both = prepare(TrainConfig(**{**config.flat(), "datasets": {**tables, "pairs": {"data": [str(pairs)]}}}),
                   progress=False)
    assert [p.mined for p in both.data.parts] == [True, True]


def test_named_data_flags_make_datasets(nli_file, pairs):
    config = TrainConfig(data=[f"nli={nli_file}", f"pairs={pairs}", f"nli={pairs}"], hard_negatives=True,
                         datasets={"nli": {"batch_size": 8}})
    found = config.datasets()
    assert [(d.name, d.specs, d.batch_size, d.hard_negatives) for d in found] == [
        ("nli", (str(nli_file), str(pairs)), 8, True), ("pairs", (str(pairs),), 32, True)]
    assert [d.name for d in plan([str(pairs)], {}, TrainConfig().dataset_defaults())] == [""]  # one, unnamed
    mixed = TrainConfig(data=[str(pairs), f"extra={nli_file}"]).datasets()
    assert [d.name for d in mixed] == ["data", "extra"]
    assert split_is_not_a_name("C:=odd.jsonl")


def split_is_not_a_name(spec):
    from mnr.mixture import split_name

    return split_name(spec) == ("", spec) and split_name("retrieval/scifact:train[100:]")[0] == ""


def test_a_stopped_run_of_two_datasets_resumes_to_the_same_weights(tiny_model_dir, nli_file, pairs, tmp_path):
    path = config_file(tmp_path / "two.toml", datasets(nli_file, pairs), model=str(tiny_model_dir),
                       max_seq_length=32, batch_size=4, epochs=3, save_every=3, lr=1e-3)
    whole = run_to_end(SLOWED, ["train", "--config", str(path), "--output", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    output = tmp_path / "stopped"
    stop_at(4, ["train", "--config", str(path), "--output", str(output)])
    resumed = run_to_end(SLOWED, ["train", "--config", str(path), "--output", str(output), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bitwise_equal(weights(output), weights(tmp_path / "whole"))

    def steps(run):
        return [(e["step"], e["dataset"], e["loss"]) for e in map(json.loads, (run / "log.jsonl").read_text()
                                                                   .splitlines()) if "loss" in e]
    assert steps(output) == steps(tmp_path / "whole")
    # another dataset split of the same rows is another run
    other = config_file(tmp_path / "other.toml", datasets(nli_file, pairs, batch_size=12), model=str(tiny_model_dir),
                        max_seq_length=32, batch_size=4, epochs=3, save_every=3, lr=1e-3)
    stop_at(2, ["train", "--config", str(path), "--output", str(tmp_path / "third")])
    refused = run_to_end(SLOWED, ["train", "--config", str(other), "--output", str(tmp_path / "third"), "--resume"])
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "the datasets' own settings ([datasets.NAME] tables) differ" in refused.stderr


@pytest.mark.parametrize("tables, flags, message", [
    ({"nli": {"data": ["{nli}"], "batch": 6}}, [], r"\[datasets.nli\]: unknown key 'batch'"),
    ({"nli": {"loss": "softmax"}}, [], r"\[datasets.nli\]: no data"),
    ({"pairs": {"data": ["{pairs}"], "loss": "softmax"}, "nli": {"data": ["{nli}"]}}, [],
     r"dataset 'pairs' \(--loss softmax\): .*premise"),
    ({"pairs": {"data": ["{pairs}"], "batch_size": 64}, "nli": {"data": ["{nli}"]}}, [],
     r"dataset 'pairs': .*not enough distinct texts for one batch of 64"),
    ({"pairs": {"data": ["{pairs}"]}, "nli": {"data": ["{nli}"]}}, ["--mine-negatives", "1", "--loss", "softmax"],
     r"--mine-negatives adds negatives to ranking rows"),
    ({"nli": {"data": ["{nli}"], "hard_negatives": True}, "other": {"data": ["{nli}"], "loss": "softmax"}},
     ["--mine-negatives", "1"], r"--mine-negatives: no dataset to mine, of \(anchor, positive\) pairs with a "
                                r"ranking loss and not mine = false: nli has \(anchor, positive, negative\) for "
                                r"--loss mnr; other has \(premise, hypothesis\) for --loss softmax$"),
    ({"pairs": {"data": ["{pairs}"], "mine": False}, "nli": {"data": ["{nli}"], "hard_negatives": True}},
     ["--mine-negatives", "1"], r"no dataset to mine, .* pairs has \(anchor, positive\) for --loss mnr, mine = "
                                r"false; nli has"),
    ({"pairs": {"data": ["{pairs}"], "mine": True}, "nli": {"data": ["{nli}"]}}, [],
     r"\[datasets.pairs\] mine = true: mining is the run's --mine-negatives N"),
    ({"pairs": {"data": ["{pairs}"]}, "nli": {"data": ["{nli}"], "loss": "softmax", "mine": True}},
     ["--mine-negatives", "1"], r"\[datasets.nli\] mine = true: --loss softmax trains on labelled pairs"),
    ({"pairs": {"data": ["{pairs}"]}, "nli": {"data": ["{nli}"], "hard_negatives": True, "mine": True}},
     ["--mine-negatives", "1"], r"\[datasets.nli\] mine = true: its rows already have negatives \(anchor, "
                                r"positive, negative\)"),
    ({"nli": {"data": ["{nli}"], "loss": "softmax", "hard_negatives": True}, "pairs": {"data": ["{pairs}"]}}, [],
     r"\[datasets.nli\] --hard-negatives adds negatives to ranking rows; --loss softmax"),
    ({"pairs": {"data": ["{pairs}"], "prompt_columns": {"anchor": "q"}}, "nli": {"data": ["{nli}"]}},
     ["--prompts", "query=q: "], r"\[datasets.pairs\] --prompt-columns uses prompts --prompts does not name \(q\)"),
], ids=["unknown-key", "no-data", "columns-do-not-fit-the-loss", "too-small", "mining-softmax", "nothing-to-mine",
        "all-opted-out", "mine-without-mining", "mine-a-classifier", "mine-triplets", "softmax-negatives",
        "unknown-prompt"])
def test_bad_datasets_are_refused_before_anything_is_written(tiny_model_dir, nli_file, pairs, tmp_path, capsys,
                                                             tables, flags, message):
    filled = {name: {k: [v.format(nli=nli_file, pairs=pairs) for v in value] if k == "data" else value
                     for k, value in table.items()} for name, table in tables.items()}
    path = config_file(tmp_path / "bad.toml", filled, model=str(tiny_model_dir), batch_size=4)
    output = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output", str(output), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


def test_dataset_tables_are_checked_in_code_too(nli_file):
    with pytest.raises(ConfigError, match=r"\[datasets.a b\]: a dataset's name"):
        TrainConfig(datasets={"a b": {"data": [str(nli_file)]}})
    with pytest.raises(ConfigError, match=r"\[datasets.nli\]: --batch-size must be an integer"):
        TrainConfig(datasets={"nli": {"data": [str(nli_file)], "batch_size": "big"}})
    with pytest.raises(ConfigError, match="--dataset-sampling must be proportional or round-robin"):
        TrainConfig(dataset_sampling="random")


def test_the_guide_masks_the_datasets_whose_loss_ranks_candidates(tiny_model_dir, nli_file, pairs, tmp_path):
    """--guide with an NLI softmax dataset beside MNR pairs: it embeds the pairs only and has a say in their steps."""
    path = config_file(tmp_path / "two.toml", datasets(nli_file, pairs), model=str(tiny_model_dir),
                       max_seq_length=32, batch_size=4, save_every=0, guide=str(tiny_model_dir), guide_margin=0.02)
    output = tmp_path / "run"
    assert main(["train", "--config", str(path), "--output", str(output)]) == 0
    steps = [e for e in map(json.loads, (output / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert {e["dataset"] for e in steps} == {"nli", "pairs"}
    assert all(("guide_left_out" in e) == (e["dataset"] == "pairs") for e in steps)
    s = prepare(TrainConfig.from_sources(str(path), output="unused"))
    assert s.guide.ids[0] is None and s.guide.ids[1].shape == (20, 2)
    assert len(s.guide.embeddings) == 40  # the pairs' 40 distinct texts, not NLI's
