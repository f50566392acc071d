"""Every command right, and saying what it does: encode's inputs and outputs, checks before work,
progress, prompt stops, honest cards and hints, several dev sets."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mnr.cli import main
from mnr.model import SentenceEncoder

from .conftest import SENTENCES, write_jsonl


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def train_args(model, data, output, *extra):
    return ["train", "--model", str(model), "--data", *map(str, data), "--output", str(output), "--batch-size", "4",
            "--max-seq-length", "32", *extra]


# ------------------------------------------------------------------ mnr encode: inputs and outputs


RECORDS = [{"qid": f"q{i}", "question": SENTENCES[i], "answer": SENTENCES[i + 12]} for i in range(5)]


def records_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"input.{kind}"
    if kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(RECORDS[0]), delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(RECORDS)
    elif kind == "jsonl":
        write_jsonl(path, RECORDS)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return path


def read_back(path: Path) -> tuple[list, np.ndarray]:
    """(ids, embeddings) of any output format."""
    if path.suffix == ".npy":
        array = np.load(path)
        return list(range(len(array))), array
    if path.suffix == ".npz":
        with np.load(path) as f:
            return f["ids"].tolist(), f["embeddings"]
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["id"] for r in rows], np.array([r["embedding"] for r in rows], dtype=np.float32)
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    return table["id"], np.array(table["embedding"], dtype=np.float32)


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_encode_embeds_one_row_per_record_as_sentence_transformers_does(tiny_model_dir, tmp_path, kind):
    """A 5-record file gives 5 embeddings (78ab849 embedded a CSV's header line, and JSONL lines raw),
    each sentence-transformers' embedding of that record's text, in every output format."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    source = records_file(tmp_path, kind)
    expected = sentence_transformers.SentenceTransformer(str(tiny_model_dir), device="cpu").encode(
        [r["answer"] for r in RECORDS])
    for suffix in (".npy", ".npz", ".jsonl", ".parquet"):
        output = tmp_path / f"out{suffix}"
        assert main(["encode", str(tiny_model_dir), "--input", str(source), "--output", str(output),
                     "--columns", "text=answer,id=qid"]) == 0
        ids, embeddings = read_back(output)
        assert embeddings.shape == (5, 32), (kind, suffix)
        np.testing.assert_allclose(embeddings, expected, atol=1e-5, err_msg=f"{kind} -> {suffix}")
        assert ids == ([r["qid"] for r in RECORDS] if suffix != ".npy" else list(range(5)))


def test_encode_chooses_the_text_column_or_asks(tiny_model_dir, tmp_path, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", [{"sentence": s} for s in SENTENCES[:3]])
    beir = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": s} for i, s in enumerate(SENTENCES[:3])])
    for source in (one, beir):
        output = tmp_path / f"{source.stem}-embeddings.jsonl"
        assert main(["encode", str(tiny_model_dir), "--input", str(source), "--output", str(output)]) == 0
        ids, embeddings = read_back(output)
        assert ids == ([0, 1, 2] if source is one else ["d0", "d1", "d2"])
        np.testing.assert_allclose(embeddings, SentenceEncoder.load(str(tiny_model_dir)).encode(SENTENCES[:3]),
                                   atol=1e-6)
    several = records_file(tmp_path, "csv")
    assert main(["encode", str(tiny_model_dir), "--input", str(several), "--output", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "which column is the text? The file has qid, question, answer; name it with --columns text=COLUMN" in err
    assert main(["encode", str(tiny_model_dir), "--input", str(several), "--output", str(tmp_path / "x.npy"),
                 "--columns", "text=questoin"]) == 2
    assert "--columns text=questoin: the file has no column 'questoin' (its columns: qid, question, answer)" in \
        capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_encode_refuses_bad_outputs_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(SENTENCES[:4]) + "\n")
    monkeypatch.setattr(SentenceEncoder, "load", lambda *a, **k: pytest.fail("the model loaded before the checks"))
    for output, message in [("e.csv", "--output {}: unknown file type; write .npy, .npz, .jsonl, .parquet"),
                            ("nodir/e.npy", "--output {}: no such directory")]:
        assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(tmp_path / output)]) == 2
        err = capsys.readouterr().err
        assert message.format(tmp_path / output) in err and "Traceback" not in err
    existing = tmp_path / "e.npy"
    existing.write_bytes(b"keep me")
    assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(existing)]) == 2
    assert f"--output {existing} exists; give --overwrite to replace it" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep me"
    monkeypatch.undo()
    assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(existing), "--overwrite"]) == 0
    assert np.load(existing).shape == (4, 32)


