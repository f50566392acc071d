"""Matryoshka training: the loss on every prefix of the embedding, one encoder pass for all of them."""

from __future__ import annotations

import json

import pytest
import torch

from mnr.cli import main
from mnr.config import TrainConfig
from mnr.data import load_training_set
from mnr.errors import ConfigError
from mnr.losses import Matryoshka, MultipleNegativesRankingLoss
from mnr.model import SentenceEncoder
from mnr.recipe import batches_of_epoch

from .conftest import SENTENCES, write_jsonl


def logged_losses(output):
    return [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]}
                                                  for i in range(12)])


def refused_before_writing(model, data, tmp_path, capsys, flags, message):
    """mnr train with ``flags`` exits with 2, says ``message`` (a regular expression), and writes nothing."""
    import re

    output = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
                 *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not output.exists()


def run(model, data, output, *extra):
    # fp32: the references below are computed in fp32
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
                 "--max-seq-length", "32", "--save-every", "0", "--no-bf16", *extra]) == 0
    return logged_losses(output)


def test_with_one_dimension_the_models_own_it_is_the_plain_loss(no_dropout_model, pairs, tmp_path):
    columns = [torch.randn(4, 32), torch.randn(4, 32), torch.randn(4, 32)]
    mnr = MultipleNegativesRankingLoss()
    assert torch.equal(Matryoshka(mnr, [32])(columns), mnr(columns))
    plain = run(no_dropout_model, pairs, tmp_path / "plain")
    one = run(no_dropout_model, pairs, tmp_path / "one", "--matryoshka-dims", "32")
    assert one == plain  # every step, exactly
    weights = [SentenceEncoder.load(str(tmp_path / name / "final")).state_dict() for name in ("plain", "one")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_loss_is_the_weighted_sum_over_the_prefixes(no_dropout_model, pairs, tmp_path):
    output = tmp_path / "run"
    first = run(no_dropout_model, pairs, output, "--matryoshka-dims", "32", "16", "4", "--matryoshka-weights", "1",
                "0.5", "2")[0]
    config = TrainConfig(data=[str(pairs)], batch_size=4)
    data = load_training_set([str(pairs)])
    batch = batches_of_epoch(data, config, 0)[0]
    encoder = SentenceEncoder.load(str(no_dropout_model), max_seq_length=32)
    columns = [torch.from_numpy(encoder.encode([data.rows[i][c] for i in batch])) for c in (0, 1)]
    mnr = MultipleNegativesRankingLoss()
    expected = mnr(columns) + 0.5 * mnr([c[:, :16] for c in columns]) + 2 * mnr([c[:, :4] for c in columns])
    assert first == pytest.approx(expected.item(), rel=1e-5)
    card = (output / "final" / "README.md").read_text()
    assert "| Matryoshka | the loss also on the first 32, 16, 4 values of each embedding, weights 1, 0.5, 2 |" in card
    assert "matryoshka_dims = [32, 16, 4]" in (output / "config.toml").read_text()


def test_gradient_caching_with_matryoshka_is_the_plain_step(tiny_model_dir, nli_file, tmp_path):
    """One backward through the encoder for every prefix: a mini-batch holding the whole batch (4 rows x 3
    columns) is exactly the plain step, dropout masks included."""
    logs = {}
    for name, extra in (("plain", []), ("cached", ["--mini-batch-size", "12"])):
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(nli_file), "--output",
                     str(tmp_path / name), "--batch-size", "4", "--hard-negatives", "--matryoshka-dims", "32", "8",
                     *extra]) == 0
        logs[name] = logged_losses(tmp_path / name)
    assert logs["cached"] == pytest.approx(logs["plain"], rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--matryoshka-dims", "16", "32"], "--matryoshka-dims must be decreasing, each once"),
    (["--matryoshka-dims", "32", "32"], "--matryoshka-dims must be decreasing, each once"),
    (["--matryoshka-dims", "16", "0"], "--matryoshka-dims must be positive"),
    (["--matryoshka-dims", "64", "16"], "--matryoshka-dims: 64 is above the model's dimension, 32"),
    (["--matryoshka-dims", "32", "16", "--matryoshka-weights", "1"],
     r"--matryoshka-weights must give one weight per --matryoshka-dims value \(2\)"),
    (["--matryoshka-dims", "32", "--matryoshka-weights", "-1"], "--matryoshka-weights must be positive numbers"),
    (["--matryoshka-dims", "32", "--loss", "softmax"], "--matryoshka-dims: --loss softmax's classifier"),
])
def test_bad_matryoshka_settings_fail_before_anything_is_written(tiny_model_dir, nli_file, tmp_path, capsys, flags,
                                                                 message):
    refused_before_writing(tiny_model_dir, nli_file, tmp_path, capsys, flags, message)
    with pytest.raises(ConfigError, match="--matryoshka-dims must be a list of integers"):
        TrainConfig(matryoshka_dims=[32, "16"])


