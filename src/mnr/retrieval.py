"""Semantic search: a corpus, queries and relevance judgements; exact search; the IR metrics.

A retrieval data set is a folder in BEIR's layout, or in the layout of the Hugging Face ``mteb/<name>``
data sets (Parquet or JSON Lines shards in a folder per part), each file optionally gzipped:

    corpus.jsonl | corpus.parquet | corpus/*.parquet | corpus/*.jsonl     _id, title, text (a passage is
                                                                          title + " " + text)
    queries.jsonl | queries.parquet | queries/*.parquet | queries/*.jsonl _id, text
    qrels_<split>.jsonl                                  query_id, corpus_id, score   (ours), or
    qrels/<split>.tsv | .jsonl | .parquet | <split>-*.parquet   query-id, corpus-id, score (BEIR, MTEB;
                                                         a .tsv with or without its header line), or
    default/<split>-*.parquet                            (MTEB's qrels under its "default" config)

and is named ``DIR[:SPLIT][[START:STOP]]``: ``retrieval/scifact:test``, or a part of a split's
queries, ``retrieval/scifact:train[:100]`` and ``retrieval/scifact:train[100:]`` (counts or
percents). A part is taken in a fixed pseudo-random order of the query ids (by hash), so the first
100 are a random sample and the two parts above are disjoint and cover the split. That is how a
dev set is carved from training queries, never from the test queries.

A query counts as judged when at least one passage has a score above 0; queries whose judgements
are all 0 are skipped and counted. Published sets (BEIR's, MTEB's) sometimes judge a passage that
is not in their corpus: as BEIR and MTEB do, evaluation keeps it as a relevant passage that can never
be retrieved, and training and mining skip it; one warning says how many (``strict=True``,
``--strict-qrels``, makes it an error, for a user's own data). Bad input fails with the file and
line: a judgement naming an unknown query, a passage without text, a duplicate passage id, an
empty corpus, a split without qrels.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnr.errors import DataError
from mnr.fileio import HUB_PREFIX, format_of, not_utf8, open_text, read_records
from mnr.model import SentenceEncoder
from mnr.prompts import MODELS_OWN, PromptChoice

log = logging.getLogger(__name__)
# The metrics mnr eval --retrieval prints, in this order; the first is the headline one (trec_eval
# definitions: relevant = judged score > 0; NDCG with the judged scores as gains and the ideal
# ranking of all judged passages; MAP@100 and recall over all relevant passages of the query).
METRICS = {"ndcg@10": "NDCG@10", "mrr@10": "MRR@10", "map@100": "MAP@100", "recall@10": "Recall@10",
           "recall@100": "Recall@100"}
TOP_K = 100  # passages ranked per query: the deepest cut of METRICS

# ---------------------------------------------------------------- naming a set: DIR[:SPLIT][[START:STOP]]

# DIR[:SPLIT][[START:STOP]], e.g. retrieval/scifact:train[:100]
RETRIEVAL_SPEC = re.compile(r"^(?P<folder>.*?)(?::(?P<split>[A-Za-z0-9_-]+))?"
                            r"(?:\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\])?$")


def split_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``DIR[:SPLIT][[A:B]]`` -> (DIR, SPLIT or None, "A:B" or None)."""
    match = RETRIEVAL_SPEC.match(spec)
    assert match is not None  # every string matches: the folder takes what the rest does not
    part = f"{match['start']}:{match['stop']}" if match["start"] is not None else None
    return match["folder"], match["split"], part


def is_retrieval_spec(spec: str, root: Path | None = None) -> bool:
    """Whether ``spec`` names a retrieval folder (as given, or under the data directory ``root``)."""
    name = split_spec(spec)[0]
    if not name or spec.startswith(HUB_PREFIX):
        return False
    folder = Path(name).expanduser()
    return folder.is_dir() or (root is not None and not folder.is_absolute() and (root / folder).is_dir())


def resolve_retrieval_spec(spec: str, root: Path | None) -> str:
    """``spec`` with its folder looked up under the data directory when it is not found as given."""
    folder, split, part = split_spec(spec)
    path = Path(folder).expanduser()
    if not path.is_dir() and root is not None and not path.is_absolute() and (root / path).is_dir():
        path = root / path
    return f"{path}" + (f":{split}" if split else "") + (f"[{part}]" if part else "")


@dataclass
class RetrievalSet:
    """A corpus and the judged queries of one split (or part of one)."""

    name: str  # as given, e.g. "retrieval/scifact:test"
    passage_ids: list[str]
    passages: list[str]  # title + " " + text
    queries: dict[str, str]  # judged query id -> text, in file order
    qrels: dict[str, dict[str, int]]  # query id -> {passage id: score > 0}; may name passages not in the corpus
    skipped: int  # queries of the split none of whose judgements is above 0
    missing: int = 0  # judgements (of the queries kept) naming a passage that is not in the corpus


