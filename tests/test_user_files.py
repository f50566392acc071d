"""Files real users have, and stops that are not failures: each test is named after the input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnr.cli import main
from mnr.data import load_training_set, parse_column_map
from mnr.errors import DataError
from mnr.evaluate import load_sts

from .conftest import SENTENCES, write_jsonl
from .test_checkpoint import SLOW, spawn, wait_for_step

ROOT = Path(__file__).resolve().parent.parent


def train_args(model, data, output, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
            "--max-seq-length", "32", *extra]


# ------------------------------------------------------------------ a UTF-8 byte-order mark (Excel's "CSV UTF-8")


@pytest.mark.parametrize("name", ["bom.csv", "bom.tsv", "bom.jsonl"])
def test_excel_csv_utf8_with_a_byte_order_mark(tiny_model_dir, tmp_path, capsys, name):
    delimiter = "\t" if name.endswith(".tsv") else ","
    if name.endswith(".jsonl"):
        text = "".join(json.dumps({"question": SENTENCES[i], "answer": SENTENCES[i + 12]}) + "\n" for i in range(12))
    else:
        rows = [(SENTENCES[i].replace(",", ""), SENTENCES[i + 12].replace(",", "")) for i in range(12)]
        text = f"question{delimiter}answer\r\n" + "".join(f"{q}{delimiter}{a}\r\n" for q, a in rows)
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    output = tmp_path / "run"
    assert main(train_args(tiny_model_dir, path, output, "--columns", "anchor=question,positive=answer")) == 0, \
        capsys.readouterr().err
    assert (output / "final").is_dir()


def test_plain_header_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"\xef\xbb\xbfanchor,positive\na,b\nc,d\n")
    assert load_training_set([str(path)]).rows == [("a", "b"), ("c", "d")]


# ------------------------------------------------------------------ one 50 MB text


def peak_rss_of_training(model, data, output) -> tuple[float, str]:
    """Peak RSS (MB) of a child process that trains (the whole process, import to exit), and its stderr."""
    script = ("import resource, sys\nfrom mnr.cli import main\ncode = main(sys.argv[1:])\n"
              "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script, *train_args(model, data, output)],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout.split("PEAK")[1]), result.stderr


@pytest.fixture
def huge_row_data(tmp_path):
    """40 ordinary pairs, and the same plus one row whose positive is a 50 MB text."""
    rows = [{"anchor": f"{SENTENCES[i % 24]} ({i})", "positive": f"{SENTENCES[(i + 5) % 24]} [{i}]"} for i in range(40)]
    normal = write_jsonl(tmp_path / "normal.jsonl", rows)
    huge = write_jsonl(tmp_path / "huge.jsonl", rows + [{"anchor": "the long one", "positive": "word " * 10_000_000}])
    return normal, huge


def test_one_jsonl_row_with_a_50_mb_text(tiny_model_dir, tmp_path, huge_row_data):
    normal, huge = huge_row_data
    assert huge.stat().st_size > 50_000_000
    start = time.perf_counter()
    baseline, _ = peak_rss_of_training(tiny_model_dir, normal, tmp_path / "normal")
    normal_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with_huge, stderr = peak_rss_of_training(tiny_model_dir, huge, tmp_path / "huge")
    huge_seconds = time.perf_counter() - start
    assert with_huge < 1.5 * baseline, (baseline, with_huge)
    assert huge_seconds < normal_seconds + 20, (normal_seconds, huge_seconds)
    assert "1 of 82 distinct texts are longer than --max-seq-length 32 tokens and were cut to it" in stderr


def test_ctrl_c_acts_within_two_seconds_with_a_50_mb_text(tiny_model_dir, tmp_path, huge_row_data):
    _, huge = huge_row_data
    output = tmp_path / "run"
    process = spawn(SLOW, train_args(tiny_model_dir, huge, output, "--epochs", "20"))
    wait_for_step(output, 2, process)
    sent = time.perf_counter()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert time.perf_counter() - sent < 2.0
    assert "stopped by SIGINT" in err


# ------------------------------------------------------------------ text files for mnr encode


def test_encode_a_file_ending_in_blank_lines(tiny_model_dir, tmp_path, capsys):
    texts = tmp_path / "trail.txt"
    texts.write_text("one text\nanother text\n\n\n")
    assert main(["encode", str(tiny_model_dir), "--input", str(texts), "--output", str(tmp_path / "e.npy")]) == 0
    assert np.load(tmp_path / "e.npy").shape == (2, 32)
    middle = tmp_path / "middle.txt"
    middle.write_text("one text\n\nanother text\n")
    assert main(["encode", str(tiny_model_dir), "--input", str(middle), "--output", str(tmp_path / "m.npy")]) == 2
    assert f"{middle}:2: empty line" in capsys.readouterr().err


# ------------------------------------------------------------------ messages suggest what the command accepts


def test_eval_sts_file_without_a_score_column(tiny_model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": SENTENCES[i], "sentence2": SENTENCES[i + 1],
                                                 "label": float(i % 5)} for i in range(10)])
    assert main(["eval", str(tiny_model_dir), "--sts", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1: cannot tell the kind of data" in err and "--columns sentence1=" in err and "score=" in err
    # what it suggests works: mnr eval takes --columns
    assert main(["eval", str(tiny_model_dir), "--sts", str(path), "--columns", "score=label"]) == 0
    assert capsys.readouterr().out.startswith("| model | sts Spearman |")


def test_sts_dev_file_without_a_score_column_under_train(tiny_model_dir, tmp_path, capsys):
    """mnr train's --columns maps the training files, so for --sts-dev it is not suggested."""
    sts = write_jsonl(tmp_path / "dev.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1.0}] * 3)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]}
                                                   for i in range(12)])
    assert main(train_args(tiny_model_dir, pairs, tmp_path / "out", "--sts-dev", str(sts))) == 2
    err = capsys.readouterr().err
    assert "rename its columns to sentence1, sentence2, score" in err and "--columns" not in err
    assert load_sts(str(sts), parse_column_map("score=label"))[0].score == 1.0


