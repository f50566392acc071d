"""Hard-negative mining: for each (anchor, positive) row, the corpus passages a model ranks highest
for the anchor that are not among its positives, as (anchor, positive, negative_1 .. negative_k) rows.

MNR learns most from negatives that are close to the anchor; the danger is a "negative" that is in
fact relevant but unjudged (a false negative). The controls are those users know from
sentence-transformers' ``mine_hard_negatives`` (and the NV-Retriever paper, Moreira et al. 2024):

* ``range_min`` / ``range_max``: take candidates from ranks [range_min, range_max) of the ranking
  (positives removed); skipping the very top avoids the likeliest false negatives;
* ``absolute_margin``: keep a candidate only if its score is at least this much below the anchor's
  lowest positive score; ``relative_margin``: at least this fraction of that score below it
  (0.05: 95% of the positive score at most; NV-Retriever's best setting); ``max_score``: below this;
* ``sampling``: "top" takes the k best remaining candidates, "random" k of them at random (seeded).

An anchor's candidates exclude all its positives (every row with that anchor) and the anchor text
itself. Rows for which fewer than k candidates pass are left out and counted, so that every
written row has k negatives (a file's columns are fixed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mnr.data import TrainingSet
from mnr.errors import DataError
from mnr.fileio import count_texts, read_records, resolve_path, text_blocks
from mnr.model import SentenceEncoder
from mnr.prompts import MODELS_OWN, PromptChoice
from mnr.retrieval import encode_for_search, is_retrieval_spec, load_corpus, resolve_retrieval_spec, search, split_spec
from mnr.settings import check_types, flag, require, setting


@dataclass
class MiningSettings:
    """What mining keeps: ``mnr mine`` reads these as they are named here (``--range-max``), ``mnr train`` as
    mine_ keys (``--mine-range-max``; ``--mine-negatives`` for the count, 0 there: no mining). One set of
    defaults for both: the top 100 candidates, and NV-Retriever's relative margin of 5% against unjudged positives
    (on SciFact a range of 50 left out 116 of 800 pairs whose positive the model ranks low, the rows training needs
    most; 1000 left out 5: BENCHMARKS.md, "Retrieval")."""

    num_negatives: int = setting(3, "negatives per row; rows that find fewer are left out and counted", weights=True)
    range_min: int = setting(0, "skip this many of the best-ranked candidates (likely false negatives)",
                             weights=True)
    range_max: int = setting(100, "take candidates from this many of the best-ranked passages", weights=True)
    absolute_margin: float | None = setting(None, "keep a candidate only if its score is at least this much below "
                                                  "the anchor's lowest positive score", weights=True)
    relative_margin: float = setting(0.05, "keep a candidate only if its score is at most (1 - this) x the anchor's "
                                           "lowest positive score, as a likely unjudged positive otherwise (0.05: "
                                           "NV-Retriever's setting; 0: no margin)", weights=True)
    max_score: float | None = setting(None, "keep a candidate only if its score is at most this", weights=True)
    sampling: str = setting("top", "top: the best remaining candidates; random: a seeded sample of them",
                            weights=True)
    seed: int = setting(0, "the seed of random sampling", weights=True)
    corpus: str = setting("", "where negatives come from: a retrieval folder (its corpus), a corpus file (_id, "
                              "title, text or a text column; .jsonl/.csv/.tsv/.parquet) or a .txt file (one passage "
                              "per line); default: the corpus of the retrieval folders among the training data, "
                              "and every text of the data but its anchors", weights=True)
    model: str = setting("", "rank the candidates with this model (a directory or hub name, with its own pooling "
                             "and max length) instead of the base model; e.g. the best/ of a first run, for a second "
                             "round of mining (training still starts from the base model)", weights=True)

    keys: InitVar[dict[str, str] | None] = None  # field -> key where the command's differ (mnr train: mine_...)

    def __post_init__(self, keys: dict[str, str] | None):
        check_types(self, keys)
        named = {name: flag((keys or {}).get(name, name)) for name in ("num_negatives", "range_min")}
        for name, ok, message in [
            ("num_negatives", self.num_negatives >= 1, "must be at least 1"),
            ("range_min", self.range_min >= 0, "must be >= 0"),
            ("range_max", self.range_max - self.range_min >= self.num_negatives,
             f"- {named['range_min']} must leave room for {named['num_negatives']} candidates"),
            ("relative_margin", 0 <= self.relative_margin < 1, "must be in [0, 1)"),
            ("sampling", self.sampling in ("top", "random"), "must be top or random"),
        ]:
            require(self, name, ok, message, keys)


@dataclass
class Mined:
    rows: list[tuple[str, ...]]  # (anchor, positive, negative_1 .. negative_k)
    short: int  # input rows left out: fewer than k candidates passed the filters
    skipped: dict[str, int] = field(default_factory=dict)  # candidates each filter removed
    positive_mean: float = 0.0  # mean anchor-positive score
    negative_mean: float = 0.0  # mean anchor-negative score of the written negatives
    kept: list[int] = field(default_factory=list)  # the input row each of ``rows`` was mined for

    def summary(self) -> str:
        k = len(self.rows[0]) - 2 if self.rows else 0
        skipped = "".join(f"; {n:,} candidates removed by the {what.replace('_', ' ')}"
                          for what, n in self.skipped.items())
        return (f"{len(self.rows):,} rows with {k} negatives each; {self.short:,} rows found fewer and were left "
                f"out{skipped}; mean score of positives {self.positive_mean:.3f}, of the negatives written "
                f"{self.negative_mean:.3f}")


@dataclass
class Candidates:
    """Every anchor's best-ranked corpus passages (its own positives and itself removed), best first,
    with the scores ``select`` filters by: what mining costs, computed once for any number of settings."""

    rows: list[tuple[str, str]]
    ranked: dict[str, list[tuple[float, str]]]  # anchor -> [(score, passage)], best first
    lowest_positive: dict[str, float]  # anchor -> its lowest positive score (margins are measured from it)
    positive_mean: float
    corpus: dict[str, int]  # each distinct passage -> its row of corpus_embeddings
    corpus_embeddings: torch.Tensor  # (N, D), normalised: the corpus as the ranking model embedded it

    def embeddings_of(self, passages: Sequence[str]) -> torch.Tensor | None:
        """The embeddings of ``passages`` (rows in their order), None if one of them was not ranked: an
        evaluation of the same model over them need not encode them again."""
        if not all(p in self.corpus for p in passages):
            return None
        return self.corpus_embeddings[[self.corpus[p] for p in passages]]


def rank(encoder: SentenceEncoder, rows: Sequence[tuple[str, str]], corpus: Sequence[str], depth: int,
         batch_size: int = 64, bf16: bool = False, progress: bool = True, dim: int | None = None,
         prompts: PromptChoice = MODELS_OWN) -> Candidates:
    """Embed anchors, positives and corpus (``dim``: their first ``dim`` values; ``prompts``: the anchors get the
    query's, passages the corpus's); keep each anchor's ``depth`` best non-positive passages."""
    anchors = list(dict.fromkeys(anchor for anchor, _ in rows))
    positives: dict[str, list[str]] = {}
    for anchor, positive in rows:
        positives.setdefault(anchor, []).append(positive)
    corpus = list(dict.fromkeys(corpus))
    position = {text: i for i, text in enumerate(corpus)}
    outside = list(dict.fromkeys(p for ps in positives.values() for p in ps if p not in position))  # to score

    query, passage = encoder.prompt(prompts.query, "query"), encoder.prompt(prompts.corpus, "document")
    anchor_emb = encode_for_search(encoder, anchors, batch_size, bf16, what="anchors" if progress else "", dim=dim,
                                   prompt=query)
    corpus_emb = encode_for_search(encoder, corpus, batch_size, bf16, what="corpus" if progress else "", dim=dim,
                                   prompt=passage)
    outside_emb = encode_for_search(encoder, outside, batch_size, bf16, dim=dim, prompt=passage) if outside \
        else corpus_emb[:0]
    outside_index = {text: i for i, text in enumerate(outside)}

    def embedding(text: str) -> torch.Tensor:
        return corpus_emb[position[text]] if text in position else outside_emb[outside_index[text]]

    most_positives = max(len(ps) for ps in positives.values())
    # room for the positives and the anchor itself, removed below
    scores, indices = search(anchor_emb, corpus_emb, depth + most_positives + 1, encoder.device)
    ranked, lowest, positive_scores = {}, {}, []
    for a, anchor in enumerate(tqdm(anchors, desc="rank", unit="anchor", disable=not progress)):
        own = set(positives[anchor]) | {anchor}
        pos_scores = [float(anchor_emb[a] @ embedding(p)) for p in positives[anchor]]
        positive_scores += pos_scores
        lowest[anchor] = min(pos_scores)
        ranked[anchor] = [(s, corpus[i]) for s, i in zip(scores[a].tolist(), indices[a].tolist(), strict=True)
                          if corpus[i] not in own][:depth]
    return Candidates(list(rows), ranked, lowest, sum(positive_scores) / len(positive_scores), position, corpus_emb)


