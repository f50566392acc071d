"""Semantic search: a corpus, queries and relevance judgements; exact search; the IR metrics.

A retrieval data set is a folder in BEIR's layout:

    corpus.jsonl[.gz]                       _id, title, text   (a passage is title + " " + text)
    queries.jsonl[.gz]                      _id, text
    qrels_<split>.jsonl[.gz]                query_id, corpus_id, score      (or BEIR's own:)
    qrels/<split>.tsv                       query-id, corpus-id, score      (with that header)

and is named ``DIR[:SPLIT][[START:STOP]]``: ``retrieval/scifact:test``, or a part of a split's
queries, ``retrieval/scifact:train[:100]`` and ``retrieval/scifact:train[100:]`` (counts or
percents). A part is taken in a fixed pseudo-random order of the query ids (by hash), so the first
100 are a random sample and the two parts above are disjoint and cover the split. That is how a
dev set is carved from training queries, never from the test queries.

A query counts as judged when at least one passage has a score above 0; queries whose judgements
are all 0 are skipped and counted. Bad input fails with the file and line: a judgement naming an
unknown query or passage, a passage without text, a duplicate passage id, an empty corpus, a split
without a qrels file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnr.data import TrainingSet, read_records, split_spec
from mnr.errors import DataError
from mnr.model import SentenceEncoder

# The metrics mnr eval --retrieval prints, in this order; the first is the headline one (trec_eval
# definitions: relevant = judged score > 0; NDCG with the judged scores as gains and the ideal
# ranking of all judged passages; MAP@100 and recall over all relevant passages of the query).
METRICS = {"ndcg@10": "NDCG@10", "mrr@10": "MRR@10", "map@100": "MAP@100", "recall@10": "Recall@10",
           "recall@100": "Recall@100"}
TOP_K = 100  # passages ranked per query: the deepest cut of METRICS

@dataclass
class RetrievalSet:
    """A corpus and the judged queries of one split (or part of one)."""

    name: str  # as given, e.g. "retrieval/scifact:test"
    passage_ids: list[str]
    passages: list[str]  # title + " " + text
    queries: dict[str, str]  # judged query id -> text, in file order
    qrels: dict[str, dict[str, int]]  # query id -> {passage id: score > 0}
    skipped: int  # queries of the split none of whose judgements is above 0


def load_retrieval(spec: str, default_split: str = "test") -> RetrievalSet:
    """Read a retrieval folder's corpus and the judged queries of the split ``spec`` names."""
    folder_name, split, part = split_spec(spec)
    folder, split = Path(folder_name), split or default_split
    if not folder.is_dir():
        raise DataError(f"{folder}: no such retrieval folder")
    qrels_file = _qrels_file(folder, split)
    passage_ids, passages = load_corpus(folder)
    known_passages = set(passage_ids)
    all_queries = _load_queries(folder)
    judged: dict[str, dict[str, int]] = {}
    for where, record in read_records(str(qrels_file)):
        query, passage, score = _judgement(record, where)
        if query not in all_queries:
            raise DataError(f"{where}: unknown query id {query!r} (not in {_find(folder, 'queries')})")
        if passage not in known_passages:
            raise DataError(f"{where}: unknown passage id {passage!r} (not in {_find(folder, 'corpus')})")
        judged.setdefault(query, {})[passage] = score
    relevant = {q: {p: s for p, s in scores.items() if s > 0} for q, scores in judged.items()}
    kept = [q for q in judged if relevant[q]]
    skipped = len(judged) - len(kept)
    if part is not None:
        kept = _part(kept, part, spec)
    if not kept:
        raise DataError(f"{spec}: no query with a relevant passage (a judgement score above 0)")
    return RetrievalSet(spec, passage_ids, passages, {q: all_queries[q] for q in kept},
                        {q: relevant[q] for q in kept}, skipped)


