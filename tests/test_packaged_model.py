"""The real all-MiniLM-L6-v2 on the real STS benchmark (skipped without the shared data)."""

from __future__ import annotations

import numpy as np
import pytest

from mnr.cli import main
from mnr.model import SentenceEncoder

pytestmark = pytest.mark.slow


def test_zero_shot_stsb_test_matches_the_published_figure(packaged_model, data_root, capsys):
    """82.03 is sentence-transformers' published STSb test Spearman for all-MiniLM-L6-v2."""
    assert main(["eval", "sentence-transformers/all-MiniLM-L6-v2", "--data-dir", str(data_root)]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    spearman = float(row.split("|")[2])
    assert abs(spearman - 82.03) <= 0.05, row


def test_fine_tuned_real_model_matches_sentence_transformers(packaged_model, data_root, tmp_path):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    output = tmp_path / "run"
    assert main(["train", "--data", "nli/mnli_dev_matched.jsonl.gz", "--data-dir", str(data_root),
                 "--output", str(output), "--max-examples", "64", "--batch-size", "32"]) == 0
    texts = ["A man is playing a guitar.", "The new rights are nice enough", "Two dogs run across a field."]
    ours = SentenceEncoder.load(str(output / "final")).encode(texts)
    theirs = sentence_transformers.SentenceTransformer(str(output / "final"), device="cpu").encode(texts)
    assert np.abs(ours - theirs).max() < 1e-5
