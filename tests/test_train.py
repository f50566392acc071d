"""The real CLI on a tiny random BERT: the whole pipeline in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from mnr.batching import epoch_batches
from mnr.cli import main
from mnr.data import load_training_set
from mnr.losses import MultipleNegativesRankingLoss
from mnr.model import SentenceEncoder

from .conftest import SENTENCES, write_jsonl


def train_args(model, data, output, *extra):
    return ["train", "--model", str(model), "--data", *map(str, data), "--output", str(output),
            "--batch-size", "4", "--max-seq-length", "32", *extra]


def read_log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def test_train_writes_final_best_log_and_config(tiny_model_dir, nli_file, sts_file, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], output, "--sts-dev", str(sts_file), "--eval-steps", "2",
                           "--epochs", "2")) == 0
    assert "final model:" in capsys.readouterr().out
    assert {p.name for p in output.iterdir()} == {"final", "best", "checkpoints", "log.jsonl", "config.toml",
                                                  "curves.png"}
    log = read_log(output)
    losses = [e["loss"] for e in log if "loss" in e]
    evals = [e["step"] for e in log if "sts_dev" in e]
    assert len(losses) == 6  # 12 pairs / batch 4 = 3 steps, 2 epochs
    assert evals == [0, 2, 4, 6]
    lrs = [e["lr"] for e in log if "lr" in e]
    assert lrs[0] == pytest.approx(2e-5) and lrs[-1] == pytest.approx(2e-5 / 5)  # 1 warm-up step, then decay
    assert (output / "final" / "mnr_config.toml").exists()


@pytest.mark.parametrize("seed", [1, 11], ids=["a-later-epoch-longer", "a-later-epoch-shorter"])
def test_the_schedule_counts_every_epochs_batches(tiny_model_dir, tmp_path, seed):
    """Rows that clash with every batch left wait for one of their own, so epochs can differ by a batch: the
    learning rate must still decay over the steps that are taken, to its last positive value, never below."""
    # (anchor, positive) sentence numbers: anchors 0 and 5 have four rows each, sharing positives with each
    # other and with the rest, so no order fits the 12 rows into 3 batches of 4, and some need a 5th
    grid = [(0, 0), (0, 1), (0, 3), (0, 5), (1, 4), (2, 5), (3, 3), (4, 5), (5, 0), (5, 1), (5, 3), (5, 5)]
    rows = [{"anchor": SENTENCES[a], "positive": SENTENCES[12 + p]} for a, p in grid]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = load_training_set([str(pairs)])
    counts = [len(epoch_batches(data, 4, seed=seed, epoch=e)) for e in range(3)]
    assert len(set(counts)) > 1, counts  # the case under test: not every epoch has epoch 0's batch count
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [pairs], output, "--epochs", "3", "--seed", str(seed))) == 0
    log = read_log(output)
    steps = [e["step"] for e in log if "loss" in e]
    lrs = [e["lr"] for e in log if "lr" in e]
    total = sum(counts)
    assert steps == list(range(1, total + 1))
    assert log[-1]["done"] and log[-1]["step"] == total
    warmup = -(-total // 10)  # --warmup-ratio 0.1, rounded up
    assert min(lrs) > 0 and lrs[-1] == pytest.approx(2e-5 / (total - warmup))  # the linear decay's last step


def test_first_loss_is_the_mnr_loss_of_the_first_batch(no_dropout_model, nli_file, tmp_path):
    """Golden check of the wiring data -> batches -> encoder -> loss, recomputed independently."""
    output = tmp_path / "run"
    assert main(train_args(no_dropout_model, [nli_file], output, "--seed", "7", "--no-bf16")) == 0  # fp32 as below
    first = next(e["loss"] for e in read_log(output) if "loss" in e)

    data = load_training_set([str(nli_file)])
    batch = epoch_batches(data, 4, seed=7, epoch=0)[0]
    encoder = SentenceEncoder.load(str(no_dropout_model), max_seq_length=32)
    with torch.no_grad():
        anchors = torch.from_numpy(encoder.encode([data.rows[i][0] for i in batch]))
        positives = torch.from_numpy(encoder.encode([data.rows[i][1] for i in batch]))
    assert first == pytest.approx(MultipleNegativesRankingLoss()([anchors, positives]).item(), rel=1e-5)


def test_training_is_reproducible_and_learns(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl",
                        [{"anchor": SENTENCES[i], "positive": SENTENCES[i] + " Indeed."} for i in range(24)])
    runs = []
    for name in ("a", "b"):
        assert main(train_args(tiny_model_dir, [pairs], tmp_path / name, "--epochs", "8", "--lr", "1e-3",
                               "--batch-size", "8")) == 0
        runs.append([e["loss"] for e in read_log(tmp_path / name) if "loss" in e])
    assert runs[0] == runs[1], "same seed, different losses"
    assert np.mean(runs[0][-3:]) < 0.5 * np.mean(runs[0][:3]), runs[0]


@pytest.mark.parametrize("extra", [["--hard-negatives"], ["--symmetric"], ["--loss", "softmax"],
                                   ["--pooling", "cls", "--bf16"]])
def test_other_objectives_train(tiny_model_dir, nli_file, tmp_path, extra):
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], output, *extra)) == 0
    losses = [e["loss"] for e in read_log(output) if "loss" in e]
    # 12 premises: 12 pairs or triplets in 3 duplicate-free batches; softmax trains on all 36 labelled pairs
    assert len(losses) == (9 if "softmax" in extra else 3) and all(np.isfinite(losses))
    if "--pooling" in extra:
        assert SentenceEncoder.load(str(output / "final")).pooling == "cls"


def test_a_trained_model_loads_in_sentence_transformers_and_transformers(tiny_model_dir, nli_file, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], output)) == 0
    ours = SentenceEncoder.load(str(output / "final"))
    theirs = sentence_transformers.SentenceTransformer(str(output / "final"), device="cpu")
    assert np.abs(theirs.encode(SENTENCES) - ours.encode(SENTENCES)).max() < 1e-5
    base = SentenceEncoder.load(str(tiny_model_dir))
    assert np.abs(base.encode(SENTENCES) - ours.encode(SENTENCES)).max() > 1e-4, "training changed nothing"
    assert isinstance(transformers.AutoModel.from_pretrained(output / "final"), transformers.BertModel)


def test_existing_finished_run_is_not_overwritten(tiny_model_dir, nli_file, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], output)) == 0
    assert main(train_args(tiny_model_dir, [nli_file], output)) == 2
    assert "already holds a finished run" in capsys.readouterr().err


# ------------------------------------------------------------------ bad input through the CLI


BAD_INPUTS = {
    "malformed line": ('{"anchor": "a", "positive": "b"}\n{"anchor": \n', ":2: malformed JSON"),
    "missing column": ('{"anchor": "a", "positive": "b"}\n{"anchor": "c"}\n', ":2: missing column 'positive'"),
    "unknown label": ('{"premise": "a", "hypothesis": "b", "label": "yes"}\n', ":1: unknown label 'yes'"),
    "empty text": ('{"anchor": "a", "positive": ""}\n', ":1: empty text in column 'positive'"),
    "empty file": ("", ": empty file"),
    "too few texts": ("".join(f'{{"anchor": "q", "positive": "p{i}"}}\n' for i in range(9)),
                      ": not enough distinct texts for one batch of 4"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_training_data_fails_clearly_and_writes_nothing(tiny_model_dir, tmp_path, capsys, case):
    text, message = BAD_INPUTS[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    output = tmp_path / "out"
    assert main(train_args(tiny_model_dir, [path], output)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mnr train: error: {path}") and message in err, err
    assert "Traceback" not in err
    assert not output.exists(), "an output directory was created for a run that never started"


def test_bad_sts_dev_file_fails_before_training(tiny_model_dir, nli_file, tmp_path, capsys):
    sts = tmp_path / "sts.jsonl"
    sts.write_text('{"sentence1": "a", "sentence2": "b", "score": "x"}\n')
    assert main(train_args(tiny_model_dir, [nli_file], tmp_path / "out", "--sts-dev", str(sts))) == 2
    assert f"{sts}:1: score must be a number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_model_fails_clearly(nli_file, tmp_path, capsys):
    assert main(train_args("./no/such/model", [nli_file], tmp_path / "out")) == 2
    assert "./no/such/model: no such model directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_flag_value_fails_clearly(tiny_model_dir, nli_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, [nli_file], tmp_path / "out", "--lr", "-1")) == 2
    assert "--lr must be a positive number, got -1.0" in capsys.readouterr().err


# ------------------------------------------------------------------ eval and encode


def test_eval_prints_a_comparison_table(tiny_model_dir, nli_file, sts_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, [nli_file], tmp_path / "run")) == 0
    capsys.readouterr()
    assert main(["eval", str(tiny_model_dir), str(tmp_path / "run" / "final"), "--sts", str(sts_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model | sts Spearman | sts Pearson |"
    assert lines[2].startswith(f"| {tiny_model_dir} | ") and lines[3].startswith(f"| {tmp_path / 'run' / 'final'} | ")


def test_eval_without_an_sts_file(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("MNR_DATA_DIR", raising=False)
    assert main(["eval", str(tiny_model_dir)]) == 2
    assert "--sts: no STS file given" in capsys.readouterr().err


def test_encode_writes_npy(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[:5]) + "\n")
    assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(tmp_path / "e.npy")]) == 0
    expected = SentenceEncoder.load(str(tiny_model_dir)).encode(SENTENCES[:5])
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy", "texts.txt"]


def test_encode_rejects_empty_lines(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("one\n\nthree\n")
    assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(tmp_path / "e.npy")]) == 2
    assert f"{texts}:2: empty line" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()