def load_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """The passages of ``folder``'s corpus file: ids and texts (title + " " + text, stripped)."""
    path = _find(folder, "corpus")
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, str] = {}
    for where, record in read_records(str(path)):
        passage = _id(record, "_id", where)
        if passage in first_line:
            raise DataError(f"{where}: duplicate passage id {passage!r} (first at {first_line[passage]})")
        first_line[passage] = where.rsplit(":", 1)[-1]
        title, text = record.get("title") or "", record.get("text") or ""
        if not isinstance(title, str) or not isinstance(text, str):
            raise DataError(f"{where}: title and text must be text")
        full = f"{title} {text}".strip()
        if not full:
            raise DataError(f"{where}: passage {passage!r} has no text (empty title and text)")
        ids.append(passage)
        texts.append(full)
    if not ids:
        raise DataError(f"{path}: empty corpus (no passages)")
    return ids, texts


def training_set(spec: str) -> TrainingSet:
    """(query, relevant passage) rows of every judged query of the split ``spec`` names (default: train)."""
    data = load_retrieval(spec, default_split="train")
    index = dict(zip(data.passage_ids, data.passages, strict=True))
    rows = [(data.queries[q], index[p]) for q, relevant in data.qrels.items() for p in relevant]
    return TrainingSet(("anchor", "positive"), rows, {spec: len(rows)})


# ---------------------------------------------------------------- search and metrics