def test_dev_sets_are_scored_at_every_dimension_and_best_can_be_chosen_by_one(no_dropout_model, pairs, sts_file,
                                                                               tmp_path):
    output = tmp_path / "run"
    run(no_dropout_model, pairs, output, "--matryoshka-dims", "32", "8", "--sts-dev", str(sts_file), "--eval-steps",
        "1", "--best-metric", "sts_dev:spearman@8d")
    evaluations = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()
                   if '"sts_dev"' in line]
    assert len(evaluations) == 4  # steps 0 (the base model) to 3
    for e in evaluations:
        scores = e["sts_dev"]
        assert set(scores) == {"spearman", "pearson", "spearman@32d", "spearman@8d"}
        assert scores["spearman@32d"] == scores["spearman"]  # the whole embedding
    best = max(evaluations, key=lambda e: e["sts_dev"]["spearman@8d"])
    card = (output / "best" / "README.md").read_text()
    assert f"This is the model of step {best['step']} of 3, the best on sts_dev spearman@8d" in card
    assert "sts_dev spearman@8d" in card and "truncate_dim=8" in card


def test_scores_at_a_dimension_are_the_scores_of_the_cut_embeddings(tiny_model_dir, sts_file, tmp_path):
    from mnr.evaluate import STSEvaluator, evaluate_sts, load_sts
    from mnr.retrieval import RetrievalEvaluator, encode_for_search, load_retrieval, mean_metrics

    from .test_retrieval import beir_folder

    encoder = SentenceEncoder.load(str(tiny_model_dir))
    examples = load_sts(str(sts_file))
    scores = STSEvaluator(examples, dims=[8])(encoder)

    class Cut:  # the encoder, its embeddings cut to 8 values
        dim, device = 8, encoder.device

        def encode(self, texts, **kwargs):
            return encoder.encode(texts, **kwargs, dim=8)

    assert scores["spearman@8d"] == pytest.approx(evaluate_sts(Cut(), examples)["spearman"], abs=1e-9)
    data = load_retrieval(f"{beir_folder(tmp_path)}:test")
    evaluator = RetrievalEvaluator(data, dims=[32, 8])
    scores = evaluator(encoder)
    assert scores["ndcg@10@32d"] == scores["ndcg@10"]
    queries = encode_for_search(encoder, [data.queries[q] for q in data.qrels], 64, False, dim=8)
    passages = encode_for_search(encoder, data.passages, 64, False, dim=8)
    assert scores["ndcg@10@8d"] == pytest.approx(
        mean_metrics(evaluator._ranked(queries, passages, encoder), data.qrels)["ndcg@10"], abs=1e-9)


def test_mnr_eval_and_encode_take_a_dimension(tiny_model_dir, sts_file, tmp_path, capsys):
    import numpy as np
    from sentence_transformers import SentenceTransformer

    assert main(["eval", str(tiny_model_dir), "--sts", str(sts_file), "--dims", "16", "8", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "| model | sts Spearman | sts Pearson | sts Spearman @16d | sts Spearman @8d |" in captured.out
    assert "this model was not trained at 16 dimensions" in captured.err  # allowed: plain truncation works, worse
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[:6]) + "\n")
    output = tmp_path / "e.npy"
    assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(output), "--dim", "16",
                 "--normalize", "--device", "cpu"]) == 0
    ours = np.load(output)
    assert ours.shape == (6, 16)
    theirs = SentenceTransformer(str(tiny_model_dir), device="cpu", truncate_dim=16).encode(
        SENTENCES[:6], normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(tmp_path / "x.npy"),
                 "--dim", "64"]) == 2
    assert "--dim 64: the model's embeddings have 32 values" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_mnr_mine_ranks_with_the_first_values_it_is_given(tiny_model_dir, tmp_path, capsys):
    from mnr.mine import MiningSettings, mine, mining_corpus

    from .test_retrieval import beir_folder

    folder = beir_folder(tmp_path)
    common = ["mine", str(tiny_model_dir), "--data", f"{folder}:train", "--num-negatives", "1", "--relative-margin",
              "0", "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "cut.jsonl"), "--dim", "8"]) == 0
    assert main([*common, "--output", str(tmp_path / "whole.jsonl")]) == 0
    data = load_training_set([f"{folder}:train"])
    rows = [tuple(r) for r in data.rows]
    corpus = mining_corpus(None, None, data, [f"{folder}:train"])  # mnr mine's default: the folder's corpus
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    cut = mine(encoder, rows, corpus, MiningSettings(num_negatives=1, relative_margin=0), progress=False, dim=8)
    assert [list(r) for r in load_training_set([str(tmp_path / "cut.jsonl")]).rows] == [list(r) for r in cut.rows]
    assert (tmp_path / "cut.jsonl").read_text() != (tmp_path / "whole.jsonl").read_text()  # 8 values rank otherwise