# ------------------------------------------------------------------ a Latin-1 file


@pytest.mark.parametrize("name", ["latin1.csv", "latin1.jsonl.gz"])
def test_latin1_file(tmp_path, name):
    import gzip

    lines = ["anchor,positive"] + [f"plain {i},text {i}" for i in range(300)] + ["café,crème brûlée"]
    if name.endswith(".jsonl.gz"):
        lines = [json.dumps({"anchor": a, "positive": p}, ensure_ascii=False) for a, p in
                 (line.split(",") for line in lines[1:])]
    data = ("\n".join(lines) + "\n").encode("latin-1")
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    line, column = (302, 4) if name.endswith(".csv") else (301, 16)
    with pytest.raises(DataError, match=rf"^{path}:{line}: not UTF-8 text \(byte 0xe9 at column {column}\); .*"
                                        r"convert it: .*iconv -f latin1 -t utf-8"):
        load_training_set([str(path)])


# ------------------------------------------------------------------ stops that are not failures


def test_sigterm_is_a_clean_stop_not_an_error(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": f"{SENTENCES[i % 24]} ({i})",
                                                    "positive": f"{SENTENCES[(i + 5) % 24]} [{i}]"} for i in range(40)])
    process = spawn(SLOW, train_args(tiny_model_dir, pairs, output, "--epochs", "5"))
    wait_for_step(output, 3, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143
    assert "error" not in err.lower(), err[-2000:]
    assert "mnr train: stopped by SIGTERM at step" in err
    command = err.split("Continue with:\n")[1].strip().splitlines()[0]
    assert command.startswith("mnr train --model") and command.endswith("--resume"), command
    assert f"--output {output}" in command


def test_the_first_evaluation_says_what_runs(tiny_model_dir, nli_file, sts_file, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, nli_file, tmp_path / "run", "--sts-dev", str(sts_file))) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "evaluating the base model on sts_dev before training" in text
    assert text.index("evaluating the base model") < text.index("step 0:")


# ------------------------------------------------------------------ make demo continues a stopped demo


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_continues_a_stopped_run_and_restarts_a_finished_one(tmp_path):
    """The Makefile's demo recipe, with a stand-in for mnr that records its arguments."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "mnr").write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n")
    (fake / "mnr").chmod(0o755)

    def make_demo() -> str:
        (fake / "calls").unlink(missing_ok=True)
        result = subprocess.run(["make", "-s", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "-o", "install",
                                 "demo", f"BIN={fake}"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return (fake / "calls").read_text().splitlines()[0]

    demo = tmp_path / "runs" / "demo"
    assert not make_demo().endswith("--resume")  # nothing there: a fresh run
    demo.mkdir(parents=True)
    (demo / "config.toml").write_text("")
    (demo / "checkpoints").mkdir()
    assert make_demo().endswith("--output runs/demo --resume")  # stopped: continued, not deleted
    assert (demo / "checkpoints").is_dir()
    (demo / "final").mkdir()
    assert not make_demo().endswith("--resume")  # finished: started afresh
    assert not (demo / "checkpoints").exists()