@pytest.mark.parametrize("command", ["eval", "encode"])
@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_batch_size_below_one_is_refused(tiny_model_dir, tmp_path, capsys, command, size):
    extra = ["--sts", "x.jsonl"] if command == "eval" else ["--input", "x.txt", "--output", str(tmp_path / "e.npy")]
    with pytest.raises(SystemExit) as stop:
        main([command, str(tiny_model_dir), *extra, "--batch-size", size])
    assert stop.value.code == 2
    assert f"--batch-size: must be at least 1, got {size}" in capsys.readouterr().err


def test_plot_into_a_missing_directory_is_a_clear_error(tiny_model_dir, nli_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, [nli_file], tmp_path / "run")) == 0
    assert main(["plot", str(tmp_path / "run"), "--output", str(tmp_path / "nodir" / "c.png")]) == 2
    err = capsys.readouterr().err
    assert f"--output {tmp_path / 'nodir' / 'c.png'}: no such directory" in err and "Traceback" not in err


def test_version(capsys):
    from mnr import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"mnr {__version__}"


# ------------------------------------------------------------------ checks before work


def test_eval_loads_every_model_before_scoring_any(tiny_model_dir, sts_file, capsys, monkeypatch):
    import mnr.evaluate

    monkeypatch.setattr(mnr.evaluate, "evaluate_sts", lambda *a, **k: pytest.fail("scored before every model loaded"))
    assert main(["eval", str(tiny_model_dir), "./no/such/model", "--sts", str(sts_file)]) == 2
    assert "./no/such/model: no such model directory" in capsys.readouterr().err


@pytest.mark.parametrize("output, message", [
    ("m.parquet", "m.parquet: write .jsonl, .csv or .tsv (optionally .gz)"),
    ("nodir/m.jsonl", "m.jsonl: no such directory"),
    ("existing.jsonl", "existing.jsonl exists; give --overwrite to replace it"),
])
def test_mine_refuses_its_output_before_any_work(tiny_model_dir, tmp_path, capsys, monkeypatch, output, message):
    import mnr.mine

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]}
                                                   for i in range(12)])
    (tmp_path / "existing.jsonl").write_text("keep me\n")
    monkeypatch.setattr(mnr.mine, "mine", lambda *a, **k: pytest.fail("mined before the output was checked"))
    assert main(["mine", str(tiny_model_dir), "--data", str(pairs), "--output", str(tmp_path / output)]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "existing.jsonl").read_text() == "keep me\n"


def test_a_misspelt_column_is_named(tiny_model_dir, tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": SENTENCES[i], "answer": SENTENCES[i + 12]}
                                             for i in range(12)])
    assert main(train_args(tiny_model_dir, [qa], tmp_path / "run", "--columns",
                           "anchor=questoin,positive=answer")) == 2
    assert (f"{qa}:1: --columns anchor=questoin: the file has no column 'questoin' (its columns: question, answer)"
            in capsys.readouterr().err)


def test_a_json_array_file_is_read_and_json_errors_read_well(tiny_model_dir, tmp_path, capsys):
    rows = [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]} for i in range(12)]
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(rows, indent=2))
    assert main(train_args(tiny_model_dir, [array], tmp_path / "run")) == 0
    assert read_log(tmp_path / "run")[-1]["rows"] == 12
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"anchor": "a", "positive": "b}\n')
    assert main(train_args(tiny_model_dir, [broken], tmp_path / "run2")) == 2
    err = capsys.readouterr().err
    assert f"{broken}:1: malformed JSON (column " in err and "at at" not in err


def test_repeating_a_finished_run_from_its_config(tiny_model_dir, nli_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], run)) == 0
    assert "resume = false" in (run / "config.toml").read_text()
    assert main(["train", "--config", str(run / "config.toml")]) == 2
    assert (f"to repeat that run: mnr train --config {run / 'config.toml'} --output NEW_DIR"
            in capsys.readouterr().err)
    assert main(["train", "--config", str(run / "config.toml"), "--output", str(tmp_path / "again")]) == 0
    first, again = (load_file(d / "final" / "model.safetensors") for d in (run, tmp_path / "again"))
    assert all(torch.equal(first[k], again[k]) for k in first)


# ------------------------------------------------------------------ the model's own max length, honest cards


