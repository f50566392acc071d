from __future__ import annotations

import csv
import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnr.data import (
    LABELLED,
    load_nli,
    load_training_set,
    nli_pairs,
    nli_triplets,
    parse_column_map,
)
from mnr.errors import DataError
from mnr.evaluate import load_sts
from mnr.fileio import parse_hub_spec, resolve_path

from .conftest import write_jsonl

NLI_ROWS = [
    {"premise": "p1", "hypothesis": "e1", "label": 0},
    {"premise": "p1", "hypothesis": "n1", "label": 1},
    {"premise": "p1", "hypothesis": "c1", "label": 2},
    {"premise": "p2", "hypothesis": "e2a", "label": "entailment"},
    {"premise": "p2", "hypothesis": "e2b", "label": "0"},
    {"premise": "p2", "hypothesis": "c2", "label": "contradiction"},
    {"premise": "p3", "hypothesis": "e3", "label": 0},  # no contradiction: no triplet
    {"premise": "p4", "hypothesis": "x", "label": "-"},  # no gold label: skipped
]


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "csv", "tsv", "parquet"])
def test_nli_loads_from_every_format(tmp_path, fmt):
    path = tmp_path / f"nli.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, NLI_ROWS)
    elif fmt == "jsonl.gz":
        write_jsonl(path, NLI_ROWS, gz=True)
    elif fmt in ("csv", "tsv"):
        write_csv(path, NLI_ROWS, "," if fmt == "csv" else "\t")
    else:
        pq.write_table(pa.Table.from_pylist([{**r, "label": str(r["label"])} for r in NLI_ROWS]), path)
    records = load_nli(str(path))
    assert [(r.premise, r.hypothesis, r.label) for r in records] == [
        ("p1", "e1", 0), ("p1", "n1", 1), ("p1", "c1", 2), ("p2", "e2a", 0), ("p2", "e2b", 0), ("p2", "c2", 2),
        ("p3", "e3", 0),
    ]


def test_nli_pairs_and_triplets(tmp_path):
    records = load_nli(str(write_jsonl(tmp_path / "nli.jsonl", NLI_ROWS)))
    assert nli_pairs(records) == [("p1", "e1"), ("p2", "e2a"), ("p2", "e2b"), ("p3", "e3")]
    # every entailment whose premise has a contradiction; p3 has none
    assert nli_triplets(records) == [("p1", "e1", "c1"), ("p2", "e2a", "c2"), ("p2", "e2b", "c2")]


def test_triplets_cycle_through_contradictions():
    from mnr.data import NLIRecord

    records = [NLIRecord("p", "e1", 0), NLIRecord("p", "c1", 2), NLIRecord("p", "e2", 0), NLIRecord("p", "c2", 2),
               NLIRecord("p", "e3", 0)]
    assert nli_triplets(records) == [("p", "e1", "c1"), ("p", "e2", "c2"), ("p", "e3", "c1")]


def test_training_set_from_nli_for_each_objective(tmp_path):
    path = str(write_jsonl(tmp_path / "nli.jsonl", NLI_ROWS))
    pairs = load_training_set([path])
    assert pairs.columns == ("anchor", "positive") and len(pairs) == 4
    triplets = load_training_set([path], hard_negatives=True)
    assert triplets.columns == ("anchor", "positive", "negative") and len(triplets) == 3
    labelled = load_training_set([path], wants=LABELLED)
    assert labelled.columns == ("premise", "hypothesis") and labelled.labels == [0, 1, 2, 0, 0, 2, 0]


def test_training_set_merges_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", NLI_ROWS[:3])
    b = write_jsonl(tmp_path / "b.jsonl", [{"anchor": "q", "positive": "d"}])
    merged = load_training_set([str(a), str(b)])
    assert merged.rows == [("p1", "e1"), ("q", "d")]
    assert merged.sources == {str(a): 1, str(b): 1}


def test_pairs_with_numbered_negatives_and_column_map(tmp_path):
    path = write_csv(tmp_path / "qa.csv", [
        {"question": "q1", "answer": "a1", "negative_2": "n12", "negative_1": "n11"},
        {"question": "q2", "answer": "a2", "negative_2": "n22", "negative_1": "n21"},
    ])
    data = load_training_set([str(path)], column_map=parse_column_map("anchor=question,positive=answer"))
    assert data.columns == ("anchor", "positive", "negative", "negative")
    assert data.rows == [("q1", "a1", "n11", "n12"), ("q2", "a2", "n21", "n22")]


def test_sts_loader(sts_file):
    examples = load_sts(str(sts_file))
    assert len(examples) == 20 and examples[3].score == 3.0


def test_resolve_path_looks_under_data_dir(tmp_path):
    (tmp_path / "nli").mkdir()
    target = write_jsonl(tmp_path / "nli" / "x.jsonl", NLI_ROWS)
    assert resolve_path("nli/x.jsonl", tmp_path) == str(target)
    assert resolve_path("hf:stanfordnlp/snli:train", None) == "hf:stanfordnlp/snli:train"
    with pytest.raises(DataError, match=r"nli/missing.jsonl: no such file \(nor under the data directory"):
        resolve_path("nli/missing.jsonl", tmp_path)


def test_hub_specs():
    assert parse_hub_spec("hf:stanfordnlp/snli") == ("stanfordnlp/snli", None, "train")
    assert parse_hub_spec("hf:nyu-mll/multi_nli:validation_matched") == ("nyu-mll/multi_nli", None,
                                                                         "validation_matched")
    assert parse_hub_spec("hf:sentence-transformers/all-nli:triplet:dev") == ("sentence-transformers/all-nli",
                                                                              "triplet", "dev")
    with pytest.raises(DataError, match="expected hf:NAME"):
        parse_hub_spec("hf:a:b:c:d")


