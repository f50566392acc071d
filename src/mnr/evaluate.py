"""Evaluation: what a model is measured on, during training (to keep the best) and after.

An evaluator is anything with a ``name``, a ``primary`` metric and a call that scores an encoder
(the ``Evaluator`` protocol). The trainer logs every metric of every evaluator it is given and
keeps as ``best/`` the model with the highest value of the one metric the run names. STS files
and their correlation live here; retrieval (NDCG, MRR, recall over a corpus) in ``mnr.retrieval``;
``evaluators`` builds both kinds for ``mnr train``'s dev sets and ``mnr eval`` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy.stats import pearsonr, spearmanr

from mnr.data import STSKind, kind_of, peek, text_of, unknown_columns
from mnr.errors import ConfigError, DataError
from mnr.fileio import resolve_path
from mnr.model import SentenceEncoder
from mnr.prompts import MODELS_OWN, PromptChoice
from mnr.retrieval import RetrievalEvaluator, at_dim, is_retrieval_spec, load_retrieval, resolve_retrieval_spec

STS, RETRIEVAL = "sts", "retrieval"  # the kinds of evaluation set
STS_COLUMNS_HINT = "map other names with --columns, e.g. --columns sentence1=text_a,sentence2=text_b,score=label"


@dataclass
class STSExample:
    sentence1: str
    sentence2: str
    score: float


class Evaluator(Protocol):
    name: str  # the key its results are logged under, e.g. "sts_dev"
    primary: str  # its headline metric (higher is better), e.g. "spearman"
    metrics: tuple[str, ...]  # every metric it reports (all higher-is-better)

    def __call__(self, encoder: SentenceEncoder, *, batch_size: int = 64, bf16: bool = False,
                 progress: bool = False) -> dict[str, float]:
        """Every metric, by name (x100 where it is a fraction); ``progress``: a progress bar while it runs."""
        ...


def load_sts(spec: str, column_map: dict[str, str] | None = None,
             hint: str = "rename its columns to sentence1, sentence2, score") -> list[STSExample]:
    """(sentence1, sentence2, score) examples of an STS file; scores on any scale (STSb: 0-5).

    ``hint`` ends the message for a file whose columns are not those: what the calling command
    offers to fix it (``mnr eval`` has --columns, ``mnr train --sts-dev`` does not).
    """
    columns, records = peek(spec, column_map or {})
    if not isinstance(kind_of(columns), STSKind):
        raise unknown_columns(spec, STSKind.name, hint)
    out = []
    for where, record in records:
        s1, s2 = text_of(record, "sentence1", where), text_of(record, "sentence2", where)
        if "score" not in record:
            raise DataError(f"{where}: missing column 'score'")
        try:
            score = float(record["score"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: score must be a number, got {record['score']!r}") from None
        if score != score:  # NaN would silently poison the correlation
            raise DataError(f"{where}: score is NaN")
        out.append(STSExample(s1, s2, score))
    if len(out) < 2:
        raise DataError(f"{spec}: an STS file needs at least 2 scored pairs to correlate, found {len(out)}")
    return out


def evaluate_sts(encoder: SentenceEncoder, examples: Sequence[STSExample], batch_size: int = 64,
                 bf16: bool = False, progress: bool | str = False, dims: Sequence[int] = (),
                 prompt: str | None = None) -> dict[str, float]:
    """Spearman and Pearson correlation (x100) of cosine(sentence1, sentence2) with the gold scores; with
    ``dims``, also Spearman on the embeddings' first d values (Matryoshka) as spearman@Dd; ``prompt``: put before
    every sentence (default: the model's default prompt, if any).

    Spearman is the headline figure (Reimers et al. 2016, "Task-Oriented Intrinsic Evaluation of
    Semantic Textual Similarity"): it only asks that more similar pairs score higher, which is
    what embeddings are used for. Each distinct sentence is embedded once.
    """
    sentences = list(dict.fromkeys(s for e in examples for s in (e.sentence1, e.sentence2)))
    index = {s: i for i, s in enumerate(sentences)}
    embeddings = encoder.encode(sentences, batch_size=batch_size, normalize=True, bf16=bf16, show_progress=progress,
                                prompt=prompt)
    a = embeddings[[index[e.sentence1] for e in examples]]
    b = embeddings[[index[e.sentence2] for e in examples]]
    gold = np.array([e.score for e in examples], dtype=np.float64)
    similarity = (a * b).sum(axis=1)
    scores = {"spearman": float(spearmanr(similarity, gold).statistic) * 100,
              "pearson": float(pearsonr(similarity, gold).statistic) * 100}
    for d in dims:
        scores[at_dim("spearman", d)] = float(spearmanr(cosine(a[:, :d], b[:, :d]), gold).statistic) * 100
    return scores


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row i: the cosine of a[i] and b[i]."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class STSEvaluator:
    """STS correlation of one set of scored sentence pairs; Spearman is its primary metric (``dims``: also at
    the embeddings' first d values, Matryoshka; ``prompts.sts``: the prompt both sentences get)."""

    primary = "spearman"

    def __init__(self, examples: Sequence[STSExample], name: str = "sts_dev", dims: Sequence[int] = (),
                 prompts: PromptChoice = MODELS_OWN):
        self.examples = examples
        self.prompts = prompts
        self.name = name
        self.dims = tuple(dims)
        self.metrics = ("spearman", "pearson") + tuple(at_dim("spearman", d) for d in self.dims)

    def __call__(self, encoder: SentenceEncoder, *, batch_size: int = 64, bf16: bool = False,
                 progress: bool = False) -> dict[str, float]:
        return evaluate_sts(encoder, self.examples, batch_size, bf16, progress=progress and self.name, dims=self.dims,
                            prompt=encoder.prompt(self.prompts.sts))


def evaluators(sets: dict[str, tuple[str, str]], root: Path | None, *, flags: dict[str, str],
               default_split: str = "dev", strict_qrels: bool = False, ignore_identical_ids: bool = False,
               column_map: dict[str, str] | None = None, hint: str | None = None,
               dims: Sequence[int] = (), prompts: PromptChoice = MODELS_OWN) -> list[Evaluator]:
    """One evaluator per set, loaded (and checked) now: ``sets`` maps a name to (kind, spec), an STS file or a
    retrieval folder ``DIR[:SPLIT][[START:STOP]]`` (``default_split`` where it names none), looked up as given or
    under ``root``; ``flags`` names the flag of each kind in messages; ``column_map`` and ``hint``: STS files';
    ``dims``: each also scores the embeddings' first d values (Matryoshka); ``prompts``: which prompt queries,
    passages and STS sentences get."""
    out: list[Evaluator] = []
    for name, (kind, spec) in sets.items():
        if kind == STS:
            examples = load_sts(resolve_path(spec, root), column_map, **({"hint": hint} if hint else {}))
            out.append(STSEvaluator(examples, name=name, dims=dims, prompts=prompts))
            continue
        if not is_retrieval_spec(spec, root):
            raise ConfigError(f"{flags[kind]} {spec}: no such retrieval folder (DIR[:SPLIT][[START:STOP]])"
                              + ("" if root else "; relative paths are also looked up under --data-dir / "
                                                 "$MNR_DATA_DIR"))
        data = load_retrieval(resolve_retrieval_spec(spec, root), default_split=default_split, strict=strict_qrels)
        out.append(RetrievalEvaluator(data, name=name, ignore_identical_ids=ignore_identical_ids, dims=dims,
                                      prompts=prompts))
    return out


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
