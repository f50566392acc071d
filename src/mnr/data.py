"""Training rows: files, hub datasets and retrieval folders -> the rows a loss trains on.

A *source* is told by its spec: a retrieval folder (``DIR[:SPLIT][[START:STOP]]``: its (query, relevant
passage) pairs), or a file or hub dataset (``mnr.fileio`` reads its records). A file's *kind* is told by its
columns, and each kind is one small class (``DataKind``) that turns its records into rows:

* NLI:   premise, hypothesis, label (0/entailment, 1/neutral, 2/contradiction)
* pairs: anchor, positive[, negative | negative_1, negative_2, ...]
* STS:   sentence1, sentence2, score (evaluation only: ``mnr.evaluate.load_sts``)

A loss asks for one of two row forms: ``RANKING`` rows (anchor, positive[, negatives]), where
every other row's texts serve as negatives, or ``LABELLED`` rows (premise, hypothesis) with a
label each. Other column names are mapped with ``column_map`` (the ``--columns`` flag).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mnr import retrieval
from mnr.errors import DataError
from mnr.fileio import read_records, resolve_path

log = logging.getLogger(__name__)

NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
ENTAILMENT, CONTRADICTION = NLI_LABELS["entailment"], NLI_LABELS["contradiction"]
# SNLI marks pairs without a gold label with "-" (raw files) or -1 (hub); they carry no signal.
NO_GOLD_LABELS = {"-", "-1", -1}

# The two forms of training rows a loss can ask for (``Loss.input``).
RANKING = "ranking"  # (anchor, positive[, negative...]): every other row's texts are negatives too
LABELLED = "labelled"  # (premise, hypothesis) and a label per row


@dataclass
class NLIRecord:
    premise: str
    hypothesis: str
    label: int


@dataclass
class TrainingSet:
    """Rows of texts for one loss, plus where they came from.

    ``columns`` names the texts of every row: ("anchor", "positive"), ("anchor", "positive",
    "negative", ...) or, for a labelled loss, ("premise", "hypothesis") with ``labels`` set.
    ``sources`` maps each file (or hub dataset) to the number of rows it gave.
    """

    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    sources: dict[str, int]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, n: int, seed: int) -> TrainingSet:
        """A seeded random subset of ``n`` rows (all rows if ``n`` is 0 or too large), in file order."""
        if not n or n >= len(self.rows):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.rows)), n))
        return TrainingSet(self.columns, [self.rows[i] for i in keep], self.sources_of(keep),
                           [self.labels[i] for i in keep] if self.labels is not None else None)

    def sources_of(self, keep: Sequence[int]) -> dict[str, int]:
        """``sources`` of the rows ``keep`` (ascending row numbers) of this set."""
        ends = list(itertools.accumulate(self.sources.values()))  # rows are the sources' rows, in order
        kept = collections.Counter(bisect.bisect_right(ends, i) for i in keep)
        return {name: kept[j] for j, name in enumerate(self.sources) if kept[j]}


# ---------------------------------------------------------------- column handling


TRAINING_COLUMNS = {"anchor", "positive", "negative", "premise", "hypothesis", "label", "sentence1", "sentence2",
                    "score"}


def parse_column_map(text: str | dict[str, str] | None, known: set[str] = TRAINING_COLUMNS) -> dict[str, str]:
    """``"anchor=question,positive=answer"`` -> {"question": "anchor", "answer": "positive"}.

    The result maps a file's column name to ours (``known``, and negative_N).
    """
    if not text:
        return {}
    if isinstance(text, dict):
        items = list(text.items())
    else:
        items = []
        for part in text.split(","):
            ours, sep, theirs = part.partition("=")
            if not sep or not ours.strip() or not theirs.strip():
                raise DataError(f"--columns: expected OURS=THEIRS[,OURS=THEIRS...], got {part!r}")
            items.append((ours.strip(), theirs.strip()))
    mapping = {}
    for ours, theirs in items:
        if ours not in known and not ours.startswith("negative_"):
            raise DataError(f"--columns: unknown column {ours!r}; ours are {', '.join(sorted(known))}")
        mapping[theirs] = ours
    return mapping


def renamed(record: dict, column_map: dict[str, str]) -> dict:
    if not column_map:
        return record
    return {column_map.get(k, k): v for k, v in record.items()}


def _negative_columns(columns: set[str] | list[str]) -> list[str]:
    """'negative' or 'negative_1', 'negative_2', ... in numeric order."""
    if "negative" in columns:
        return ["negative"]
    numbered = [c for c in columns if c.startswith("negative_") and c[len("negative_"):].isdigit()]
    return sorted(numbered, key=lambda c: int(c[len("negative_"):]))


def text_of(record: dict, column: str, where: str) -> str:
    if column not in record:
        raise DataError(f"{where}: missing column {column!r} (has: {', '.join(map(str, record))})")
    value = record[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be text, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise DataError(f"{where}: empty text in column {column!r}")
    return value


def _nli_label(record: dict, where: str) -> int | None:
    """0/1/2 or their names; None for SNLI's "no gold label" marks; anything else is an error."""
    if "label" not in record:
        raise DataError(f"{where}: missing column 'label' (has: {', '.join(map(str, record))})")
    value = record["label"]
    if value in NO_GOLD_LABELS:
        return None
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int) and value in (0, 1, 2):
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in NLI_LABELS:
            return NLI_LABELS[v]
        if v in ("0", "1", "2"):
            return int(v)
        if v in NO_GOLD_LABELS:
            return None
    raise DataError(
        f"{where}: unknown label {value!r}; expected 0/entailment, 1/neutral or 2/contradiction"
    )


