"""Semantic search: BEIR folders, exact search, trec_eval metrics, training from judgements, mining."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mnr.cli import main
from mnr.data import load_training_set
from mnr.errors import DataError
from mnr.mine import MiningSettings, mine
from mnr.model import SentenceEncoder
from mnr.retrieval import (
    RetrievalEvaluator,
    load_retrieval,
    mean_metrics,
    query_metrics,
    search,
)

from .conftest import SENTENCES


def write(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def beir_folder(root: Path, queries: int = 16, gz: bool = True, beir_qrels: bool = False) -> Path:
    """A small retrieval folder: passage d{i} answers query q{i}; query q{i} also judges d{i+1} 0."""
    folder = root / "mini"
    (folder).mkdir()
    suffix = ".jsonl.gz" if gz else ".jsonl"
    passages = [{"_id": f"d{i}", "title": f"Title {i}", "text": SENTENCES[i % 24] + f" (passage {i})"}
                for i in range(24)]
    write(folder / f"corpus{suffix}", passages, gz)
    write(folder / f"queries{suffix}", [{"_id": f"q{i}", "text": f"about {SENTENCES[i % 24].lower()}"}
                                       for i in range(queries + 2)], gz)
    train = [{"query_id": f"q{i}", "corpus_id": f"d{i}", "score": 1} for i in range(queries)]
    train += [{"query_id": f"q{i}", "corpus_id": f"d{i + 1}", "score": 0} for i in range(queries)]
    train += [{"query_id": f"q{queries}", "corpus_id": "d0", "score": 0}]  # judged, nothing relevant: skipped
    if beir_qrels:
        (folder / "qrels").mkdir()
        with open(folder / "qrels" / "train.tsv", "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["query-id", "corpus-id", "score"])
            writer.writerows([(r["query_id"], r["corpus_id"], r["score"]) for r in train])
    else:
        write(folder / f"qrels_train{suffix}", train, gz)
    write(folder / f"qrels_test{suffix}", [{"query_id": "q1", "corpus_id": "d1", "score": 2},
                                           {"query_id": "q1", "corpus_id": "d7", "score": 1},
                                           {"query_id": "q2", "corpus_id": "d2", "score": 1}], gz)
    return folder


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("layout", ["jsonl.gz", "jsonl", "beir-tsv-qrels"])
def test_a_beir_folder_loads(tmp_path, layout):
    folder = beir_folder(tmp_path, gz=layout == "jsonl.gz", beir_qrels=layout == "beir-tsv-qrels")
    data = load_retrieval(f"{folder}:train")
    assert len(data.passages) == 24 and data.passages[3] == f"Title 3 {SENTENCES[3]} (passage 3)"
    assert list(data.queries) == [f"q{i}" for i in range(16)]
    assert data.qrels["q5"] == {"d5": 1}  # the 0-judged d6 is not relevant
    assert data.skipped == 1  # q16: judged, nothing relevant
    test = load_retrieval(str(folder))  # the default split: test
    assert test.qrels == {"q1": {"d1": 2, "d7": 1}, "q2": {"d2": 1}}


def test_parts_of_a_split_are_disjoint_random_and_cover_it(tmp_path):
    folder = beir_folder(tmp_path)
    dev = load_retrieval(f"{folder}:train[:4]")
    rest = load_retrieval(f"{folder}:train[4:]")
    quarter = load_retrieval(f"{folder}:train[:25%]")
    assert len(dev.queries) == 4 and len(rest.queries) == 12 and set(dev.queries) == set(quarter.queries)
    assert not set(dev.queries) & set(rest.queries)
    assert set(dev.queries) | set(rest.queries) == set(load_retrieval(f"{folder}:train").queries)
    assert list(dev.queries) != ["q0", "q1", "q2", "q3"], "a part is a pseudo-random sample, not the first queries"
    assert len(load_training_set([f"{folder}:train[4:]"]).rows) == 12


BAD = {
    "unknown query id": ("qrels_train.jsonl", [{"query_id": "q99", "corpus_id": "d1", "score": 1}],
                         r"qrels_train.jsonl:1: unknown query id 'q99'"),
    "unknown passage id (strict)": ("qrels_train.jsonl", [{"query_id": "q1", "corpus_id": "d1", "score": 1},
                                                          {"query_id": "q1", "corpus_id": "nope", "score": 1}],
                                    r"qrels_train.jsonl:2: unknown passage id 'nope' \(not in .*corpus.jsonl; without "
                                    r"--strict-qrels it would count as relevant and never retrieved\)"),
    "empty corpus": ("corpus.jsonl", [], r"corpus.jsonl: empty"),
    "passage with no text": ("corpus.jsonl", [{"_id": "d0", "title": "T", "text": "x"},
                                              {"_id": "d1", "title": "", "text": "  "}],
                             r"corpus.jsonl:2: passage 'd1' has no text"),
    "duplicate passage ids": ("corpus.jsonl", [{"_id": "d1", "title": "", "text": "a"},
                                               {"_id": "d2", "title": "", "text": "b"},
                                               {"_id": "d1", "title": "", "text": "c"}],
                              r"corpus.jsonl:3: duplicate passage id 'd1' \(first at 1\)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_retrieval_data_names_the_file_and_line(tmp_path, case):
    folder = beir_folder(tmp_path, gz=False)
    name, rows, message = BAD[case]
    write(folder / name, rows)
    with pytest.raises(DataError, match=message):
        load_retrieval(f"{folder}:train", strict=True)


def test_a_split_without_qrels(tmp_path, capsys, tiny_model_dir):
    folder = beir_folder(tmp_path)
    with pytest.raises(DataError, match=r"mini: no qrels for split 'dev' \(found: test, train; expected "
                                        r"qrels_dev.jsonl\[.gz\] or qrels/dev.tsv, or qrels/dev\[-\*\].parquet\)"):
        load_retrieval(f"{folder}:dev")
    assert main(["eval", str(tiny_model_dir), "--retrieval", f"{folder}:dev"]) == 2
    assert "no qrels for split 'dev'" in capsys.readouterr().err


# ------------------------------------------------------------------ published sets: BEIR's and MTEB's rules and files


def folder_with_missing_passages(root: Path) -> Path:
    """beir_folder, whose test qrels also judge passages the corpus lacks: q1 one of its three relevant
    passages, q3 its only one (as some published BEIR sets do)."""
    folder = beir_folder(root, gz=False)
    write(folder / "qrels_test.jsonl", [{"query_id": "q1", "corpus_id": "d1", "score": 2},
                                        {"query_id": "q1", "corpus_id": "gone-1", "score": 1},
                                        {"query_id": "q1", "corpus_id": "d7", "score": 1},
                                        {"query_id": "q2", "corpus_id": "d2", "score": 1},
                                        {"query_id": "q2", "corpus_id": "gone-0", "score": 0},  # not relevant
                                        {"query_id": "q3", "corpus_id": "gone-2", "score": 1}])
    write(folder / "qrels_train.jsonl", [{"query_id": f"q{i}", "corpus_id": f"d{i}" if i % 4 else f"gone{i}",
                                          "score": 1} for i in range(16)])
    return folder


def test_judged_passages_missing_from_the_corpus_count_as_never_retrieved(tmp_path, tiny_encoder, caplog):
    """As BEIR and MTEB evaluate: the query stays, its missing passage is relevant and never retrieved
    (checked against pytrec_eval on the same ranking and the qrels as published)."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    folder = folder_with_missing_passages(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mnr.retrieval"):
        data = load_retrieval(str(folder))
    assert list(data.queries) == ["q1", "q2", "q3"] and data.missing == 2
    assert data.qrels["q1"] == {"d1": 2, "gone-1": 1, "d7": 1} and data.qrels["q3"] == {"gone-2": 1}
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{folder}: 2 judged relevant passages are not in the corpus, e.g. 'gone-1' "
                              f"({folder / 'qrels_test.jsonl'}:2), 'gone-2' ({folder / 'qrels_test.jsonl'}:6)")
    assert "--strict-qrels refuses them" in warning

    evaluator = RetrievalEvaluator(data)
    rankings = evaluator.rankings(tiny_encoder)
    assert not {p for ranking in rankings.values() for p in ranking} - set(data.passage_ids)
    published = {"q1": {"d1": 2, "gone-1": 1, "d7": 1}, "q2": {"d2": 1, "gone-0": 0}, "q3": {"gone-2": 1}}
    run = {q: {p: 1.0 - i / 1000 for i, p in enumerate(ranking)} for q, ranking in rankings.items()}
    theirs = pytrec_eval.RelevanceEvaluator(published, {"ndcg_cut_10", "recall_10", "recall_100",
                                                        "map_cut_100"}).evaluate(run)
    ours = evaluator(tiny_encoder)
    for metric, key in [("ndcg@10", "ndcg_cut_10"), ("recall@10", "recall_10"), ("recall@100", "recall_100"),
                        ("map@100", "map_cut_100")]:
        assert ours[metric] == pytest.approx(100 * np.mean([theirs[q][key] for q in published]), abs=1e-9), metric
    assert ours["recall@100"] < 100  # 2 of 4 relevant passages can never be found

    with pytest.raises(DataError, match=r"qrels_test.jsonl:2: unknown passage id 'gone-1'"):
        load_retrieval(str(folder), strict=True)


