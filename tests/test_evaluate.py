from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr

from mnr.evaluate import comparison_table, evaluate_sts, load_sts


def test_evaluate_sts_by_hand(tiny_encoder, sts_file):
    examples = load_sts(str(sts_file))
    scores = evaluate_sts(tiny_encoder, examples, batch_size=4)
    a = tiny_encoder.encode([e.sentence1 for e in examples])
    b = tiny_encoder.encode([e.sentence2 for e in examples])
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    gold = [e.score for e in examples]
    assert abs(scores["spearman"] - 100 * spearmanr(cosine, gold).statistic) < 1e-4
    assert abs(scores["pearson"] - 100 * pearsonr(cosine, gold).statistic) < 1e-4


def test_comparison_table():
    table = comparison_table({
        "base": {"stsb_dev": {"spearman": 86.716, "pearson": 86.9}, "stsb_test": {"spearman": 82.03, "pearson": 83}},
        "runs/nli/final": {"stsb_test": {"spearman": 83.5, "pearson": 84.25}},
    })
    assert table.splitlines() == [
        "| model | stsb_dev Spearman | stsb_dev Pearson | stsb_test Spearman | stsb_test Pearson |",
        "|---|---:|---:|---:|---:|",
        "| base | 86.72 | 86.90 | 82.03 | 83.00 |",
        "| runs/nli/final |  |  | 83.50 | 84.25 |",
    ]
