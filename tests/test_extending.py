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
    settings = ()

    @classmethod
    def from_config(cls, config, dim, processes):
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