def test_training_and_mining_skip_judged_passages_missing_from_the_corpus(tmp_path, tiny_model_dir, caplog, capsys):
    folder = folder_with_missing_passages(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mnr.retrieval"):
        rows = load_training_set([f"{folder}:train"]).rows
    assert len(rows) == 12 and "4 judged relevant passages are not in the corpus" in caplog.text  # q0, q4, q8, q12
    assert all(p.startswith("Title ") for _, p in rows)
    with pytest.raises(DataError, match="unknown passage id 'gone0'"):
        load_training_set([f"{folder}:train"], strict_qrels=True)
    output = tmp_path / "mined.jsonl"
    assert main(["mine", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(output),
                 "--num-negatives", "1", "--relative-margin", "0", "--device", "cpu"]) == 0
    assert len(output.read_text().splitlines()) == 12
    assert main(["mine", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(tmp_path / "m2.jsonl"),
                 "--strict-qrels"]) == 2
    assert "unknown passage id 'gone0'" in capsys.readouterr().err and not (tmp_path / "m2.jsonl").exists()
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train", "--output",
                 str(tmp_path / "run"), "--batch-size", "4", "--max-seq-length", "32", "--strict-qrels"]) == 2
    assert not (tmp_path / "run").exists()


def test_mnr_eval_reports_missing_judgements(tmp_path, tiny_model_dir, capsys):
    folder = folder_with_missing_passages(tmp_path)
    figures = tmp_path / "figures.json"
    assert main(["eval", str(tiny_model_dir), "--retrieval", str(folder), "--json", str(figures)]) == 0
    err = capsys.readouterr().err
    assert ("mini:test: 3 queries, 24 passages, 2 judged relevant passages not in the corpus (never retrieved)"
            in err)
    saved = json.loads(figures.read_text())
    assert saved["retrieval_sets"]["mini:test"] == {"queries": 3, "passages": 24, "skipped_queries": 0,
                                                    "missing_judgements": 2, "ignore_identical_ids": False}
    assert main(["eval", str(tiny_model_dir), "--retrieval", str(folder), "--strict-qrels"]) == 2
    assert "unknown passage id 'gone-1'" in capsys.readouterr().err