def search(queries: torch.Tensor, passages: torch.Tensor, k: int, device: torch.device | str = "cpu",
           query_chunk: int = 1024, passage_chunk: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search: the ``k`` passages of highest dot product for each query, best first.

    ``queries`` (Q, D) and ``passages`` (N, D), normalised for cosine. Scores are computed a block
    of (``query_chunk`` x ``passage_chunk``) at a time on ``device`` and merged into a running top-k,
    so memory never holds a Q x N matrix. Returns (Q, k) scores and (Q, k) passage indices (on the CPU).
    """
    k = min(k, len(passages))
    best_scores, best_indices = [], []
    for q0 in range(0, len(queries), query_chunk):
        q = queries[q0 : q0 + query_chunk].to(device)
        top_scores = torch.full((len(q), 0), -math.inf, device=device)
        top_indices = torch.zeros((len(q), 0), dtype=torch.long, device=device)
        for p0 in range(0, len(passages), passage_chunk):
            p = passages[p0 : p0 + passage_chunk].to(device)
            scores = q @ p.T  # (q, p)
            chunk_scores, chunk_indices = scores.topk(min(k, len(p)), dim=1)
            merged_scores = torch.cat([top_scores, chunk_scores], dim=1)
            merged_indices = torch.cat([top_indices, chunk_indices + p0], dim=1)
            top_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            top_indices = merged_indices.gather(1, order)
        best_scores.append(top_scores.cpu())
        best_indices.append(top_indices.cpu())
    return torch.cat(best_scores), torch.cat(best_indices)


def query_metrics(ranking: Sequence[str], relevant: dict[str, int]) -> dict[str, float]:
    """The METRICS of one query: ``ranking`` the retrieved passage ids, best first; ``relevant`` its
    judged passages with score > 0 (the score is the gain)."""
    gains = [relevant.get(p, 0) for p in ranking]
    hits = [g > 0 for g in gains]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(relevant.values(), reverse=True)[:10]))
    first = next((i for i, hit in enumerate(hits[:10]) if hit), None)
    precisions = [sum(hits[: i + 1]) / (i + 1) for i, hit in enumerate(hits[:100]) if hit]
    return {
        "ndcg@10": dcg / ideal,
        "mrr@10": 0.0 if first is None else 1 / (first + 1),
        "map@100": sum(precisions) / len(relevant),
        "recall@10": sum(hits[:10]) / len(relevant),
        "recall@100": sum(hits[:100]) / len(relevant),
    }


def mean_metrics(rankings: dict[str, Sequence[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """METRICS averaged over the queries of ``qrels``, x100."""
    per_query = [query_metrics(rankings[q], relevant) for q, relevant in qrels.items()]
    return {name: 100 * float(np.mean([m[name] for m in per_query])) for name in METRICS}


def encode_for_search(encoder: SentenceEncoder, texts: Sequence[str], batch_size: int, bf16: bool,
                      what: str = "") -> torch.Tensor:
    """Normalised (N, D) embeddings for cosine search."""
    return torch.from_numpy(encoder.encode(texts, batch_size=batch_size, normalize=True, bf16=bf16,
                                           show_progress=bool(what) and len(texts) > 5000))


class RetrievalEvaluator:
    """Retrieval quality on one split: rank the whole corpus for every judged query; NDCG@10 first.

    The corpus is embedded anew at every call (the model changed), unless the caller has its embeddings
    by this very model (``passages``: mining's, before the first step); search runs where the encoder is.
    """

    primary = "ndcg@10"
    metrics = tuple(METRICS)

    def __init__(self, data: RetrievalSet, name: str = "ir_dev"):
        self.data = data
        self.name = name

    def __call__(self, encoder: SentenceEncoder, *, batch_size: int = 64, bf16: bool = False,
                 passages: torch.Tensor | None = None) -> dict[str, float]:
        query_ids = list(self.data.qrels)
        queries = encode_for_search(encoder, [self.data.queries[q] for q in query_ids], batch_size, bf16)
        if passages is None:
            passages = encode_for_search(encoder, self.data.passages, batch_size, bf16, what="corpus")
        elif passages.shape != (len(self.data.passages), encoder.dim):
            raise ValueError(f"passages: expected ({len(self.data.passages)}, {encoder.dim}) embeddings of the corpus, "
                             f"got {tuple(passages.shape)}")
        _, top = search(queries, passages, TOP_K, encoder.device)
        rankings = {q: [self.data.passage_ids[i] for i in row] for q, row in zip(query_ids, top.tolist(),
                                                                                   strict=True)}
        return mean_metrics(rankings, self.data.qrels)


# ---------------------------------------------------------------- files


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem}.jsonl or {stem}.jsonl.gz (a retrieval folder in BEIR's layout)")


def splits(folder: Path) -> list[str]:
    """The splits ``folder`` has qrels for."""
    ours = [p.name.removeprefix("qrels_").split(".")[0] for p in folder.glob("qrels_*.jsonl*")]
    beir = [p.stem for p in (folder / "qrels").glob("*.tsv")] if (folder / "qrels").is_dir() else []
    return sorted(set(ours + beir))


def _qrels_file(folder: Path, split: str) -> Path:
    for path in (folder / f"qrels_{split}.jsonl", folder / f"qrels_{split}.jsonl.gz",
                 folder / "qrels" / f"{split}.tsv"):
        if path.is_file():
            return path
    raise DataError(f"{folder}: no qrels for split {split!r} (found: {', '.join(splits(folder)) or 'none'}; expected "
                    f"qrels_{split}.jsonl[.gz] or qrels/{split}.tsv)")


def _load_queries(folder: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for where, record in read_records(str(_find(folder, "queries"))):
        query = _id(record, "_id", where)
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: query {query!r} has no text")
        queries[query] = text
    return queries


def _id(record: dict, column: str, where: str) -> str:
    value = record.get(column)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"{where}: missing or empty {column!r}")
    return str(value)


def _judgement(record: dict, where: str) -> tuple[str, str, int]:
    """(query id, passage id, score) of a qrels line, in our column names or BEIR's."""
    query = _id(record, "query_id" if "query_id" in record else "query-id", where)
    passage = _id(record, "corpus_id" if "corpus_id" in record else "corpus-id", where)
    score = record.get("score")
    try:
        score = int(score)
    except (TypeError, ValueError):
        raise DataError(f"{where}: score must be an integer, got {score!r}") from None
    return query, passage, score


def _part(queries: list[str], part: str, spec: str) -> list[str]:
    """The queries ``part`` ("A:B", counts or percents) names, in a fixed order of their ids' hashes."""
    order = sorted(queries, key=lambda q: hashlib.sha1(q.encode()).hexdigest())

    def bound(text: str, default: int) -> int:
        if not text:
            return default
        try:
            return round(len(order) * float(text[:-1]) / 100) if text.endswith("%") else int(text)
        except ValueError:
            raise DataError(f"{spec}: a part is [START:STOP] with counts or percents, e.g. [:100] or "
                            "[20%:]") from None

    start, stop = part.split(":")
    chosen = set(order[bound(start, 0) : bound(stop, len(order))])
    return [q for q in queries if q in chosen]  # file order