def load_retrieval(spec: str, default_split: str = "test", strict: bool = False) -> RetrievalSet:
    """Read a retrieval folder's corpus and the judged queries of the split ``spec`` names.

    A judgement naming a passage the corpus lacks is kept (evaluation counts it as relevant and never
    retrieved, as BEIR and MTEB do) with one warning; ``strict`` makes it an error."""
    folder_name, split, part = split_spec(spec)
    folder, split = Path(folder_name), split or default_split
    if not folder.is_dir():
        raise DataError(f"{folder}: no such retrieval folder")
    qrels_files = _qrels_files(folder, split)
    passage_ids, passages = load_corpus(folder)
    known_passages = set(passage_ids)
    all_queries = _load_queries(folder)
    judged: dict[str, dict[str, int]] = {}
    missing: dict[tuple[str, str], str] = {}  # (query, passage) -> where
    for where, record in (item for path in qrels_files for item in _qrels_records(path)):
        query, passage, score = _judgement(record, where)
        if query not in all_queries:
            raise DataError(f"{where}: unknown query id {query!r} (not in {_files(folder, 'queries')[0]})")
        if passage not in known_passages:
            if strict:
                raise DataError(f"{where}: unknown passage id {passage!r} (not in {_files(folder, 'corpus')[0]}; "
                                "without --strict-qrels it would count as relevant and never retrieved)")
            missing[query, passage] = where
        judged.setdefault(query, {})[passage] = score
    relevant = {q: {p: s for p, s in scores.items() if s > 0} for q, scores in judged.items()}
    kept = [q for q in judged if relevant[q]]
    skipped = len(judged) - len(kept)
    if part is not None:
        kept = _part(kept, part, spec)
    if not kept:
        raise DataError(f"{spec}: no query with a relevant passage (a judgement score above 0)")
    chosen = set(kept)
    missing = {key: where for key, where in missing.items() if key[0] in chosen and key[1] in relevant[key[0]]}
    if missing:
        first = ", ".join(f"{p!r} ({where})" for (_, p), where in list(missing.items())[:3])
        log.warning("%s: %d judged relevant passage%s not in the corpus, e.g. %s: evaluation counts them as "
                    "relevant and never retrieved (as BEIR and MTEB do), training and mining skip them; --strict-qrels "
                    "refuses them", spec, len(missing), " is" if len(missing) == 1 else "s are", first)
    return RetrievalSet(spec, passage_ids, passages, {q: all_queries[q] for q in kept},
                        {q: relevant[q] for q in kept}, skipped, len(missing))


def load_corpus(folder: Path) -> tuple[list[str], list[str]]:
    """The passages of ``folder``'s corpus (every shard, in name order): ids and texts (title + " " + text,
    stripped)."""
    files = _files(folder, "corpus")
    ids: list[str] = []
    texts: list[str] = []
    first_seen: dict[str, str] = {}
    for where, record in (item for path in files for item in read_records(str(path))):
        passage = _id(record, "_id", where)
        if passage in first_seen:
            raise DataError(f"{where}: duplicate passage id {passage!r} (first at {first_seen[passage]})")
        first_seen[passage] = where.rsplit(":", 1)[-1] if len(files) == 1 else where
        title, text = record.get("title") or "", record.get("text") or ""
        if not isinstance(title, str) or not isinstance(text, str):
            raise DataError(f"{where}: title and text must be text")
        full = f"{title} {text}".strip()
        if not full:
            raise DataError(f"{where}: passage {passage!r} has no text (empty title and text)")
        ids.append(passage)
        texts.append(full)
    if not ids:
        raise DataError(f"{files[0] if len(files) == 1 else files[0].parent}: empty corpus (no passages)")
    return ids, texts


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


