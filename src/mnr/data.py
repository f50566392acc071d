"""Training and evaluation data: files (or hub datasets) -> validated examples.

Every reader yields ``(where, record)`` so that an error can name the file and line (or row) it
came from. Three kinds of data exist, told apart by their columns:

* NLI:   premise, hypothesis, label (0/entailment, 1/neutral, 2/contradiction)
* pairs: anchor, positive[, negative | negative_1, negative_2, ...]
* STS:   sentence1, sentence2, score

Other column names are mapped with ``column_map`` (the ``--columns`` flag).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnr.errors import DataError

log = logging.getLogger(__name__)

NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
ENTAILMENT, NEUTRAL, CONTRADICTION = 0, 1, 2
# SNLI marks pairs without a gold label with "-" (raw files) or -1 (hub); they carry no signal.
NO_GOLD_LABELS = {"-", "-1", -1}

HUB_PREFIX = "hf:"


@dataclass
class NLIRecord:
    premise: str
    hypothesis: str
    label: int


@dataclass
class TrainingSet:
    """Rows of texts for one loss, plus where they came from.

    ``columns`` names the texts of every row: ("anchor", "positive"), ("anchor", "positive",
    "negative") or, for the softmax loss, ("premise", "hypothesis") with ``labels`` set.
    """

    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]
    sources: list[str]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, n: int, seed: int) -> TrainingSet:
        """A seeded random subset of ``n`` rows (all rows if ``n`` is 0 or too large), in file order."""
        if not n or n >= len(self.rows):
            return self
        keep = sorted(random.Random(seed).sample(range(len(self.rows)), n))
        return TrainingSet(self.columns, [self.rows[i] for i in keep], self.sources,
                           [self.labels[i] for i in keep] if self.labels is not None else None)


@dataclass
class STSExample:
    sentence1: str
    sentence2: str
    score: float


# ---------------------------------------------------------------- data directory


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The directory relative data paths are looked up in: the flag, else ``$MNR_DATA_DIR``."""
    value = explicit or os.environ.get("MNR_DATA_DIR")
    return Path(value) if value else None


def resolve_path(spec: str, root: Path | None) -> str:
    """Return a local path or a hub spec for ``spec``.

    A path that exists is used as given; otherwise a relative path is looked up under the data
    directory, so configs can say ``nli/snli_dev.jsonl.gz`` and run on any machine.
    """
    if spec.startswith(HUB_PREFIX):
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if root is not None and not path.is_absolute() and (root / path).exists():
        return str(root / path)
    where = f" (nor under the data directory {root})" if root is not None and not path.is_absolute() else ""
    hint = "" if root is not None else "; relative paths are also looked up under --data-dir / $MNR_DATA_DIR"
    raise DataError(f"{spec}: no such file{where}{hint}")


# ---------------------------------------------------------------- raw records


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _format_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".tsv", "tsv"),
                     (".parquet", "parquet")):
        if name.endswith(ext):
            return fmt
    raise DataError(f"{path}: unknown file type; expected .jsonl, .json, .csv, .tsv (optionally .gz) or .parquet")


