"""Prompts: a text before each column's texts, trained with, saved as sentence-transformers saves it, and applied by
mnr's commands and by sentence-transformers' encode_query / encode_document alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mnr.cli import main
from mnr.config import TrainConfig, load_toml
from mnr.errors import ConfigError, ModelError
from mnr.model import SentenceEncoder
from mnr.prompts import PromptChoice

from .conftest import SENTENCES, write_jsonl
from .test_matryoshka import logged_losses, refused_before_writing, run  # run: fp32, as the references here are

PROMPTS = ["--prompts", "query=query: ", "passage=passage: "]


@pytest.fixture
def pairs(pairs_file):
    return pairs_file


def weights(path):
    return SentenceEncoder.load(str(path)).state_dict()


def test_a_prompted_run_trains_on_the_prompted_texts(no_dropout_model, pairs, tmp_path):
    """--prompts is exactly training on rows whose texts start with the prompts (the rows here repeat no text, so
    batches are the same): every loss and the final weights; and the model keeps its prompts."""
    prompted = run(no_dropout_model, pairs, tmp_path / "prompted", *PROMPTS)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    by_hand = write_jsonl(tmp_path / "by_hand.jsonl", [{"anchor": "query: " + r["anchor"],
                                                        "positive": "passage: " + r["positive"]} for r in rows])
    assert prompted == run(no_dropout_model, by_hand, tmp_path / "by_hand")
    ours, theirs = weights(tmp_path / "prompted" / "final"), weights(tmp_path / "by_hand" / "final")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "prompted" / "final" / "config_sentence_transformers.json").read_text())
    # and as "document", the name sentence-transformers' encode_document looks for first (it gives every model one)
    assert config["prompts"] == {"query": "query: ", "passage": "passage: ", "document": "passage: "}
    assert config["default_prompt_name"] is None
    assert "include_prompt" not in json.loads((tmp_path / "prompted" / "final" / "1_Pooling" / "config.json")
                                              .read_text())  # the default: older sentence-transformers load it
    card = (tmp_path / "prompted" / "final" / "README.md").read_text()
    assert "### Prompts" in card and "model.encode_query([...])" in card and "model.encode_document([...])" in card
    assert 'prompts = {"query" = "query: ", "passage" = "passage: "}' in (tmp_path / "prompted" / "config.toml"
                                                                         ).read_text()


def test_columns_get_the_prompts_they_are_given(no_dropout_model, pairs, tmp_path):
    """--prompt-columns: here the same prompt before both columns."""
    both = run(no_dropout_model, pairs, tmp_path / "both", "--prompts", "s=same: ", "--prompt-columns", "anchor=s",
               "positive=s")
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    by_hand = write_jsonl(tmp_path / "by_hand.jsonl", [{k: "same: " + v for k, v in r.items()} for r in rows])
    assert both == run(no_dropout_model, by_hand, tmp_path / "by_hand")


def test_without_the_prompt_in_pooling_the_loss_pools_the_texts_own_tokens(no_dropout_model, pairs, tmp_path):
    """--no-include-prompt: the first logged loss is MNR on embeddings that pool each text's tokens only, as
    sentence-transformers' Pooling(include_prompt=False) computes them (its embeddings, here the reference)."""
    from sentence_transformers import SentenceTransformer

    from mnr.config import TrainConfig
    from mnr.data import load_training_set
    from mnr.losses import MultipleNegativesRankingLoss
    from mnr.recipe import batches_of_epoch

    first = run(no_dropout_model, pairs, tmp_path / "run", *PROMPTS, "--no-include-prompt")[0]
    pooled = run(no_dropout_model, pairs, tmp_path / "pooled", *PROMPTS)[0]
    assert first != pooled
    data = load_training_set([str(pairs)])
    batch = batches_of_epoch(data, TrainConfig(data=[str(pairs)], batch_size=4), 0)[0]
    model = SentenceTransformer(str(no_dropout_model), device="cpu")
    model.max_seq_length = 32
    model[1].include_prompt = False
    anchors = model.encode([data.rows[i][0] for i in batch], prompt="query: ", convert_to_tensor=True)
    positives = model.encode([data.rows[i][1] for i in batch], prompt="passage: ", convert_to_tensor=True)
    assert first == pytest.approx(MultipleNegativesRankingLoss()([anchors, positives]).item(), rel=1e-5)
    pooling = json.loads((tmp_path / "run" / "final" / "1_Pooling" / "config.json").read_text())
    assert pooling["include_prompt"] is False