def mean_of_sets(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric's unweighted mean over several retrieval sets (``results[set][metric]``), as MTEB and BEIR
    report an average: every data set counts once, whatever its number of queries."""
    first = next(iter(results.values()))
    return {name: float(np.mean([scores[name] for scores in results.values()])) for name in first}


def retrieval_table(results: dict[str, dict[str, dict[str, float]]], metrics: dict[str, str] | None = None) -> str:
    """A markdown table of ``results[model][set][metric]``: a row per model and set, and with several sets
    a row of their mean per model; ``metrics``: the columns (key: title; default METRICS)."""
    metrics = metrics or METRICS
    lines = ["| model | set | " + " | ".join(metrics.values()) + " |", "|---|---|" + "---:|" * len(metrics)]
    for model, sets in results.items():
        rows = dict(sets)
        if len(sets) > 1:
            rows[f"mean of {len(sets)} sets"] = mean_of_sets(sets)
        lines += [f"| {model} | {name} | " + " | ".join(f"{scores[m]:.2f}" for m in metrics) + " |"
                  for name, scores in rows.items()]
    return "\n".join(lines)


def encode_for_search(encoder: SentenceEncoder, texts: Sequence[str], batch_size: int, bf16: bool,
                      what: str = "", dim: int | None = None, prompt: str | None = None) -> torch.Tensor:
    """Normalised (N, D) embeddings for cosine search (``dim``: the first ``dim`` values, renormalised; ``prompt``:
    put before each text, ``SentenceEncoder.encode``'s); ``what`` names a progress bar (none without it)."""
    return torch.from_numpy(encoder.encode(texts, batch_size=batch_size, normalize=True, bf16=bf16,
                                           show_progress=what or False, dim=dim, prompt=prompt))


def at_dim(metric: str, dim: int) -> str:
    """The name of ``metric`` measured on the embeddings' first ``dim`` values, e.g. ndcg@10@64d."""
    return f"{metric}@{dim}d"


class RetrievalEvaluator:
    """Retrieval quality on one split: rank the whole corpus for every judged query; NDCG@10 first.

    The corpus is embedded anew at every call (the model changed), unless the caller has its embeddings
    by this very model (``reuse``: mining's, before the first step); search runs where the encoder is.
    ``ignore_identical_ids`` leaves a passage whose id is the query's own out of that query's ranking
    (MTEB's rule for sets whose queries are themselves passages: argument retrieval, duplicate questions).
    ``prompts``: the prompt queries and passages get (default: those sentence-transformers' encode_query and
    encode_document apply, if the model has them).
    """

    primary = "ndcg@10"

    def __init__(self, data: RetrievalSet, name: str = "ir_dev", ignore_identical_ids: bool = False,
                 dims: Sequence[int] = (), prompts: PromptChoice = MODELS_OWN):
        self.data = data
        self.prompts = prompts
        self.name = name
        self.ignore_identical_ids = ignore_identical_ids
        self.dims = tuple(dims)  # also the headline metric on the embeddings' first d values (Matryoshka): NDCG@10@Dd
        self.metrics = tuple(METRICS) + tuple(at_dim(self.primary, d) for d in self.dims)
        self.reused: torch.Tensor | None = None

    def reuse(self, passages: torch.Tensor) -> None:
        """The next call scores with these embeddings of the corpus (the evaluated model's own, e.g. mining's by
        the base model) instead of encoding it again; later calls encode it."""
        if passages.shape[0] != len(self.data.passages):
            raise ValueError(f"passages: expected {len(self.data.passages)} embeddings of the corpus, got "
                             f"{tuple(passages.shape)}")
        self.reused = passages

    def __call__(self, encoder: SentenceEncoder, *, batch_size: int = 64, bf16: bool = False,
                 progress: bool = False) -> dict[str, float]:
        passages, self.reused = self.reused, None
        queries, passages = self._embed(encoder, batch_size, bf16, progress, passages)
        scores = mean_metrics(self._ranked(queries, passages, encoder), self.data.qrels)
        for d in self.dims:  # the same embeddings, cut to d values and renormalised
            cut = [torch.nn.functional.normalize(x[:, :d], dim=-1) for x in (queries, passages)]
            scores[at_dim(self.primary, d)] = mean_metrics(self._ranked(*cut, encoder), self.data.qrels)[self.primary]
        return scores

    def rankings(self, encoder: SentenceEncoder, *, batch_size: int = 64, bf16: bool = False,
                 progress: bool = False, passages: torch.Tensor | None = None) -> dict[str, list[str]]:
        """The TOP_K passage ids each judged query ranks first, best first."""
        return self._ranked(*self._embed(encoder, batch_size, bf16, progress, passages), encoder)

    def _embed(self, encoder: SentenceEncoder, batch_size: int, bf16: bool, progress: bool,
               passages: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The judged queries' embeddings and the corpus's (``passages``, when the caller has them)."""
        queries = encode_for_search(encoder, [self.data.queries[q] for q in self.data.qrels], batch_size, bf16,
                                    what=progress and f"{self.name}: queries",
                                    prompt=encoder.prompt(self.prompts.query, "query"))
        if passages is None:
            passages = encode_for_search(encoder, self.data.passages, batch_size, bf16,
                                         what=progress and f"{self.name}: corpus",
                                         prompt=encoder.prompt(self.prompts.corpus, "document"))
        elif passages.shape != (len(self.data.passages), encoder.dim):
            raise ValueError(f"passages: expected ({len(self.data.passages)}, {encoder.dim}) embeddings of the corpus, "
                             f"got {tuple(passages.shape)}")
        return queries, passages

    def _ranked(self, queries: torch.Tensor, passages: torch.Tensor, encoder: SentenceEncoder) -> dict[str, list[str]]:
        query_ids = list(self.data.qrels)
        # one passage at most has the query's id (ids are unique): one more than TOP_K is enough to drop it
        _, top = search(queries, passages, TOP_K + self.ignore_identical_ids, encoder.device)
        ids = self.data.passage_ids
        return {q: [ids[i] for i in row if not (self.ignore_identical_ids and ids[i] == q)][:TOP_K]
                for q, row in zip(query_ids, top.tolist(), strict=True)}


# ---------------------------------------------------------------- files

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")


def _files(folder: Path, stem: str) -> list[Path]:
    """``stem``'s file(s) in ``folder``: ``stem.jsonl[.gz]`` or ``stem.parquet``, else every JSON Lines or
    Parquet shard of the folder ``stem/`` (the Hugging Face layout), in name order."""
    for suffix in DATA_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return [folder / f"{stem}{suffix}"]
    shards = sorted(p for p in (folder / stem).glob("*") if p.name.endswith(DATA_SUFFIXES)) \
        if (folder / stem).is_dir() else []
    if shards:
        return shards
    raise DataError(f"{folder}: no {stem}.jsonl[.gz], {stem}.parquet or {stem}/*.parquet (a retrieval folder in "
                    "BEIR's or MTEB's layout)")


QRELS_SUFFIXES = (".tsv", ".tsv.gz", *DATA_SUFFIXES)


def _qrels_files(folder: Path, split: str) -> list[Path]:
    """The qrels file(s) of ``split``: ours (qrels_<split>.jsonl), BEIR's (qrels/<split>.tsv) or MTEB's
    (qrels/<split>.parquet, or shards qrels/<split>-*.parquet, default/<split>-*.parquet)."""
    for path in [folder / f"qrels_{split}{suffix}" for suffix in DATA_SUFFIXES] + \
                [folder / "qrels" / f"{split}{suffix}" for suffix in QRELS_SUFFIXES]:
        if path.is_file():
            return [path]
    for sub in ("qrels", "default"):
        shards = sorted(p for p in (folder / sub).glob(f"{split}-*") if p.name.endswith(QRELS_SUFFIXES)) \
            if (folder / sub).is_dir() else []
        if shards:
            return shards
    raise DataError(f"{folder}: no qrels for split {split!r} (found: {', '.join(splits(folder)) or 'none'}; expected "
                    f"qrels_{split}.jsonl[.gz] or qrels/{split}.tsv, or qrels/{split}[-*].parquet)")


def splits(folder: Path) -> list[str]:
    """The splits ``folder`` has qrels for."""
    found = [p.name.removeprefix("qrels_").split(".")[0] for p in folder.glob("qrels_*") if p.is_file()]
    for sub in ("qrels", "default"):
        if (folder / sub).is_dir():
            found += [p.name.split(".")[0].split("-")[0] for p in (folder / sub).iterdir()
                      if p.name.endswith(QRELS_SUFFIXES)]
    return sorted(set(found))


def _qrels_records(path: Path) -> Iterator[tuple[str, dict]]:
    """A qrels file's judgements; a .tsv with BEIR's header line (query-id, corpus-id, score) or without one:
    query, passage, score, or TREC's query, iteration, passage, score."""
    if format_of(path) != "tsv":
        yield from read_records(str(path))
        return
    header: list[str] | None = None
    try:
        with open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                fields = [field.strip() for field in line.rstrip("\r\n").split("\t")]
                where = f"{path}:{line_no}"
                if fields == [""]:
                    continue
                if line_no == 1 and not _is_integer(fields[-1]):  # a header line: its last field is no score
                    header = fields
                elif header is not None:
                    if len(fields) != len(header):
                        raise DataError(f"{where}: {len(fields)} fields, the header has {len(header)} "
                                        f"({', '.join(header)})")
                    yield where, dict(zip(header, fields, strict=True))
                elif len(fields) in (3, 4):  # query, passage, score; TREC: query, iteration, passage, score
                    yield where, {"query_id": fields[0], "corpus_id": fields[-2], "score": fields[-1]}
                else:
                    raise DataError(f"{where}: expected query, passage and score separated by tabs (or TREC's "
                                    f"query, iteration, passage, score), got {len(fields)} fields")
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _load_queries(folder: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    for where, record in (item for path in _files(folder, "queries") for item in read_records(str(path))):
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