Records = Iterator[tuple[str, dict]]


def peek(spec: str, column_map: dict[str, str]) -> tuple[set[str], Records]:
    """The columns of ``spec``'s first record, and all its records renamed by ``column_map``."""
    records = read_records(spec)
    try:
        where, first = next(records)
    except StopIteration:
        raise DataError(f"{spec}: empty file (no records)") from None
    for theirs, ours in column_map.items():
        if theirs not in first and ours not in first:
            raise DataError(f"{where}: --columns {ours}={theirs}: the file has no column {theirs!r} (its columns: "
                            f"{', '.join(map(str, first))})")
    first = renamed(first, column_map)

    def chained():
        yield where, first
        for w, r in records:
            yield w, renamed(r, column_map)

    return set(first), chained()


def unknown_columns(spec: str, expected: str, hint: str) -> DataError:
    where, first = next(read_records(spec))
    return DataError(
        f"{where}: cannot tell the kind of data from the columns ({', '.join(map(str, first))}); "
        f"expected {expected}; {hint}"
    )


TRAINING_COLUMNS_HINT = "map other names with --columns, e.g. --columns anchor=question,positive=answer"


# ---------------------------------------------------------------- data kinds


class DataKind(Protocol):
    """One kind of file, told by its columns, and how its records become training rows."""

    name: str  # for messages: what the kind is and the columns that make it

    def matches(self, columns: set[str]) -> bool: ...

    def training_set(self, spec: str, records: Records, wants: str, hard_negatives: bool) -> TrainingSet:
        """The rows of form ``wants`` (RANKING or LABELLED); a DataError if this kind cannot give them."""
        ...


class NLIKind:
    """premise, hypothesis, label: entailments are positives, contradictions hard negatives."""

    name = "NLI (premise, hypothesis, label)"

    def matches(self, columns: set[str]) -> bool:
        return {"premise", "hypothesis", "label"} <= columns

    def training_set(self, spec: str, records: Records, wants: str, hard_negatives: bool) -> TrainingSet:
        nli = _nli_records(spec, records)
        if wants == LABELLED:  # every gold-labelled pair
            rows = [(r.premise, r.hypothesis) for r in nli]
            return TrainingSet(("premise", "hypothesis"), rows, {spec: len(rows)}, labels=[r.label for r in nli])
        if hard_negatives:
            rows = nli_triplets(nli)
            if not rows:
                raise DataError(f"{spec}: no premise has both an entailment and a contradiction "
                                "hypothesis, so no triplets can be built")
            return TrainingSet(("anchor", "positive", "negative"), rows, {spec: len(rows)})
        rows = nli_pairs(nli)
        if not rows:
            raise DataError(f"{spec}: no entailment pairs (label 0) to train on")
        return TrainingSet(("anchor", "positive"), rows, {spec: len(rows)})