def test_training_keeps_the_models_own_max_length(tiny_model_dir, nli_file, tmp_path):
    """The tiny model is saved with max length 64; 78ab849 saved 128 (its default) whatever the model had."""
    output = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(nli_file), "--output", str(output),
                 "--batch-size", "4"]) == 0
    assert json.loads((output / "final" / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert "| max sequence length | 64 tokens" in (output / "final" / "README.md").read_text()


@pytest.mark.slow
def test_minilm_keeps_its_256_tokens(packaged_model, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]}
                                                   for i in range(8)])
    output = tmp_path / "run"
    assert main(["train", "--model", "sentence-transformers/all-MiniLM-L6-v2", "--data", str(pairs), "--output",
                 str(output), "--batch-size", "4", "--save-every", "0"]) == 0
    assert json.loads((output / "final" / "sentence_bert_config.json").read_text())["max_seq_length"] == 256


def test_a_best_that_is_the_base_model_says_so(tiny_model_dir, nli_file, sts_file, tmp_path):
    """lr 1e-30 changes no weight, so no evaluation beats the base model: best/ is step 0."""
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], output, "--sts-dev", str(sts_file), "--lr", "1e-30",
                           "--eval-steps", "1")) == 0
    card = (output / "best" / "README.md").read_text()
    assert card.count("This is the base model") == 1 and "unchanged, not a fine-tuned one" in card
    assert "fine-tuned from" not in card and "- mnr\n" not in card and "loss:" not in card.split("---")[1]
    final = (output / "final" / "README.md").read_text()
    assert "fine-tuned from" in final and "- mnr\n" in final


# ------------------------------------------------------------------ several dev sets, hints, logs


def test_several_dev_sets_in_one_run(tiny_model_dir, nli_file, tmp_path, capsys):
    from .test_retrieval import beir_folder

    sts_a = write_jsonl(tmp_path / "sts_a.jsonl", [{"sentence1": SENTENCES[i], "sentence2": SENTENCES[i + 1],
                                                    "score": float(i % 6)} for i in range(20)])
    sts_b = write_jsonl(tmp_path / "sts_b.jsonl", [{"sentence1": SENTENCES[i], "sentence2": SENTENCES[i + 3],
                                                    "score": float(i % 4)} for i in range(20)])
    folder = beir_folder(tmp_path)
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], output, "--sts-dev", str(sts_a), "--sts-dev", str(sts_b),
                           "--ir-dev", f"{folder}:train[:6]", "--eval-steps", "2", "--lr", "1e-3",
                           "--best-metric", "sts_dev/sts_b:pearson")) == 0
    printed = capsys.readouterr()
    evaluations = [e for e in read_log(output) if "ir_dev" in e]
    assert [e["step"] for e in evaluations] == [0, 2, 3]
    assert all({"sts_dev/sts_a", "sts_dev/sts_b", "ir_dev"} <= set(e) for e in evaluations)
    best = max(evaluations, key=lambda e: (e["sts_dev/sts_b"]["pearson"], -e["step"]))
    assert f"(sts_dev/sts_b pearson {best['sts_dev/sts_b']['pearson']:.2f} at step {best['step']}" in printed.out
    card = (output / "final" / "README.md").read_text()
    assert f"- sts_dev/sts_a: `{sts_a}`" in card and f"- sts_dev/sts_b: `{sts_b}`" in card
    assert "| sts_dev/sts_a spearman |" in card and "| ir_dev ndcg@10 |" in card
    # the hint runs mnr eval on the dev sets' own files, retrieval included
    next_line = next(line for line in printed.out.splitlines() if line.startswith("next:"))
    assert f"--sts {sts_a} {sts_b} --retrieval {folder}" in next_line
    assert (output / "curves.png").stat().st_size > 0


def test_the_hint_after_a_retrieval_run_names_its_folder(tiny_model_dir, tmp_path, capsys):
    from .test_retrieval import beir_folder

    folder = beir_folder(tmp_path)
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train[4:]", "--ir-dev",
                 f"{folder}:train[:4]", "--output", str(tmp_path / "run"), "--batch-size", "4"]) == 0
    next_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next:"))
    assert f" --retrieval {folder}" in next_line and "YOUR_STS_FILE" not in next_line and "--sts" not in next_line


def test_mining_is_recorded_in_the_log(tiny_model_dir, tmp_path):
    from .test_retrieval import beir_folder

    folder = beir_folder(tmp_path)
    output = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"{folder}:train", "--output", str(output),
                 "--batch-size", "4", "--mine-negatives", "1", "--mine-range-max", "3", "--mine-relative-margin",
                 "0"]) == 0
    [mining] = [e["mining"] for e in read_log(output) if "mining" in e]
    kept = len((output / "mined.jsonl").read_text().splitlines())
    assert mining["rows"] == 16 and mining["kept"] == kept and mining["left_out"] == 16 - kept
    assert set(mining) >= {"model", "candidates_removed", "positive_mean", "negative_mean"}


