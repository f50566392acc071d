"""Evaluation: what a model is measured on, during training (to keep the best) and after.

An evaluator is anything with a ``name``, a ``primary`` metric and a call that scores an encoder
(the ``Evaluator`` protocol). The trainer logs every metric of every evaluator it is given and
keeps as ``best/`` the model with the highest value of the one metric the run names. STS
correlation lives here; retrieval (NDCG, MRR, recall over a corpus) in ``mnr.retrieval``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from scipy.stats import pearsonr, spearmanr

from mnr.data import STSExample
from mnr.model import SentenceEncoder


class Evaluator(Protocol):
    name: str  # the key its results are logged under, e.g. "sts_dev"
    primary: str  # its headline metric (higher is better), e.g. "spearman"
    metrics: tuple[str, ...]  # every metric it reports (all higher-is-better)

    def __call__(self, encoder: SentenceEncoder, *, batch_size: int = 64, bf16: bool = False,
                 progress: bool = False) -> dict[str, float]:
        """Every metric, by name (x100 where it is a fraction); ``progress``: a progress bar while it runs."""
        ...


def evaluate_sts(encoder: SentenceEncoder, examples: Sequence[STSExample], batch_size: int = 64,
                 bf16: bool = False, progress: bool | str = False) -> dict[str, float]:
    """Spearman and Pearson correlation (x100) of cosine(sentence1, sentence2) with the gold scores.

    Spearman is the headline figure (Reimers et al. 2016, "Task-Oriented Intrinsic Evaluation of
    Semantic Textual Similarity"): it only asks that more similar pairs score higher, which is
    what embeddings are used for. Each distinct sentence is embedded once.
    """
    sentences = list(dict.fromkeys(s for e in examples for s in (e.sentence1, e.sentence2)))
    index = {s: i for i, s in enumerate(sentences)}
    embeddings = encoder.encode(sentences, batch_size=batch_size, normalize=True, bf16=bf16, show_progress=progress)
    a = embeddings[[index[e.sentence1] for e in examples]]
    b = embeddings[[index[e.sentence2] for e in examples]]
    cosine = (a * b).sum(axis=1)
    gold = np.array([e.score for e in examples], dtype=np.float64)
    return {
        "spearman": float(spearmanr(cosine, gold).statistic) * 100,
        "pearson": float(pearsonr(cosine, gold).statistic) * 100,
    }


class STSEvaluator:
    """STS correlation of one set of scored sentence pairs; Spearman is its primary metric."""

    primary = "spearman"
    metrics = ("spearman", "pearson")

    def __init__(self, examples: Sequence[STSExample], name: str = "sts_dev"):
        self.examples = examples
        self.name = name

    def __call__(self, encoder: SentenceEncoder, *, batch_size: int = 64, bf16: bool = False,
                 progress: bool = False) -> dict[str, float]:
        return evaluate_sts(encoder, self.examples, batch_size, bf16, progress=progress and self.name)


def comparison_table(results: dict[str, dict[str, dict[str, float]]], metrics: dict[str, str] | None = None) -> str:
    """A markdown table: one row per model, for each evaluation set the chosen metrics.

    ``results[model][set_name] = {metric: value}``; ``metrics`` maps a metric key to its column
    title (default: STS's Spearman and Pearson).
    """
    metrics = metrics or {"spearman": "Spearman", "pearson": "Pearson"}
    sets = list(dict.fromkeys(name for per_model in results.values() for name in per_model))
    header = ["model"] + [f"{name} {title}" for name in sets for title in metrics.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for model, per_model in results.items():
        cells = [model]
        for name in sets:
            scores = per_model.get(name)
            cells += [f"{scores[key]:.2f}" for key in metrics] if scores else [""] * len(metrics)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