def self_retrieval_folder(root: Path) -> Path:
    """Every query is itself a passage of the corpus (same id, same text), as in argument retrieval:
    query d{i} is answered by passage d{i+1}."""
    folder = root / "arguments"
    folder.mkdir()
    passages = [{"_id": f"d{i}", "title": "", "text": SENTENCES[i]} for i in range(24)]
    write(folder / "corpus.jsonl", passages)
    write(folder / "queries.jsonl", [{"_id": f"d{i}", "text": SENTENCES[i]} for i in range(12)])
    write(folder / "qrels_test.jsonl", [{"query_id": f"d{i}", "corpus_id": f"d{i + 1}", "score": 1} for i in range(12)])
    return folder


def test_identical_ids_are_left_out_of_a_querys_ranking(tmp_path, tiny_encoder, tiny_model_dir, capsys):
    data = load_retrieval(str(self_retrieval_folder(tmp_path)))
    plain = RetrievalEvaluator(data).rankings(tiny_encoder)
    assert all(ranking[0] == q for q, ranking in plain.items())  # each query finds itself first
    ignoring = RetrievalEvaluator(data, ignore_identical_ids=True)
    rankings = ignoring.rankings(tiny_encoder)
    assert all(q not in ranking and len(ranking) == 23 for q, ranking in rankings.items())
    assert all(ranking == [p for p in plain[q] if p != q] for q, ranking in rankings.items())
    assert ignoring(tiny_encoder)["mrr@10"] > RetrievalEvaluator(data)(tiny_encoder)["mrr@10"]
    assert ignoring(tiny_encoder) == mean_metrics(rankings, data.qrels)

    folder = tmp_path / "arguments"
    outputs = []
    for flag in ([], ["--ignore-identical-ids"]):
        assert main(["eval", str(tiny_model_dir), "--retrieval", str(folder), *flag]) == 0
        outputs.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert float(outputs[1].split("|")[4]) > float(outputs[0].split("|")[4])  # MRR@10

    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:test", "--ir-dev", f"{folder}:test",
                 "--ignore-identical-ids", "--output", str(run), "--batch-size", "4", "--max-seq-length", "32",
                 "--no-bf16"]) == 0  # fp32, as the reference below
    step0 = next(json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "ir_dev" in line)
    base = SentenceEncoder.load(str(tiny_model_dir), max_seq_length=32)
    assert step0["ir_dev"]["ndcg@10"] == pytest.approx(ignoring(base)["ndcg@10"], abs=1e-4)
    assert "ignore_identical_ids" in (run / "final" / "README.md").read_text()