def select(candidates: Candidates, settings: MiningSettings) -> Mined:
    """The negatives ``settings`` take from ranked candidates: range, margins, max score, sampling."""
    rng = random.Random(settings.seed)
    negatives: dict[str, list[tuple[float, str]]] = {}
    skipped = {"absolute_margin": 0, "relative_margin": 0, "max_score": 0}
    for anchor, ranked in candidates.ranked.items():
        lowest = candidates.lowest_positive[anchor]
        kept = []
        for score, text in ranked[settings.range_min : settings.range_max]:
            if settings.absolute_margin is not None and score > lowest - settings.absolute_margin:
                skipped["absolute_margin"] += 1
            elif settings.relative_margin and score > lowest - abs(lowest) * settings.relative_margin:
                skipped["relative_margin"] += 1
            elif settings.max_score is not None and score > settings.max_score:
                skipped["max_score"] += 1
            else:
                kept.append((score, text))
        if settings.sampling == "random" and len(kept) > settings.num_negatives:
            kept = sorted(rng.sample(kept, settings.num_negatives), reverse=True)
        negatives[anchor] = kept[: settings.num_negatives]
    out, kept, chosen = [], [], []
    for i, (anchor, positive) in enumerate(candidates.rows):
        found = negatives[anchor]
        if len(found) == settings.num_negatives:
            out.append((anchor, positive, *(text for _, text in found)))
            kept.append(i)
            chosen += [score for score, _ in found]
    return Mined(out, len(candidates.rows) - len(out), {k: v for k, v in skipped.items() if v},
                 candidates.positive_mean, sum(chosen) / len(chosen) if chosen else 0.0, kept)