class PairsKind:
    """anchor, positive and optionally negative (or negative_1, negative_2, ...): rows as they are."""

    name = "anchor, positive[, negative] (pairs/triplets)"

    def matches(self, columns: set[str]) -> bool:
        return {"anchor", "positive"} <= columns

    def training_set(self, spec: str, records: Records, wants: str, hard_negatives: bool) -> TrainingSet:
        if wants != RANKING:
            raise DataError(f"{spec}: this loss trains on labelled NLI data (premise, hypothesis, label), "
                            "not on pairs")
        rows: list[tuple[str, ...]] = []
        columns: list[str] = []
        for where, record in records:
            if not columns:  # the first record fixes the columns, later ones must have them all
                columns = ["anchor", "positive", *_negative_columns(list(record))]
                if hard_negatives and len(columns) == 2:
                    raise DataError(f"{spec}: --hard-negatives: this file has no negative column (negative, or "
                                    "negative_1, negative_2, ...); its own negatives are used without the flag, "
                                    "and NLI files get theirs from their contradictions")
            rows.append(tuple(text_of(record, c, where) for c in columns))
        names = ("anchor", "positive") + (("negative",) * (len(columns) - 2))
        return TrainingSet(names, rows, {spec: len(rows)})


class STSKind:
    """sentence1, sentence2, score: for evaluation (``load_sts``); refused as training data."""

    name = "sentence1, sentence2, score (STS)"

    def matches(self, columns: set[str]) -> bool:
        return {"sentence1", "sentence2", "score"} <= columns

    def training_set(self, spec: str, records: Records, wants: str, hard_negatives: bool) -> TrainingSet:
        raise DataError(f"{spec}: STS data (sentence1, sentence2, score) is for evaluation, not training")


# Tried in order; the first whose columns match reads the file. A new kind of file is a class here.
KINDS: list[DataKind] = [NLIKind(), PairsKind(), STSKind()]


def kind_of(columns: set[str]) -> DataKind | None:
    """The kind of data with these column names, or None."""
    return next((kind for kind in KINDS if kind.matches(columns)), None)


# ---------------------------------------------------------------- NLI


def load_nli(spec: str, column_map: dict[str, str] | None = None) -> list[NLIRecord]:
    """All gold-labelled (premise, hypothesis, label) records of one NLI file or hub dataset."""
    columns, records = peek(spec, column_map or {})
    if not isinstance(kind_of(columns), NLIKind):
        raise unknown_columns(spec, NLIKind.name, TRAINING_COLUMNS_HINT)
    return _nli_records(spec, records)


def _nli_records(spec: str, records: Records) -> list[NLIRecord]:
    out, skipped = [], 0
    for where, record in records:
        label = _nli_label(record, where)
        if label is None:
            skipped += 1
            continue
        out.append(NLIRecord(text_of(record, "premise", where), text_of(record, "hypothesis", where), label))
    if skipped:
        log.info("%s: skipped %d pairs without a gold label", spec, skipped)
    if not out:
        raise DataError(f"{spec}: no gold-labelled NLI pairs")
    return out


def nli_pairs(records: list[NLIRecord]) -> list[tuple[str, str]]:
    """(premise, hypothesis) for every entailment: the positives MNR learns from."""
    return [(r.premise, r.hypothesis) for r in records if r.label == ENTAILMENT]


def nli_triplets(records: list[NLIRecord]) -> list[tuple[str, str, str]]:
    """(premise, entailment, contradiction) for every entailment whose premise has a contradiction.

    A contradiction of the same premise is the classic hard negative (SimCSE, Gao et al. 2021):
    lexically close to the premise but opposite in meaning. A premise with several entailments
    cycles through its contradictions so that each is used before any repeats.
    """
    by_premise: dict[str, tuple[list[str], list[str]]] = {}
    for r in records:
        entailments, contradictions = by_premise.setdefault(r.premise, ([], []))
        if r.label == ENTAILMENT:
            entailments.append(r.hypothesis)
        elif r.label == CONTRADICTION:
            contradictions.append(r.hypothesis)
    return [
        (premise, positive, contradictions[i % len(contradictions)])
        for premise, (entailments, contradictions) in by_premise.items()
        if contradictions
        for i, positive in enumerate(entailments)
    ]