def test_several_folders_give_one_table_with_their_mean(tmp_path, tiny_model_dir, capsys):
    first, second = beir_folder(tmp_path), self_retrieval_folder(tmp_path)
    figures = tmp_path / "figures.json"
    assert main(["eval", str(tiny_model_dir), "--retrieval", str(first), str(second), "--json", str(figures)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" | ")[1] for line in lines[2:]] == ["mini:test", "arguments:test", "mean of 2 sets"]
    saved = json.loads(figures.read_text())["retrieval"][str(tiny_model_dir)]
    assert set(saved) == {"mini:test", "arguments:test", "mean"}
    for metric, value in saved["mean"].items():
        assert value == pytest.approx((saved["mini:test"][metric] + saved["arguments:test"][metric]) / 2)
    assert f"{saved['mean']['ndcg@10']:.2f}" == lines[-1].split(" | ")[2]
    assert main(["eval", str(tiny_model_dir), "--retrieval", str(first), "--json", str(tmp_path / "no" / "f.json")]
                ) == 2
    assert "--json" in capsys.readouterr().err


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def published_layouts(root: Path) -> dict[str, Path]:
    """One small data set in each layout users download: ours, BEIR's (qrels .tsv with and without the header,
    TREC's 4 columns), and the Hugging Face mteb/<name> layouts (Parquet shards, JSON Lines in folders)."""
    corpus = [{"_id": f"d{i}", "title": f"Title {i}", "text": SENTENCES[i] + f" ({i})"} for i in range(24)]
    queries = [{"_id": f"q{i}", "text": f"about {SENTENCES[i].lower()}"} for i in range(10)]
    qrels = [{"query-id": f"q{i}", "corpus-id": f"d{i}", "score": 1} for i in range(10)]
    qrels += [{"query-id": "q3", "corpus-id": "d13", "score": 2}, {"query-id": "q4", "corpus-id": "d5", "score": 0}]
    tsv = ["\t".join(map(str, r.values())) for r in qrels]
    layouts = {}

    def folder(name: str) -> Path:
        layouts[name] = root / name
        (root / name).mkdir()
        return root / name

    f = folder("ours")
    write(f / "corpus.jsonl.gz", corpus, gz=True)
    write(f / "queries.jsonl.gz", queries, gz=True)
    write(f / "qrels_test.jsonl.gz", [{"query_id": r["query-id"], "corpus_id": r["corpus-id"], "score": r["score"]}
                                      for r in qrels], gz=True)
    for name, lines in [("beir-tsv", ["query-id\tcorpus-id\tscore", *tsv]), ("tsv-no-header", tsv),
                        ("trec-tsv-gz", [f"{r['query-id']}\t0\t{r['corpus-id']}\t{r['score']}" for r in qrels])]:
        f = folder(name)
        write(f / "corpus.jsonl", corpus)
        write(f / "queries.jsonl", queries)
        (f / "qrels").mkdir()
        text = "\n".join(lines) + "\n"
        if name.endswith("gz"):
            (f / "qrels" / "test.tsv.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (f / "qrels" / "test.tsv").write_text(text)
    f = folder("mteb-parquet-shards")  # corpus/, queries/ and qrels/ as the hub's parquet shards
    write_parquet(f / "corpus" / "corpus-00000-of-00002.parquet", corpus[:12])
    write_parquet(f / "corpus" / "corpus-00001-of-00002.parquet", corpus[12:])
    write_parquet(f / "queries" / "queries-00000-of-00001.parquet", queries)
    write_parquet(f / "qrels" / "test-00000-of-00001.parquet", qrels)
    write_parquet(f / "qrels" / "train-00000-of-00001.parquet", qrels[:3])
    f = folder("mteb-default-config")  # single parquet files, the qrels as the "default" config
    write_parquet(f / "corpus.parquet", corpus)
    write_parquet(f / "queries.parquet", queries)
    write_parquet(f / "default" / "test-00000-of-00001.parquet", qrels)
    f = folder("mteb-jsonl-folders")
    for part, rows in [("corpus", corpus), ("queries", queries), ("qrels", qrels)]:
        (f / part).mkdir()
        write(f / part / ("test.jsonl" if part == "qrels" else f"{part}.jsonl"), rows)
    return layouts


def test_every_published_layout_reads_to_the_same_numbers(tmp_path, tiny_encoder):
    layouts = published_layouts(tmp_path)
    results = {}
    for name, folder in layouts.items():
        data = load_retrieval(str(folder))
        assert len(data.passages) == 24 and data.passages[13] == f"Title 13 {SENTENCES[13]} (13)", name
        assert data.qrels["q3"] == {"d3": 1, "d13": 2} and data.qrels["q4"] == {"d4": 1}, name
        assert list(data.queries) == [f"q{i}" for i in range(10)], name
        results[name] = RetrievalEvaluator(data)(tiny_encoder)
    assert all(result == results["ours"] for result in results.values()), results
    assert load_retrieval(f"{layouts['mteb-parquet-shards']}:train").qrels == {f"q{i}": {f"d{i}": 1} for i in range(3)}
    with pytest.raises(DataError, match=r"no qrels for split 'dev' \(found: test, train;"):
        load_retrieval(f"{layouts['mteb-parquet-shards']}:dev")


# ------------------------------------------------------------------ metrics and search


def test_metrics_equal_trec_eval():
    """Against pytrec_eval (trec_eval itself), on random rankings with graded and zero judgements."""
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    qrels, run = {}, {}
    for q in range(60):
        docs = [f"d{i}" for i in rng.sample(range(400), 150)]
        judged = rng.sample(docs[:60], rng.randint(1, 8)) + rng.sample([f"d{i}" for i in range(400, 420)], 1)
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        if not any(qrels[f"q{q}"].values()):
            qrels[f"q{q}"][judged[0]] = 1
        run[f"q{q}"] = {d: 1.0 - i / 1000 for i, d in enumerate(docs[:100])}  # distinct scores: no ties
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "map_cut_100", "recall_10", "recall_100"})
    theirs = evaluator.evaluate(run)
    top10 = {q: dict(list(docs.items())[:10]) for q, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    for q in qrels:
        ours = query_metrics(list(run[q]), {d: s for d, s in qrels[q].items() if s > 0})
        assert ours["ndcg@10"] == pytest.approx(theirs[q]["ndcg_cut_10"], abs=1e-9)
        assert ours["map@100"] == pytest.approx(theirs[q]["map_cut_100"], abs=1e-9)
        assert ours["recall@10"] == pytest.approx(theirs[q]["recall_10"], abs=1e-9)
        assert ours["recall@100"] == pytest.approx(theirs[q]["recall_100"], abs=1e-9)
        assert ours["mrr@10"] == pytest.approx(mrr[q]["recip_rank"], abs=1e-9)
    means = mean_metrics({q: list(docs) for q, docs in run.items()},
                         {q: {d: s for d, s in j.items() if s > 0} for q, j in qrels.items()})
    assert means["ndcg@10"] == pytest.approx(100 * np.mean([t["ndcg_cut_10"] for t in theirs.values()]))


@pytest.mark.parametrize("query_chunk, passage_chunk", [(1024, 32768), (7, 13), (1, 5)])
def test_search_in_chunks_is_exact(query_chunk, passage_chunk):
    torch.manual_seed(0)
    queries, passages = torch.randn(30, 16), torch.randn(200, 16)
    scores, indices = search(queries, passages, 17, query_chunk=query_chunk, passage_chunk=passage_chunk)
    full = queries @ passages.T
    expected_scores, expected = full.topk(17, dim=1)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(scores, expected_scores)
    assert search(queries, passages[:5], 17)[1].shape == (30, 5)  # k above the corpus size: the whole corpus


def test_the_evaluator_ranks_the_whole_corpus(tmp_path, tiny_encoder):
    folder = beir_folder(tmp_path)
    data = load_retrieval(f"{folder}:train")
    got = RetrievalEvaluator(data)(tiny_encoder)
    q = tiny_encoder.encode(list(data.queries.values()), normalize=True)
    p = tiny_encoder.encode(data.passages, normalize=True)
    order = np.argsort(-(q @ p.T), axis=1, kind="stable")
    rankings = {qid: [data.passage_ids[i] for i in order[n][:100]] for n, qid in enumerate(data.queries)}
    expected = mean_metrics(rankings, data.qrels)
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] == pytest.approx(expected[name], abs=1e-6)