def columns(num_negatives: int) -> tuple[str, ...]:
    """The column names of a mined file: anchor, positive, negative_1 .. negative_k."""
    return ("anchor", "positive", *(f"negative_{i}" for i in range(1, num_negatives + 1)))


def mine(encoder: SentenceEncoder, rows: Sequence[tuple[str, str]], corpus: Sequence[str],
         settings: MiningSettings, batch_size: int = 64, bf16: bool = False, progress: bool = True,
         dim: int | None = None, prompts: PromptChoice = MODELS_OWN) -> Mined:
    """Mine ``settings.num_negatives`` negatives from ``corpus`` for each (anchor, positive) of ``rows``
    (``dim``: ranked by the embeddings' first ``dim`` values; ``prompts``: ``rank``'s)."""
    return select(rank(encoder, rows, corpus, settings.range_max, batch_size, bf16, progress, dim, prompts),
                  settings)


def mining_corpus(spec: str | None, root: Path | None, data: TrainingSet, data_specs: Sequence[str]) -> list[str]:
    """The passages negatives are mined from: ``spec``, a retrieval folder (its corpus) or a corpus file; by
    default the corpus of each retrieval folder in ``data_specs`` and every text of ``data`` but its anchors."""
    def folder_corpus(folder_spec: str) -> list[str]:
        return load_corpus(Path(split_spec(resolve_retrieval_spec(folder_spec, root))[0]))[1]

    if spec:
        return folder_corpus(spec) if is_retrieval_spec(spec, root) else corpus_file(Path(resolve_path(spec, root)))
    passages = [p for s in data_specs if is_retrieval_spec(s, root) for p in folder_corpus(s)]
    return list(dict.fromkeys(passages + [text for row in data.rows for text in row[1:]]))


def corpus_file(path: Path) -> list[str]:
    """Passages of a corpus file: .txt one per line; else records with title + text (BEIR) or text."""
    if path.name.lower().removesuffix(".gz").endswith(".txt"):
        count = count_texts(path)
        return next(text_blocks(path, count, count))  # one block: every line
    passages = []
    for where, record in read_records(str(path)):
        text = f"{record.get('title') or ''} {record.get('text') or ''}".strip()
        if not text:
            raise DataError(f"{where}: no text (a corpus record has a text column, optionally a title)")
        passages.append(text)
    return passages