@pytest.mark.parametrize("include", [True, False])
def test_sentence_transformers_applies_the_saved_prompts_as_mnr_does(tiny_model_dir, tmp_path, include):
    """encode_query / encode_document / encode(prompt_name=...) of sentence-transformers on a model mnr saved with
    prompts give mnr's embeddings (fp32, the same kernels: to 1e-5)."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.prompts, encoder.include_prompt = {"query": "query: ", "passage": "passage: "}, include
    path = encoder.save(tmp_path / "model")
    ours = SentenceEncoder.load(str(path))
    assert (ours.prompts, ours.include_prompt, ours.default_prompt_name) == (
        {**encoder.prompts, "document": "passage: "}, include, None)
    theirs = SentenceTransformer(str(path), device="cpu")
    texts = SENTENCES[:6]
    pairs = [(theirs.encode_query(texts), ours.encode(texts, prompt=ours.prompt(role="query"))),
             (theirs.encode_document(texts), ours.encode(texts, prompt=ours.prompt(role="document"))),
             (theirs.encode(texts, prompt_name="passage"), ours.encode(texts, prompt=ours.prompt("passage"))),
             (theirs.encode(texts), ours.encode(texts))]  # no default prompt: none
    for a, b in pairs:
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(pairs[0][1], pairs[3][1], atol=1e-3)  # the prompt changes the embeddings
    # the text mnr encode reads, with the query prompt: the same as encode_query
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert main(["encode", str(path), "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "q.npy"),
                 "--prompt-name", "query", "--device", "cpu"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), pairs[0][0], atol=1e-5)


def test_a_default_prompt_is_applied_unless_told_otherwise(tiny_model_dir, tmp_path):
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.prompts, encoder.default_prompt_name = {"query": "query: ", "classify": "class: "}, "classify"
    assert encoder.prompt() == "class: " and encoder.prompt(role="query") == "query: "
    assert encoder.prompt(role="document") == "class: "  # no document prompt: the default, as encode would
    assert encoder.prompt("") == ""
    np.testing.assert_array_equal(encoder.encode(SENTENCES[:3]), encoder.encode(SENTENCES[:3], prompt="class: "))
    with pytest.raises(ModelError, match="prompt 'passage': .* has the prompts query, classify"):
        encoder.prompt("passage")


def test_retrieval_scores_put_the_query_prompt_before_queries_and_the_passage_prompt_before_passages(
        tiny_model_dir, tmp_path):
    from mnr.retrieval import RetrievalEvaluator, RetrievalSet, load_retrieval

    from .test_retrieval import beir_folder

    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.prompts = {"query": "query: ", "passage": "passage: "}
    data = load_retrieval(f"{beir_folder(tmp_path)}:test")
    prompted = RetrievalEvaluator(data)(encoder)  # the model's own: encode_query's and encode_document's
    by_hand = RetrievalSet(**{**vars(data), "queries": {q: "query: " + t for q, t in data.queries.items()},
                              "passages": ["passage: " + p for p in data.passages]})
    plain = SentenceEncoder.load(str(tiny_model_dir))
    assert prompted == RetrievalEvaluator(by_hand)(plain)
    assert RetrievalEvaluator(data, prompts=PromptChoice("", ""))(encoder) == RetrievalEvaluator(data)(plain)


def test_mnr_eval_and_mine_take_prompt_names(tiny_model_dir, tmp_path, capsys):
    from mnr.data import load_training_set
    from mnr.mine import MiningSettings, mine, mining_corpus

    from .test_retrieval import beir_folder

    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.prompts = {"q": "question: ", "p": "passage: "}
    model = encoder.save(tmp_path / "model")
    folder = beir_folder(tmp_path)
    common = ["mine", str(model), "--data", f"{folder}:train", "--num-negatives", "1", "--relative-margin", "0",
              "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "named.jsonl"), "--query-prompt-name", "q",
                 "--corpus-prompt-name", "p"]) == 0
    data = load_training_set([f"{folder}:train"])
    corpus = mining_corpus(None, None, data, [f"{folder}:train"])
    settings = MiningSettings(num_negatives=1, relative_margin=0)
    mined = mine(encoder, [tuple(r) for r in data.rows], corpus, settings, progress=False,
                 prompts=PromptChoice("q", "p"))
    assert [list(r) for r in load_training_set([str(tmp_path / "named.jsonl")]).rows] == [list(r) for r in mined.rows]
    # unknown names fail before anything is written
    assert main([*common, "--output", str(tmp_path / "x.jsonl"), "--query-prompt-name", "query"]) == 2
    assert "prompt 'query': " in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
    (tmp_path / "texts.txt").write_text("\n".join(SENTENCES[:3]) + "\n")
    assert main(["encode", str(model), "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "x.npy"),
                 "--prompt-name", "query"]) == 2
    assert "prompt 'query': " in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
    assert main(["eval", str(model), "--retrieval", str(folder), "--query-prompt-name", "q", "--corpus-prompt-name",
                 "none", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    from mnr.retrieval import RetrievalEvaluator, load_retrieval

    expected = RetrievalEvaluator(load_retrieval(f"{folder}:test"), prompts=PromptChoice("q", ""))(encoder)
    figures = " | ".join(f"{expected[m]:.2f}" for m in ("ndcg@10", "mrr@10", "map@100"))
    assert f"| {model} | mini:test | {figures} |" in out


def test_dev_evaluation_and_mining_in_a_run_use_the_runs_prompts(tiny_model_dir, tmp_path):
    """The base model's step-0 score is that of the model with the run's prompts, and mining ranks with them."""
    from mnr.retrieval import RetrievalEvaluator, load_retrieval

    from .test_retrieval import beir_folder

    folder = beir_folder(tmp_path)
    output = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(output),
                 "--batch-size", "2", "--ir-dev", f"{folder}:test", "--mine-negatives", "1", "--mine-relative-margin",
                 "0", "--save-every", "0", "--no-bf16", *PROMPTS]) == 0
    first = json.loads((output / "log.jsonl").read_text().splitlines()[1])  # after the mining record
    assert first["step"] == 0
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.prompts = {"query": "query: ", "passage": "passage: "}
    assert first["ir_dev"]["ndcg@10"] == pytest.approx(
        RetrievalEvaluator(load_retrieval(f"{folder}:test"))(encoder)["ndcg@10"], abs=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--prompts", "sts=sts: "], "--prompts: no column gets 'sts'; say which with --prompt-columns"),
    (["--prompts", "query=q: ", "--prompt-columns", "anchor=passage"],
     r"--prompt-columns uses prompts --prompts does not name \(passage\)"),
    (["--prompts", "query=q: ", "--prompt-columns", "answer=query"], "--prompt-columns names columns anchor"),
    (["--prompts", "query=q: ", "--loss", "softmax"],
     r"--prompts: no column of the training rows \(premise, hypothesis\) gets 'query'"),
    (["--prompts", "passage=p: ", "--prompt-columns", "negative=passage"],
     r"--prompts: no column of the training rows \(anchor, positive\) gets 'passage'"),
])
def test_bad_prompt_settings_fail_before_anything_is_written(tiny_model_dir, nli_file, tmp_path, capsys, flags,
                                                             message):
    refused_before_writing(tiny_model_dir, nli_file, tmp_path, capsys, flags, message)


def test_a_prompt_flag_without_a_name_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--data", "x.jsonl", "--prompts", "query"])
    assert "--prompts: expected NAME=TEXT, got 'query'" in capsys.readouterr().err


def test_prompts_in_a_config_file(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('prompts = { query = "query: ", passage = "passage: " }\ninclude_prompt = false\n')
    config = TrainConfig(**load_toml(file))
    assert config.prompts.prompts == {"query": "query: ", "passage": "passage: "}
    assert config.prompts.by_column() == {"anchor": "query", "positive": "passage", "negative": "passage"}
    (tmp_path / "again.toml").write_text(config.to_toml())
    assert TrainConfig(**load_toml(tmp_path / "again.toml")) == config
    with pytest.raises(ConfigError, match="--prompts must be NAME=TEXT pairs"):
        TrainConfig(prompts={"query": 3})
    file.write_text('[prompts]\nquery = "query: "\n')  # a table is the same thing in TOML
    assert load_toml(file) == {"prompts": {"query": "query: "}}
    file.write_text('[training]\nlr = 1e-5\n')
    with pytest.raises(ConfigError, match=r"\[training\] tables are not used"):
        load_toml(file)


def test_gradient_caching_with_prompts_left_out_of_pooling_is_the_plain_step(tiny_model_dir, nli_file, tmp_path):
    """The tokens pooling leaves out travel with each mini-batch: a mini-batch holding the whole batch (4 rows x 3
    columns) is exactly the plain step, dropout masks included."""
    logs = {}
    for name, extra in (("plain", []), ("cached", ["--mini-batch-size", "12"])):
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(nli_file), "--output",
                     str(tmp_path / name), "--batch-size", "4", "--hard-negatives", *PROMPTS, "--no-include-prompt",
                     *extra]) == 0
        logs[name] = logged_losses(tmp_path / name)
    assert logs["cached"] == pytest.approx(logs["plain"], rel=1e-5)


@pytest.mark.parametrize("layout", ["buckets", "jagged"])
def test_packed_layouts_leave_the_same_prompt_tokens_out(tiny_model_dir, layout):
    encoder = SentenceEncoder.load(str(tiny_model_dir), layout="padded")
    encoder.prompts, encoder.include_prompt = {"query": "query: "}, False
    padded = encoder.encode(SENTENCES, prompt="query: ", batch_size=8)
    encoder.set_layout(layout)
    np.testing.assert_allclose(encoder.encode(SENTENCES, prompt="query: ", batch_size=8), padded, atol=1e-5)


def test_a_base_models_own_prompts_are_not_kept_unless_the_run_trains_with_them(tiny_model_dir, pairs, tmp_path,
                                                                                 caplog):
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.prompts = {"query": "q: ", "document": ""}  # sentence-transformers 6 saves empty query/document ones
    base = encoder.save(tmp_path / "base")
    run(base, pairs, tmp_path / "plain")
    assert "the base model's prompts (query='q: ') are not this run's (--prompts): it trains on the texts as they " \
           "are and saves no prompts" in caplog.text
    assert SentenceEncoder.load(str(tmp_path / "plain" / "final")).prompts == {}
    caplog.clear()
    encoder.prompts = {"query": "", "document": ""}
    run(encoder.save(tmp_path / "empty"), pairs, tmp_path / "again")
    assert "base model's prompts" not in caplog.text


def test_prompt_flags_add_up_and_a_text_may_hold_equals_signs():
    import argparse

    from mnr.prompts import PromptSettings
    from mnr.settings import add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser, PromptSettings)
    args = parser.parse_args(["--prompts", "query=q = ", "passage=p: ", "--prompts", "query=query: "])
    assert args.prompts == {"query": "query: ", "passage": "p: "}  # a name given again: its last text
    assert parser.parse_args(["--prompts", "x=a=b"]).prompts == {"x": "a=b"}
    assert parser.parse_args([]).prompts is None  # not given: the config file's, else the default