def test_mnr_eval_prints_a_retrieval_table(tmp_path, tiny_model_dir, no_dropout_model, capsys):
    folder = beir_folder(tmp_path)
    assert main(["eval", str(tiny_model_dir), str(no_dropout_model), "--retrieval", str(folder),
                 f"{folder}:train[:8]", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0] == "| model | set | NDCG@10 | MRR@10 | MAP@100 | Recall@10 | Recall@100 |"
    assert len(lines) == 8  # header, rule, and for each model: both sets and their mean
    assert [line.split(" | ")[:2] for line in lines[2:]] == [
        [f"| {model}", name] for model in (tiny_model_dir, no_dropout_model)
        for name in ("mini:test", "mini:train[:8]", "mean of 2 sets")]
    assert all(len(line.split("|")) == 9 for line in lines[2:])
    rows = [[float(x) for x in line.split("|")[3:8]] for line in lines[2:5]]
    assert rows[2] == pytest.approx([(a + b) / 2 for a, b in zip(rows[0], rows[1], strict=True)], abs=0.006)
    assert "mini:train: 8 queries" not in captured.err and "mini:train[:8]: 8 queries, 24 passages" in captured.err


@pytest.mark.skipif(not os.environ.get("MNR_LONG_TESTS"), reason="embeds 5,183 abstracts: about 5 minutes on 2 CPU "
                    "cores; run with MNR_LONG_TESTS=1 (the figure is in BENCHMARKS.md, Retrieval)")
def test_zero_shot_scifact_matches_the_published_figure(packaged_model, data_root, capsys):
    """64.51 is MTEB's NDCG@10 for all-MiniLM-L6-v2 on SciFact (BEIR) test."""
    assert main(["eval", "sentence-transformers/all-MiniLM-L6-v2", "--retrieval", "retrieval/scifact",
                 "--data-dir", str(data_root)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    ndcg, recall100 = float(row.split("|")[3]), float(row.split("|")[7])
    assert abs(ndcg - 64.51) <= 0.3, row
    assert abs(recall100 - 92.50) <= 0.5, row


# ------------------------------------------------------------------ training from judgements


def test_train_on_judgements_with_a_retrieval_dev_set(tmp_path, tiny_model_dir, capsys):
    folder = beir_folder(tmp_path)
    output = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train[4:]", "--ir-dev",
                 f"{folder}:train[:4]", "--output", str(output), "--batch-size", "4", "--eval-steps", "2",
                 "--max-seq-length", "32", "--lr", "1e-3"]) == 0
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    evaluations = [e for e in log if "ir_dev" in e]
    assert [e["step"] for e in evaluations] == [0, 2, 3]
    assert set(evaluations[0]["ir_dev"]) == {"ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100"}
    best = max(evaluations, key=lambda e: e["ir_dev"]["ndcg@10"])
    assert f"(ir_dev ndcg@10 {best['ir_dev']['ndcg@10']:.2f} at step " in capsys.readouterr().out
    assert "| ir_dev ndcg@10 |" in (output / "best" / "README.md").read_text()


def test_best_metric_chooses_what_best_keeps(tmp_path, tiny_model_dir, sts_file, capsys):
    folder = beir_folder(tmp_path)
    common = ["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train[4:]", "--ir-dev",
              f"{folder}:train[:4]", "--sts-dev", str(sts_file), "--batch-size", "4", "--max-seq-length", "32"]
    assert main([*common, "--output", str(tmp_path / "a"), "--best-metric", "ir_dev:recall@10"]) == 0
    assert "(ir_dev recall@10 " in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "b")]) == 0
    assert "(sts_dev spearman " in capsys.readouterr().out  # the first dev set given
    assert main([*common, "--output", str(tmp_path / "c"), "--best-metric", "ir_dev:ndcg@5"]) == 2
    assert "--best-metric: ir_dev has no metric 'ndcg@5'" in capsys.readouterr().err


# ------------------------------------------------------------------ mining


@pytest.fixture
def qa_pairs(tmp_path) -> Path:
    rows = [{"anchor": f"question about {SENTENCES[i].lower()}", "positive": SENTENCES[i]} for i in range(24)]
    rows.append({"anchor": "question about " + SENTENCES[0].lower(), "positive": SENTENCES[0] + " Indeed."})
    return write(tmp_path / "qa.jsonl", rows)