# ---------------------------------------------------------------- sources


@dataclass
class Wanted:
    """What the training set is for: the row form the loss asks for, and how rows are read."""

    form: str = RANKING  # RANKING or LABELLED
    hard_negatives: bool = False
    column_map: dict[str, str] | None = None
    strict_qrels: bool = False  # retrieval folders: see mnr.retrieval.load_retrieval


class RetrievalFolder:
    """``DIR[:SPLIT][[START:STOP]]``: the (query, relevant passage) pairs of the split's judged queries (default:
    train); judged passages missing from the corpus are skipped (with load_retrieval's warning), or refused with
    ``strict_qrels``."""

    def matches(self, spec: str, root: Path | None) -> bool:
        return retrieval.is_retrieval_spec(spec, root)

    def training_set(self, spec: str, root: Path | None, wanted: Wanted) -> TrainingSet:
        if wanted.form != RANKING:
            raise DataError(f"{spec}: this loss trains on labelled NLI data (premise, hypothesis, label), "
                            "not on retrieval judgements")
        spec = retrieval.resolve_retrieval_spec(spec, root)
        data = retrieval.load_retrieval(spec, default_split="train", strict=wanted.strict_qrels)
        index = dict(zip(data.passage_ids, data.passages, strict=True))
        rows = [(data.queries[q], index[p]) for q, relevant in data.qrels.items() for p in relevant if p in index]
        if not rows:
            raise DataError(f"{spec}: no judged passage of its queries is in the corpus")
        return TrainingSet(("anchor", "positive"), rows, {spec: len(rows)})


class RecordsFile:
    """A file or hub dataset, read by its kind (``KINDS``, told by its columns)."""

    def matches(self, spec: str, root: Path | None) -> bool:
        return True

    def training_set(self, spec: str, root: Path | None, wanted: Wanted) -> TrainingSet:
        spec = resolve_path(spec, root)
        columns, records = peek(spec, wanted.column_map or {})
        kind = kind_of(columns)
        if kind is None:
            raise unknown_columns(spec, " or ".join(k.name for k in KINDS if not isinstance(k, STSKind)),
                                  TRAINING_COLUMNS_HINT)
        return kind.training_set(spec, records, wanted.form, wanted.hard_negatives)


# Tried in order; the first that matches a spec reads it.
SOURCES = [RetrievalFolder(), RecordsFile()]


def load_training_set(
    specs: list[str],
    *,
    wants: str = RANKING,
    hard_negatives: bool = False,
    column_map: dict[str, str] | None = None,
    strict_qrels: bool = False,
    root: Path | None = None,
) -> TrainingSet:
    """Read every spec in ``specs`` (looked up as given, or under ``root``) and build the rows of form ``wants``.

    * ``wants=RANKING``: NLI files give (premise, entailment) pairs, or (premise, entailment,
      contradiction) triplets with ``hard_negatives``; pair files give their own columns; retrieval
      folders their (query, relevant passage) pairs.
    * ``wants=LABELLED``: NLI files only; every labelled (premise, hypothesis) with its label.

    All sources must give the same columns: a batch is one tensor per column.
    """
    if not specs:
        raise DataError("no training data given (--data FILE...)")
    wanted = Wanted(wants, hard_negatives, column_map, strict_qrels)
    parts = [next(s for s in SOURCES if s.matches(spec, root)).training_set(spec, root, wanted) for spec in specs]
    first = parts[0]
    for part in parts[1:]:
        if part.columns != first.columns:
            raise DataError(
                f"{next(iter(part.sources))}: gives {'/'.join(part.columns)} rows but {next(iter(first.sources))} "
                f"gives {'/'.join(first.columns)}; all training files must give the same columns"
            )
    return TrainingSet(first.columns, [r for p in parts for r in p.rows],
                       {k: v for p in parts for k, v in p.sources.items()},
                       labels=[x for p in parts for x in p.labels] if first.labels is not None else None)