def read_records(spec: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` for every record of a file or hub dataset.

    ``location`` is ``file:line`` (``file:row N`` for Parquet and hub data) for error messages.
    """
    if spec.startswith(HUB_PREFIX):
        yield from _read_hub(spec)
        return
    path = Path(spec)
    fmt = _format_of(path)
    try:
        if fmt == "jsonl":
            yield from _read_jsonl(path)
        elif fmt in ("csv", "tsv"):
            yield from _read_csv(path, delimiter="," if fmt == "csv" else "\t")
        else:
            yield from _read_parquet(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{path}: no such file") from None
        raise DataError(f"{path}: cannot read: {e}") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield f"{path}:{line_no}", record


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{path}:1: malformed header ({e})") from None
        header = [h.strip() for h in header]
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: malformed line ({e})") from None
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: malformed line: {len(values)} fields, "
                    f"the header has {len(header)} ({', '.join(header)})"
                )
            yield f"{path}:{reader.line_num}", dict(zip(header, values, strict=True))


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for row_no, record in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {row_no}", record


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME``, ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT`` -> (name, config, split)."""
    parts = spec[len(HUB_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise DataError(f"{spec}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _read_hub(spec: str) -> Iterator[tuple[str, dict]]:
    """Records of a Hugging Face hub dataset through ``datasets`` (needs the network or its cache)."""
    import datasets

    name, config, split = parse_hub_spec(spec)
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types (connection, missing split, ...)
        raise DataError(f"{spec}: cannot load from the Hugging Face hub: {type(e).__name__}: {e}") from None
    for row_no, record in enumerate(dataset, start=1):
        yield f"{spec}:row {row_no}", record


# ---------------------------------------------------------------- column handling


def parse_column_map(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"anchor=question,positive=answer"`` -> {"question": "anchor", "answer": "positive"}.

    The result maps a file's column name to ours.
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
    known = {"anchor", "positive", "negative", "premise", "hypothesis", "label", "sentence1", "sentence2", "score"}
    mapping = {}
    for ours, theirs in items:
        if ours not in known and not ours.startswith("negative_"):
            raise DataError(f"--columns: unknown column {ours!r}; ours are {', '.join(sorted(known))}")
        mapping[theirs] = ours
    return mapping


def _renamed(record: dict, column_map: dict[str, str]) -> dict:
    if not column_map:
        return record
    return {column_map.get(k, k): v for k, v in record.items()}


def kind_of(columns: set[str]) -> str | None:
    """Tell the kind of data from its column names: 'nli', 'pairs', 'sts' or None."""
    if {"premise", "hypothesis", "label"} <= columns:
        return "nli"
    if {"anchor", "positive"} <= columns:
        return "pairs"
    if {"sentence1", "sentence2", "score"} <= columns:
        return "sts"
    return None


def _negative_columns(columns: set[str] | list[str]) -> list[str]:
    """'negative' or 'negative_1', 'negative_2', ... in numeric order."""
    if "negative" in columns:
        return ["negative"]
    numbered = [c for c in columns if c.startswith("negative_") and c[len("negative_"):].isdigit()]
    return sorted(numbered, key=lambda c: int(c[len("negative_"):]))


def _text(record: dict, column: str, where: str) -> str:
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


def _peek(spec: str, column_map: dict[str, str]) -> tuple[str | None, Iterator[tuple[str, dict]]]:
    """Tell the kind of ``spec`` from its first record; return (kind, all records renamed)."""
    records = read_records(spec)
    try:
        where, first = next(records)
    except StopIteration:
        raise DataError(f"{spec}: empty file (no records)") from None
    first = _renamed(first, column_map)

    def chained():
        yield where, first
        for w, r in records:
            yield w, _renamed(r, column_map)

    return kind_of(set(first)), chained()


def _unknown_columns(spec: str, expected: str) -> DataError:
    where, first = next(read_records(spec))
    return DataError(
        f"{where}: cannot tell the kind of data from the columns ({', '.join(map(str, first))}); "
        f"expected {expected}; map other names with --columns, e.g. --columns anchor=question,positive=answer"
    )


# ---------------------------------------------------------------- NLI


def load_nli(spec: str, column_map: dict[str, str] | None = None) -> list[NLIRecord]:
    """All gold-labelled (premise, hypothesis, label) records of one NLI file or hub dataset."""
    kind, records = _peek(spec, column_map or {})
    if kind != "nli":
        raise _unknown_columns(spec, "premise, hypothesis, label (NLI)")
    return _nli_records(spec, records)


def _nli_records(spec: str, records: Iterator[tuple[str, dict]]) -> list[NLIRecord]:
    out, skipped = [], 0
    for where, record in records:
        label = _nli_label(record, where)
        if label is None:
            skipped += 1
            continue
        out.append(NLIRecord(_text(record, "premise", where), _text(record, "hypothesis", where), label))
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


# ---------------------------------------------------------------- training sets


def load_training_set(
    specs: list[str],
    *,
    objective: str = "mnr",
    hard_negatives: bool = False,
    column_map: dict[str, str] | None = None,
) -> TrainingSet:
    """Read every file in ``specs`` and build the rows ``objective`` trains on.

    * ``objective="mnr"``: NLI files give (premise, entailment) pairs, or (premise, entailment,
      contradiction) triplets with ``hard_negatives``; pair files give their own columns.
    * ``objective="softmax"``: NLI files only; every labelled (premise, hypothesis) with its label.

    All files must give the same columns: a batch is one tensor per column.
    """
    if not specs:
        raise DataError("no training data given (--data FILE...)")
    column_map = column_map or {}
    parts: list[TrainingSet] = []
    for spec in specs:
        kind, records = _peek(spec, column_map)
        if kind == "nli":
            nli = _nli_records(spec, records)
            if objective == "softmax":
                part = TrainingSet(("premise", "hypothesis"), [(r.premise, r.hypothesis) for r in nli],
                                   [spec], labels=[r.label for r in nli])
            elif hard_negatives:
                part = TrainingSet(("anchor", "positive", "negative"), nli_triplets(nli), [spec])
                if not part.rows:
                    raise DataError(f"{spec}: no premise has both an entailment and a contradiction "
                                    "hypothesis, so no triplets can be built")
            else:
                part = TrainingSet(("anchor", "positive"), nli_pairs(nli), [spec])
                if not part.rows:
                    raise DataError(f"{spec}: no entailment pairs (label 0) to train on")
        elif kind == "pairs":
            if objective == "softmax":
                raise DataError(f"{spec}: the softmax loss needs labelled NLI data (premise, hypothesis, label)")
            part = _pairs_records(spec, records)
        elif kind == "sts":
            raise DataError(f"{spec}: STS data (sentence1, sentence2, score) is for evaluation, not training")
        else:
            raise _unknown_columns(spec, "premise, hypothesis, label (NLI) or anchor, positive[, negative] "
                                         "(pairs/triplets)")
        parts.append(part)

    first = parts[0]
    for part in parts[1:]:
        if part.columns != first.columns:
            raise DataError(
                f"{part.sources[0]}: gives {'/'.join(part.columns)} rows but {first.sources[0]} gives "
                f"{'/'.join(first.columns)}; all training files must give the same columns"
            )
    merged = TrainingSet(first.columns, [r for p in parts for r in p.rows], [s for p in parts for s in p.sources],
                         labels=[x for p in parts for x in p.labels] if first.labels is not None else None)
    return merged


def _pairs_records(spec: str, records: Iterator[tuple[str, dict]]) -> TrainingSet:
    rows: list[tuple[str, ...]] = []
    columns: list[str] | None = None
    for where, record in records:
        if columns is None:  # the first record fixes the columns, later ones must have them all
            columns = ["anchor", "positive", *_negative_columns(list(record))]
        rows.append(tuple(_text(record, c, where) for c in columns))
    assert columns is not None  # _peek guarantees one record
    names = ("anchor", "positive") + (("negative",) * (len(columns) - 2))
    return TrainingSet(tuple(names), rows, [spec])


# ---------------------------------------------------------------- STS


def load_sts(spec: str, column_map: dict[str, str] | None = None) -> list[STSExample]:
    """(sentence1, sentence2, score) examples of an STS file; scores on any scale (STSb: 0-5)."""
    kind, records = _peek(spec, column_map or {})
    if kind != "sts":
        raise _unknown_columns(spec, "sentence1, sentence2, score (STS)")
    out = []
    for where, record in records:
        s1, s2 = _text(record, "sentence1", where), _text(record, "sentence2", where)
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