def scores_of(encoder, anchor, texts):
    a = encoder.encode([anchor], normalize=True)
    return (encoder.encode(texts, normalize=True) @ a.T).ravel()


def test_mined_negatives_are_the_best_ranked_non_positives(tiny_encoder, qa_pairs):
    data = load_training_set([str(qa_pairs)])
    rows = [(a, p) for a, p in data.rows]
    corpus = SENTENCES + [f"extra passage {i}" for i in range(10)]
    mined = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=3, relative_margin=0), progress=False)
    assert mined.short == 0 and len(mined.rows) == len(rows)
    for anchor, _, *negatives in mined.rows:
        own = {p for a, p in rows if a == anchor} | {anchor}
        assert not own & set(negatives) and len(set(negatives)) == 3
        candidates = [t for t in dict.fromkeys(corpus) if t not in own]
        scores = scores_of(tiny_encoder, anchor, candidates)
        expected = [candidates[i] for i in np.argsort(-scores, kind="stable")[:3]]
        assert negatives == expected
    # both rows of the anchor with two positives get the same negatives, and neither positive is one
    first = [r for r in mined.rows if r[0] == rows[0][0]]
    assert len(first) == 2 and first[0][2:] == first[1][2:]


def test_mining_filters_range_and_margins(tiny_encoder, qa_pairs):
    rows = [tuple(r) for r in load_training_set([str(qa_pairs)]).rows]
    corpus = SENTENCES + [f"extra passage {i}" for i in range(10)]
    top = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=2, relative_margin=0), progress=False)
    skipped = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=2, relative_margin=0,
                                                           range_min=2), progress=False)
    for a, b in zip(top.rows, skipped.rows, strict=True):
        assert not set(a[2:]) & set(b[2:])  # the two best are skipped
    margin = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=2, relative_margin=0,
                                                           absolute_margin=0.05), progress=False)
    relative = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=2, relative_margin=0.1), progress=False)
    for mined, ok in ((margin, lambda s, low: s <= low - 0.05 + 1e-6),
                      (relative, lambda s, low: s <= low - abs(low) * 0.1 + 1e-6)):
        for anchor, _, *negatives in mined.rows:
            low = min(scores_of(tiny_encoder, anchor, [p for a, p in rows if a == anchor]))
            assert all(ok(s, low) for s in scores_of(tiny_encoder, anchor, negatives))
    capped = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=2, relative_margin=0,
                                                           max_score=-2.0), progress=False)
    assert capped.rows == [] and capped.short == len(rows) and capped.skipped["max_score"] > 0
    a = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=2, relative_margin=0,
                                                           sampling="random", seed=3), progress=False)
    b = mine(tiny_encoder, rows, corpus, MiningSettings(num_negatives=2, relative_margin=0,
                                                           sampling="random", seed=3), progress=False)
    assert a.rows == b.rows and a.rows != top.rows


def test_mnr_mine_writes_rows_mnr_train_takes(tmp_path, tiny_model_dir, capsys):
    folder = beir_folder(tmp_path)
    output = tmp_path / "mined.jsonl"
    assert main(["mine", str(tiny_model_dir), "--data", f"{folder}:train", "--corpus", str(folder), "--output",
                 str(output), "--num-negatives", "4", "--range-max", "12", "--relative-margin", "0", "--device",
                 "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert list(rows[0]) == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4"]
    assert f"{output}: {len(rows)} rows with 4 negatives each; 0 rows found fewer" in out
    data = load_retrieval(f"{folder}:train")
    texts = dict(zip(data.passage_ids, data.passages, strict=True))
    for row in rows:
        query = next(q for q, text in data.queries.items() if text == row["anchor"])
        relevant = {texts[p] for p in data.qrels[query]}
        assert row["positive"] in relevant and not relevant & {row[f"negative_{i}"] for i in range(1, 5)}
    training = load_training_set([str(output)])
    assert training.columns == ("anchor", "positive", "negative", "negative", "negative", "negative")
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(output), "--output", str(tmp_path / "run"),
                 "--batch-size", "2", "--max-seq-length", "32"]) == 0


def test_mnr_mine_counts_rows_left_out(tmp_path, tiny_model_dir, qa_pairs, capsys):
    """A --max-score that about half of the anchors have fewer than 3 candidates under."""
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    rows = load_training_set([str(qa_pairs)]).rows
    corpus = list(dict.fromkeys(p for _, p in rows))
    third_lowest = [sorted(scores_of(encoder, a, [c for c in corpus if c not in {p for b, p in rows if b == a}]))[2]
                    for a in dict.fromkeys(a for a, _ in rows)]
    output = tmp_path / "mined.csv"
    assert main(["mine", str(tiny_model_dir), "--data", str(qa_pairs), "--output", str(output), "--num-negatives",
                 "3", "--max-score", str(float(np.median(third_lowest))), "--relative-margin", "0", "--device",
                 "cpu"]) == 0
    out = capsys.readouterr().out
    written = list(csv.reader(output.open()))
    left_out = int(out.split("rows with 3 negatives each; ")[1].split()[0])
    assert len(written) - 1 + left_out == 25 and 0 < left_out < 25
    assert written[0] == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]


