"""STS evaluation: rank correlation between cosine similarity and human scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr

from mnr.data import STSExample
from mnr.model import SentenceEncoder


def evaluate_sts(encoder: SentenceEncoder, examples: Sequence[STSExample], batch_size: int = 64,
                 bf16: bool = False) -> dict[str, float]:
    """Spearman and Pearson correlation (x100) of cosine(sentence1, sentence2) with the gold scores.

    Spearman is the headline figure (Reimers et al. 2016, "Task-Oriented Intrinsic Evaluation of
    Semantic Textual Similarity"): it only asks that more similar pairs score higher, which is
    what embeddings are used for. Each distinct sentence is embedded once.
    """
    sentences = list(dict.fromkeys(s for e in examples for s in (e.sentence1, e.sentence2)))
    index = {s: i for i, s in enumerate(sentences)}
    embeddings = encoder.encode(sentences, batch_size=batch_size, normalize=True, bf16=bf16)
    a = embeddings[[index[e.sentence1] for e in examples]]
    b = embeddings[[index[e.sentence2] for e in examples]]
    cosine = (a * b).sum(axis=1)
    gold = np.array([e.score for e in examples], dtype=np.float64)
    return {
        "spearman": float(spearmanr(cosine, gold).statistic) * 100,
        "pearson": float(pearsonr(cosine, gold).statistic) * 100,
    }


def comparison_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per model, Spearman and Pearson for each STS set.

    ``results[model][sts_name] = {"spearman": ..., "pearson": ...}``.
    """
    sets = list(dict.fromkeys(name for per_model in results.values() for name in per_model))
    header = ["model"] + [f"{name} {metric}" for name in sets for metric in ("Spearman", "Pearson")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for model, per_model in results.items():
        cells = [model]
        for name in sets:
            scores = per_model.get(name)
            cells += [f"{scores['spearman']:.2f}", f"{scores['pearson']:.2f}"] if scores else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