def test_the_card_says_how_to_reproduce_bf16_dev_scores(tiny_model_dir, nli_file, sts_file, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, [nli_file], output, "--sts-dev", str(sts_file), "--bf16")) == 0
    assert "`mnr eval --bf16` gives the same figures" in (output / "final" / "README.md").read_text()
    last = [e for e in read_log(output) if "sts_dev" in e][-1]["sts_dev"]
    capsys.readouterr()
    assert main(["eval", str(output / "final"), "--sts", str(sts_file), "--bf16"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.split("|")[2].strip() == f"{last['spearman']:.2f}"


def test_eval_shows_progress(tiny_model_dir, sts_file, capsys):
    assert main(["eval", str(tiny_model_dir), "--sts", str(sts_file)]) == 0
    assert re.search(r"sts: +0%\|.*batch/s", capsys.readouterr().err)  # a bar named by the set (78ab849: none)


# ------------------------------------------------------------------ a stop acts within seconds


def slow_evaluation(monkeypatch, at_call: int):
    """The STS evaluator's ``at_call``-th call sends this process SIGTERM and then works for a minute."""
    from mnr.evaluate import STSEvaluator

    real, calls = STSEvaluator.__call__, []

    def call(self, encoder, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        return real(self, encoder, **kwargs)

    monkeypatch.setattr(STSEvaluator, "__call__", call)


def test_sigterm_during_an_evaluation_stops_within_seconds_and_resumes_bitwise(no_dropout_model, nli_file, sts_file,
                                                                               tmp_path, capsys, monkeypatch):
    args = ["--sts-dev", str(sts_file), "--eval-steps", "2", "--epochs", "2", "--save-every", "0", "--lr", "1e-3"]
    reference = tmp_path / "reference"
    assert main(train_args(no_dropout_model, [nli_file], reference, *args)) == 0
    output = tmp_path / "run"
    slow_evaluation(monkeypatch, at_call=2)  # the evaluation of step 2 (the first is the base model's)
    start = time.monotonic()
    assert main(train_args(no_dropout_model, [nli_file], output, *args)) == 143
    assert time.monotonic() - start < 30  # the evaluation would have taken a minute
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 2 of 6; checkpoint" in err
    assert [e["step"] for e in read_log(output) if "sts_dev" in e] == [0]
    monkeypatch.undo()
    assert main(train_args(no_dropout_model, [nli_file], output, *args, "--resume")) == 0
    assert [e["step"] for e in read_log(output) if "sts_dev" in e] == [0, 2, 4, 6]  # step 2 evaluated on resume
    assert [e["sts_dev"] for e in read_log(output) if "sts_dev" in e] == \
        [e["sts_dev"] for e in read_log(reference) if "sts_dev" in e]
    a, b = (load_file(d / "final" / "model.safetensors") for d in (reference, output))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_during_the_base_models_evaluation_or_mining(tiny_model_dir, nli_file, sts_file, tmp_path, capsys,
                                                            monkeypatch):
    slow_evaluation(monkeypatch, at_call=1)
    start = time.monotonic()
    assert main(train_args(tiny_model_dir, [nli_file], tmp_path / "a", "--sts-dev", str(sts_file))) == 143
    assert time.monotonic() - start < 30
    assert "stopped by SIGTERM while evaluating step 0; no checkpoint yet" in capsys.readouterr().err
    monkeypatch.undo()

    import mnr.mine

    from .test_retrieval import beir_folder

    real = mnr.mine.rank

    def slow_rank(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(mnr.mine, "rank", slow_rank)
    folder = beir_folder(tmp_path)
    start = time.monotonic()
    assert main(train_args(tiny_model_dir, [f"{folder}:train"], tmp_path / "b", "--mine-negatives", "1")) == 143
    assert time.monotonic() - start < 30
    assert ("stopped by SIGTERM before the first step (while loading and mining); nothing was trained"
            in capsys.readouterr().err)


def test_the_readmes_python_example_trains_from_a_list_of_pairs(tiny_model_dir, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    after = readme.split("From Python, rows built in code train the same way", 1)[1]
    code = after.split("```python\n", 1)[1].split("```", 1)[0]
    assert '"sentence-transformers/all-MiniLM-L6-v2"' in code and '"runs/faq"' in code
    monkeypatch.chdir(tmp_path)
    exec(code.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(str(tiny_model_dir))), {})
    assert capsys.readouterr().out.strip().endswith("runs/faq/final")
    assert SentenceEncoder.load(str(tmp_path / "runs" / "faq" / "final")).encode(["a question"]).shape == (1, 32)