def test_mnr_mine_bad_settings(tmp_path, tiny_model_dir, qa_pairs, capsys):
    assert main(["mine", str(tiny_model_dir), "--data", str(qa_pairs), "--output", str(tmp_path / "x.jsonl"),
                 "--range-max", "2", "--num-negatives", "3"]) == 2
    assert "--range-max - --range-min must leave room for --num-negatives" in capsys.readouterr().err
    assert main(["mine", str(tiny_model_dir), "--data", str(qa_pairs), "--output", str(tmp_path / "x.xlsx")]) == 2
    assert "unknown file type" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_train_mines_the_rows_mnr_mine_writes(tmp_path, tiny_model_dir, caplog):
    """--mine-negatives: training mines, before its first step, the rows `mnr mine` writes with the same settings
    (both take a retrieval folder's corpus by default), keeps them in the run's directory and trains on them."""
    folder = beir_folder(tmp_path)
    mined = tmp_path / "mined.jsonl"
    assert main(["mine", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(mined), "--num-negatives",
                 "2", "--range-max", "12", "--relative-margin", "0", "--device", "cpu"]) == 0  # a random model
    # ranks at random: no margin
    run = tmp_path / "run"
    length = SentenceEncoder.load(str(tiny_model_dir)).max_seq_length
    with caplog.at_level(logging.INFO):
        assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(run),
                     "--mine-negatives", "2", "--mine-range-max", "12", "--mine-relative-margin", "0", "--batch-size",
                     "4", "--max-seq-length", str(length), "--save-every", "0", "--no-bf16"]) == 0  # as mnr mine
    assert (run / "mined.jsonl").read_text() == mined.read_text()
    rows = len(mined.read_text().splitlines())
    assert f"mined: {rows} rows with 2 negatives each" in caplog.text
    trained = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert trained["rows"] == rows // 4 * 4  # batches of 4 rows, the last partial one dropped
    card = (run / "final" / "README.md").read_text()
    assert f"| data | `{folder}:train` ({rows} rows): {rows} rows of (anchor, positive, negative, negative)" in card
    assert "| hard negatives | 2 per row, mined before training: the base model's best-ranked passages of the " \
           "data corpus among its top 12, the anchor's positives excluded; rows that found fewer left out |" in card
    # a corpus file instead of the folder's: negatives come from it only
    other = tmp_path / "corpus.txt"
    other.write_text("\n".join(f"unrelated passage number {i}" for i in range(20)) + "\n")
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train", "--output",
                 str(tmp_path / "run2"), "--mine-negatives", "1", "--mine-corpus", str(other), "--mine-relative-margin",
                 "0", "--batch-size", "4", "--save-every", "0"]) == 0
    lines = (tmp_path / "run2" / "mined.jsonl").read_text().splitlines()
    negatives = {json.loads(line)["negative_1"] for line in lines}
    assert negatives and negatives <= set(other.read_text().splitlines())


def test_the_first_evaluation_reuses_the_corpus_mining_embedded(tmp_path, tiny_model_dir, monkeypatch):
    """--mine-negatives with --ir-dev on the same folder: the base model embeds the corpus once, to mine; the
    evaluation before the first step reuses those embeddings (its scores are the base model's own), and later
    evaluations embed the corpus anew (the model changed)."""
    folder = beir_folder(tmp_path)
    encoded: list[int] = []
    encode = SentenceEncoder.encode

    def counting(self, texts, *args, **kwargs):
        encoded.append(len(texts))
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(SentenceEncoder, "encode", counting)
    dev = RetrievalEvaluator(load_retrieval(f"{folder}:train[:4]"))
    base_scores = dev(SentenceEncoder.load(str(tiny_model_dir), max_seq_length=32))
    with pytest.raises(ValueError, match="expected 24 embeddings of the corpus"):
        dev.reuse(torch.zeros(3, 4))
    encoded.clear()
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train[4:]", "--ir-dev",
                 f"{folder}:train[:4]", "--output", str(run), "--mine-negatives", "1", "--mine-range-max", "12",
                 "--mine-relative-margin", "0", "--batch-size", "4", "--max-seq-length", "32", "--save-every", "0",
                 "--no-bf16"]) == 0
    # mining: 12 anchors, 24 passages; step 0: 4 dev queries only; the end: 4 dev queries, 24 passages
    assert encoded == [12, 24, 4, 4, 24]
    first = next(json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"ir_dev"' in line)
    assert first["step"] == 0 and first["ir_dev"] == pytest.approx(base_scores, abs=1e-9)


def test_train_mines_with_another_model(tmp_path, tiny_model_dir):
    """--mine-model (a second round of mining): that model ranks the candidates, so training mines the rows
    `mnr mine MODEL` writes; training starts from --model and matches training on the mined file, and the
    evaluation before the first step scores --model (not with the miner's embeddings of the corpus)."""
    folder = beir_folder(tmp_path)
    miner = SentenceEncoder.load(str(tiny_model_dir))
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in miner.parameters():
            weight.add_(torch.randn(weight.shape, generator=noise) * 0.5)
    miner_dir = miner.save(tmp_path / "miner")
    mined = {}
    for name, model in (("base", tiny_model_dir), ("miner", miner_dir)):
        mined[name] = tmp_path / f"{name}.jsonl"
        assert main(["mine", str(model), "--data", f"{folder}:train[4:]", "--output", str(mined[name]),
                     "--num-negatives", "1", "--range-max", "12", "--relative-margin", "0", "--device", "cpu"]) == 0
    assert mined["base"].read_text() != mined["miner"].read_text()  # the two models rank differently
    common = ["train", "--model", str(tiny_model_dir), "--ir-dev", f"{folder}:train[:4]", "--batch-size", "4",
              "--max-seq-length", "64", "--save-every", "0", "--no-bf16", "--seed", "3"]
    assert main([*common, "--data", f"{folder}:train[4:]", "--output", str(tmp_path / "a"), "--mine-negatives", "1",
                 "--mine-range-max", "12", "--mine-relative-margin", "0", "--mine-model", str(miner_dir)]) == 0
    assert (tmp_path / "a" / "mined.jsonl").read_text() == mined["miner"].read_text()
    assert main([*common, "--data", str(mined["miner"]), "--output", str(tmp_path / "b")]) == 0
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("a", "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    first = [next(json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()
                  if '"ir_dev"' in line) for run in ("a", "b")]
    base_scores = RetrievalEvaluator(load_retrieval(f"{folder}:train[:4]"))(
        SentenceEncoder.load(str(tiny_model_dir), max_seq_length=64))
    assert first[0]["step"] == 0 and first[0]["ir_dev"] == pytest.approx(base_scores, abs=1e-9)
    assert first[0]["ir_dev"] == pytest.approx(first[1]["ir_dev"], abs=1e-9)
    card = (tmp_path / "a" / "final" / "README.md").read_text()
    assert f"| hard negatives | 1 per row, mined before training: `{miner_dir}`'s best-ranked passages" in card


