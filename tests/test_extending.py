"""Adding a loss or a kind of data is one small class: the trainer asks it what it needs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mnr import data as mnr_data
from mnr import losses
from mnr.batching import epoch_batches
from mnr.cli import main
from mnr.data import RANKING, TrainingSet, load_training_set
from mnr.model import SentenceEncoder

from .conftest import SENTENCES, write_jsonl


class AlignmentLoss(torch.nn.Module):
    """A toy loss: 1 - cosine(anchor, positive), no negatives at all, so batches may repeat texts."""

    input = RANKING
    in_batch_negatives = False
    cacheable = True
    Settings = losses.NoSettings

    @classmethod
    def from_settings(cls, settings, dim, processes):
        return cls()

    def forward(self, columns, labels=None):
        return (1 - F.cosine_similarity(columns[0], columns[1])).mean()


def logged_losses(output):
    return [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_a_new_loss_plugs_in_without_touching_the_trainer(no_dropout_model, tmp_path, monkeypatch):
    monkeypatch.setitem(losses.LOSSES, "alignment", AlignmentLoss)
    # "q" repeats in every row: MNR would refuse these rows, a loss without in-batch negatives takes them
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": "q", "positive": SENTENCES[i]} for i in range(8)])
    output = tmp_path / "run"
    assert main(["train", "--model", str(no_dropout_model), "--data", str(pairs), "--output", str(output),
                 "--batch-size", "4", "--loss", "alignment", "--max-seq-length", "32",
                 "--no-bf16"]) == 0  # fp32, as the reference below is computed
    first = logged_losses(output)[0]

    data = load_training_set([str(pairs)])
    batch = epoch_batches(data, 4, seed=0, epoch=0, duplicate_free=False)[0]
    encoder = SentenceEncoder.load(str(no_dropout_model), max_seq_length=32)
    anchors = torch.from_numpy(encoder.encode([data.rows[i][0] for i in batch]))
    positives = torch.from_numpy(encoder.encode([data.rows[i][1] for i in batch]))
    assert first == pytest.approx(AlignmentLoss()([anchors, positives]).item(), rel=1e-5)
    # and the loss's settings are its own: MNR's --symmetric is refused for it
    assert main(["train", "--model", str(no_dropout_model), "--data", str(pairs), "--output", str(tmp_path / "x"),
                 "--loss", "alignment", "--symmetric"]) == 2


class QuestionAnswerKind:
    """A toy kind of file: (question, answer) columns become (anchor, positive) rows."""

    name = "question, answer"

    def matches(self, columns):
        return {"question", "answer"} <= columns

    def training_set(self, spec, records, wants, hard_negatives):
        rows = [(record["question"], record["answer"]) for _, record in records]
        return TrainingSet(("anchor", "positive"), rows, {spec: len(rows)})


def test_a_new_kind_of_data_plugs_in(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(mnr_data, "KINDS", [QuestionAnswerKind(), *mnr_data.KINDS])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": SENTENCES[i], "answer": SENTENCES[i + 12]}
                                              for i in range(12)])
    assert load_training_set([str(qa)]).rows[0] == (SENTENCES[0], SENTENCES[12])
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(qa), "--output", str(tmp_path / "run"),
                 "--batch-size", "4", "--max-seq-length", "32"]) == 0
    assert len(logged_losses(tmp_path / "run")) == 3


@pytest.fixture
def prefix_loss():
    """tests/prefix_loss.py imported as a user's plugin would be (its import registers the loss), and removed
    after the test, so no other test sees it."""
    import importlib
    import sys

    sys.modules.pop("tests.prefix_loss", None)
    module = importlib.import_module("tests.prefix_loss")
    yield module
    losses.LOSSES.pop("prefix", None)
    sys.modules.pop("tests.prefix_loss", None)


def test_a_loss_with_a_list_of_integers_setting_plugs_in_from_one_file(prefix_loss, no_dropout_model, tmp_path,
                                                                      capsys):
    """The loss's file alone gives it a flag, a TOML key, a check and a place in the run's records: config.py and
    train.py know nothing of it."""
    import re
    from pathlib import Path

    from mnr.config import TrainConfig
    from mnr.errors import ConfigError

    source = Path(__file__).resolve().parent.parent / "src" / "mnr"
    core = (source / "config.py").read_text() + (source / "train.py").read_text()
    assert "prefix" not in core.lower() and not re.search(r"(?<![\w-])dims\b", core)  # the loss nor its setting
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]}
                                                   for i in range(12)])
    common = ["train", "--model", str(no_dropout_model), "--data", str(pairs), "--batch-size", "4",
              "--max-seq-length", "32", "--no-bf16", "--loss", "prefix"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--dims DIMS [DIMS ...]" in capsys.readouterr().out
    # the flag: a list of integers, checked before any model loads
    assert main([*common, "--dims", "8", "16", "--output", str(tmp_path / "bad")]) == 2
    assert "--dims must be decreasing, got [8, 16]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--dims", "8", "x", "--output", str(tmp_path / "bad")])
    assert "--dims: invalid int value: 'x'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["train", "--model", str(no_dropout_model), "--data", str(pairs), "--dims", "8",
                 "--output", str(tmp_path / "bad")]) == 2
    assert "--dims applies to --loss prefix only, got --loss mnr" in capsys.readouterr().err
    # the TOML key, and its check there
    path = tmp_path / "c.toml"
    path.write_text('loss = "prefix"\ndims = [16, "8"]\n')
    with pytest.raises(ConfigError, match=r"c.toml: --dims must be a list of integers, got \[16, '8'\]"):
        TrainConfig.from_sources(str(path))
    path.write_text('loss = "prefix"\ndims = [24, 4]\n')
    assert TrainConfig.from_sources(str(path)).loss.dims == [24, 4]
    # a run: the loss is the mean of MNR over the prefixes, and the run's records keep the setting
    output = tmp_path / "run"
    assert main([*common, "--dims", "16", "8", "--output", str(output)]) == 0
    assert "dims = [16, 8]" in (output / "config.toml").read_text()
    assert TrainConfig.from_sources(str(output / "config.toml")).loss.dims == [16, 8]
    assert "prefix" in (output / "final" / "README.md").read_text().lower()
    data = load_training_set([str(pairs)])
    batch = epoch_batches(data, 4, seed=0, epoch=0)[0]
    encoder = SentenceEncoder.load(str(no_dropout_model), max_seq_length=32)
    columns = [torch.from_numpy(encoder.encode([data.rows[i][c] for i in batch])) for c in (0, 1)]
    mnr = losses.MultipleNegativesRankingLoss()
    expected = (mnr([c[:, :16] for c in columns]) + mnr([c[:, :8] for c in columns])) / 2
    assert logged_losses(output)[0] == pytest.approx(expected.item(), rel=1e-5)
    # the setting changes the weights: a checkpoint resumes only under the same dims
    from mnr.rundir import fingerprint, mismatches

    saved, now = (fingerprint(data, TrainConfig(loss="prefix", dims=dims), 1) for dims in ([16, 8], [16, 4]))
    assert mismatches(saved, now) == ["--dims was [16, 8], now [16, 4]"]