def test_hub_loading_goes_through_datasets(tmp_path):
    """The hub path is real code: ``datasets.load_dataset`` also reads a local dataset folder, which
    lets us run it offline; a name that cannot be fetched gives a clear error."""
    folder = tmp_path / "my_nli"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", NLI_ROWS[:3] + [{"premise": "p9", "hypothesis": "h9", "label": -1}])
    data = load_training_set([f"hf:{folder}:train"])
    assert data.rows == [("p1", "e1")]
    with pytest.raises(DataError, match="hf:no-such-user/no-such-dataset: cannot load from the Hugging Face hub"):
        load_training_set(["hf:no-such-user/no-such-dataset"])


# ------------------------------------------------------------------ bad input: file, line, problem


def bad(tmp_path, text: str, name: str = "bad.jsonl"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_json_line(tmp_path):
    path = bad(tmp_path, '{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": \n')
    with pytest.raises(DataError, match=rf"^{path}:2: malformed JSON"):
        load_training_set([str(path)])


def test_json_line_that_is_not_an_object(tmp_path):
    path = bad(tmp_path, '{"anchor": "a", "positive": "b"}\n["c", "d"]\n')
    with pytest.raises(DataError, match=rf"^{path}:2: expected a JSON object \(JSON Lines: one object per line\), "
                                        r"got list"):
        load_training_set([str(path)])


def test_missing_column(tmp_path):
    path = bad(tmp_path, '{"anchor": "a", "positive": "b"}\n{"anchor": "c"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: missing column 'positive'"):
        load_training_set([str(path)])


def test_unknown_label(tmp_path):
    path = bad(tmp_path, '{"premise": "a", "hypothesis": "b", "label": 0}\n'
                         '{"premise": "a", "hypothesis": "c", "label": "maybe"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: unknown label 'maybe'; expected 0/entailment"):
        load_training_set([str(path)])


def test_out_of_range_label(tmp_path):
    path = bad(tmp_path, '{"premise": "a", "hypothesis": "b", "label": 7}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: unknown label 7"):
        load_nli(str(path))


def test_empty_text(tmp_path):
    path = bad(tmp_path, '{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": "  "}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: empty text in column 'positive'"):
        load_training_set([str(path)])


def test_text_of_wrong_type(tmp_path):
    path = bad(tmp_path, '{"anchor": "a", "positive": 3}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: column 'positive' must be text, got int 3"):
        load_training_set([str(path)])


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv"])
def test_empty_file(tmp_path, name):
    path = bad(tmp_path, "", name)
    with pytest.raises(DataError, match=rf"^{path}: empty file"):
        load_training_set([str(path)])


def test_csv_header_only_is_empty(tmp_path):
    path = bad(tmp_path, "anchor,positive\n", "header.csv")
    with pytest.raises(DataError, match=rf"^{path}: empty file"):
        load_training_set([str(path)])


def test_empty_gz_file(tmp_path):
    path = tmp_path / "empty.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("")
    with pytest.raises(DataError, match=rf"^{path}: empty file"):
        load_training_set([str(path)])


def test_csv_line_with_wrong_field_count(tmp_path):
    path = bad(tmp_path, "anchor,positive\na,b\nc,d,e\n", "bad.csv")
    with pytest.raises(DataError, match=rf"^{path}:3: malformed line: 3 fields, the header has 2"):
        load_training_set([str(path)])


def test_unknown_columns(tmp_path):
    path = bad(tmp_path, '{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: cannot tell the kind of data .*--columns"):
        load_training_set([str(path)])


def test_unknown_extension(tmp_path):
    path = bad(tmp_path, "x", "data.xlsx")
    with pytest.raises(DataError, match=rf"^{path}: unknown file type"):
        load_training_set([str(path)])


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"anchor": "caf\u00e9", "positive": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"^{path}:1: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_training_set([str(path)])


def test_not_parquet(tmp_path):
    path = bad(tmp_path, "not parquet at all", "data.parquet")
    with pytest.raises(DataError, match=rf"^{path}: not a readable Parquet file"):
        load_training_set([str(path)])


def test_files_with_different_columns(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"anchor": "a", "positive": "b"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"anchor": "c", "positive": "d", "negative": "e"}])
    with pytest.raises(DataError, match=rf"^{b}: gives anchor/positive/negative rows but {a} gives anchor/positive"):
        load_training_set([str(a), str(b)])


def test_softmax_needs_labels(tmp_path, pairs_file):
    with pytest.raises(DataError, match="this loss trains on labelled NLI data"):
        load_training_set([str(pairs_file)], wants=LABELLED)


def test_sts_bad_score(tmp_path):
    path = bad(tmp_path, '{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                         '{"sentence1": "a", "sentence2": "c", "score": "high"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: score must be a number, got 'high'"):
        load_sts(str(path))


def test_sts_file_for_training_is_refused(sts_file):
    with pytest.raises(DataError, match="STS data .* is for evaluation, not training"):
        load_training_set([str(sts_file)])


def test_column_map_errors():
    with pytest.raises(DataError, match="--columns: expected OURS=THEIRS"):
        parse_column_map("anchor")
    with pytest.raises(DataError, match="--columns: unknown column 'query'"):
        parse_column_map("query=question")