def test_train_mining_refuses_what_it_cannot_mine_for(tmp_path, tiny_model_dir, capsys):
    triplets = tmp_path / "triplets.jsonl"
    triplets.write_text(json.dumps({"anchor": "a", "positive": "b", "negative": "c"}) + "\n")
    base = ["train", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run")]
    assert main([*base, "--data", str(triplets), "--mine-negatives", "1"]) == 2
    assert "--mine-negatives: the training rows already have negatives (anchor, positive, negative)" in \
        capsys.readouterr().err
    assert main([*base, "--data", str(triplets), "--mine-corpus", "corpus.txt"]) == 2
    assert "--mine-corpus is used only with --mine-negatives" in capsys.readouterr().err
    assert main([*base, "--data", str(triplets), "--mine-model", str(tiny_model_dir)]) == 2
    assert "--mine-model is used only with --mine-negatives" in capsys.readouterr().err
    assert main([*base, "--data", str(triplets), "--mine-negatives", "1", "--loss", "softmax"]) == 2
    assert "--mine-negatives adds negatives to ranking rows; --loss softmax" in capsys.readouterr().err
    folder = beir_folder(tmp_path)
    assert main([*base, "--data", f"{folder}:train", "--mine-negatives", "1", "--mine-corpus",
                 str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main([*base, "--data", f"{folder}:train", "--mine-negatives", "1", "--mine-model",
                 str(tmp_path / "no-such-model"), "--batch-size", "2"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main([*base, "--data", f"{folder}:train", "--mine-negatives", "1", "--nproc", "2"]) == 2
    assert "--mine-negatives with --nproc above 1: mine first with `mnr mine`" in capsys.readouterr().err
    # this random model scores every passage near 0.95: none is at most 1% of a positive's score
    assert main([*base, "--data", f"{folder}:train", "--mine-negatives", "1", "--mine-relative-margin", "0.99",
                 "--batch-size", "2"]) == 2
    assert "--mine-negatives: no row found 1 negatives that pass the filters" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_device_auto_is_the_cpu_here_and_unknown_devices_are_refused(tiny_model_dir, capsys):
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    assert encoder.device == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if not torch.cuda.is_available():
        assert main(["eval", str(tiny_model_dir), "--sts", "x.jsonl", "--device", "cuda"]) == 2
        assert "--device cuda: " in capsys.readouterr().err  # no CUDA build, or no GPU: test_device says which
    assert main(["encode", str(tiny_model_dir), "--input", "x.txt", "--output", "y.npy", "--device", "tpu"]) == 2
    assert "--device must be auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


def test_mnr_mine_and_train_share_one_set_of_mining_defaults(tmp_path, tiny_model_dir, capsys):
    """Mining's settings are defined once (mnr.mine.MiningSettings): mnr mine's flags and mnr train's mine_ keys
    have the same defaults, checks and messages (there under their own names)."""
    from mnr.config import TrainConfig
    from mnr.errors import ConfigError

    assert TrainConfig(mine_negatives=3).mining == MiningSettings()
    assert (MiningSettings().range_max, MiningSettings().relative_margin) == (100, 0.05)
    with pytest.raises(ConfigError, match="--mine-range-max - --mine-range-min must leave room for --mine-negatives"):
        TrainConfig(mine_negatives=3, mine_range_min=5, mine_range_max=7)
    with pytest.raises(ConfigError, match="--mine-sampling must be top or random, got 'best'"):
        TrainConfig(mine_negatives=1, mine_sampling="best")
    # the default margin is on in both: mnr mine says how many candidates it removed
    folder = beir_folder(tmp_path)
    assert main(["mine", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(tmp_path / "m.jsonl"),
                 "--num-negatives", "1", "--device", "cpu"]) == 0
    assert "removed by the relative margin" in capsys.readouterr().out

