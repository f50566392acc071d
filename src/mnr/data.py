"""Training and evaluation data: files (or hub datasets) -> validated examples.

Every reader yields ``(where, record)`` so that an error can name the file and line (or row) it
came from. A file's *kind* is told apart by its columns, and each kind is one small class
(``DataKind``) that turns its records into the rows a loss asks for:

* NLI:   premise, hypothesis, label (0/entailment, 1/neutral, 2/contradiction)
* pairs: anchor, positive[, negative | negative_1, negative_2, ...]
* STS:   sentence1, sentence2, score (evaluation only)

A loss asks for one of two row forms: ``RANKING`` rows (anchor, positive[, negatives]), where
every other row's texts serve as negatives, or ``LABELLED`` rows (premise, hypothesis) with a
label each. Other column names are mapped with ``column_map`` (the ``--columns`` flag).
"""

from __future__ import annotations

import bisect
import collections
import csv
import gzip
import io
import itertools
import json
import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mnr.errors import DataError
from mnr.fileio import atomic_file, check_new_file

log = logging.getLogger(__name__)

NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
ENTAILMENT, CONTRADICTION = NLI_LABELS["entailment"], NLI_LABELS["contradiction"]
# SNLI marks pairs without a gold label with "-" (raw files) or -1 (hub); they carry no signal.
NO_GOLD_LABELS = {"-", "-1", -1}

HUB_PREFIX = "hf:"

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
    if is_retrieval_spec(spec, root):
        return resolve_retrieval_spec(spec, root)
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if root is not None and not path.is_absolute() and (root / path).exists():
        return str(root / path)
    where = f" (nor under the data directory {root})" if root is not None and not path.is_absolute() else ""
    hint = "" if root is not None else "; relative paths are also looked up under --data-dir / $MNR_DATA_DIR"
    raise DataError(f"{spec}: no such file{where}{hint}")


# ---------------------------------------------------------------- retrieval folders (mnr.retrieval reads them)

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


# ---------------------------------------------------------------- raw records


def open_text(path: Path) -> io.TextIOBase:
    """UTF-8 text, without the byte-order mark that Excel's "CSV UTF-8" and some editors put first."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def not_utf8(path: Path) -> DataError:
    """Where a file stops being UTF-8 (line, column, byte), and how to convert it.

    The decoder reports a position inside the chunk it was decoding, so the file is read again,
    line by line, to find the line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                where = f"{path}:{line_no}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1})"
                break
        else:  # pragma: no cover - the caller saw a decoding error, so some line has one
            where = f"{path}: not UTF-8 text"
    stem = path.name.removesuffix(".gz")
    target = f"{stem.rsplit('.', 1)[0]}.utf8.{stem.rsplit('.', 1)[-1]}" if "." in stem else f"{stem}.utf8"
    command = (f"zcat {path} | iconv -f latin1 -t utf-8 > {target}" if path.suffix == ".gz"
               else f"iconv -f latin1 -t utf-8 {path} > {target}")
    return DataError(f"{where}; if it is Latin-1 (or Windows-1252, Excel's default), convert it: {command}")


FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def format_of(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise DataError(f"{path}: unknown file type; expected .jsonl, .json, .csv, .tsv (optionally .gz) or .parquet")


def short_name(spec: str) -> str:
    """A file's name without its data extensions: ``sts/stsb_dev.jsonl.gz`` -> ``stsb_dev``."""
    name = Path(spec).name.removesuffix(".gz")
    for ext in FORMATS:
        name = name.removesuffix(ext)
    return name


def check_writable(path: Path, overwrite: bool = False) -> None:
    """Refuse, before any work, a rows file ``write_rows`` cannot write, or one it would silently replace."""
    if format_of(path) == "parquet":
        raise DataError(f"{path}: write .jsonl, .csv or .tsv (optionally .gz)")
    check_new_file(path, overwrite=overwrite)


def write_rows(path: Path, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Write rows of texts as JSONL, CSV or TSV (by the file's extension, optionally .gz), atomically:
    a temporary file renamed into place, so ``path`` never holds half a file."""
    fmt = format_of(path)
    if fmt == "parquet":
        raise DataError(f"{path}: write .jsonl, .csv or .tsv (optionally .gz)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with atomic_file(path) as tmp, opener(tmp, "wt", encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                for row in rows:
                    f.write(json.dumps(dict(zip(columns, row, strict=True)), ensure_ascii=False) + "\n")
            else:
                writer = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
                writer.writerow(columns)
                writer.writerows(rows)
    except OSError as e:
        raise DataError(f"{path}: cannot write: {e.strerror or e}") from None


def count_texts(path: Path) -> int:
    """The number of texts of a file of one text per line (blank lines at the end are not texts); a blank line
    between texts, bad UTF-8 or an empty file is an error naming the line."""
    count = blank_since = 0
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    blank_since = blank_since or line_no
                    continue
                if blank_since:
                    raise DataError(f"{path}:{blank_since}: empty line (every line is a text)")
                count += 1
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not count:
        raise DataError(f"{path}: empty file")
    return count


def text_blocks(path: Path, count: int, size: int) -> Iterator[list[str]]:
    """The first ``count`` lines of ``path``, ``size`` at a time (the file was checked by ``count_texts``)."""
    block: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for _, line in zip(range(count), f, strict=False):
            block.append(line.rstrip("\r\n"))
            if len(block) == size:
                yield block
                block = []
    if block:
        yield block


def read_records(spec: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` for every record of a file or hub dataset.

    ``location`` is ``file:line`` (``file:row N`` for Parquet and hub data) for error messages.
    """
    if spec.startswith(HUB_PREFIX):
        yield from _read_hub(spec)
        return
    path = Path(spec)
    fmt = format_of(path)
    try:
        if fmt == "jsonl":
            yield from _read_jsonl(path)
        elif fmt in ("csv", "tsv"):
            yield from _read_csv(path, delimiter="," if fmt == "csv" else "\t")
        else:
            yield from _read_parquet(path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{path}: no such file") from None
        raise DataError(f"{path}: cannot read: {e}") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    if _json_array_file(path):
        with open_text(path) as f:
            start = f.read(4096).lstrip()[:1]
        if start == "[":
            yield from _read_json_array(path)
            return
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: malformed JSON (column {e.colno}: {e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object (JSON Lines: one object per line), got "
                                f"{type(record).__name__}")
            yield f"{path}:{line_no}", record


def _json_array_file(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(".json")


def _read_json_array(path: Path) -> Iterator[tuple[str, dict]]:
    """A .json file holding one array of objects (as pandas' to_json(orient="records") writes)."""
    with open_text(path) as f:
        try:
            items = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON (column {e.colno}: {e.msg})") from None
    for n, record in enumerate(items, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: item {n} of the array: expected a JSON object, got {type(record).__name__}")
        yield f"{path}:item {n}", record


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    with open_text(path) as f:
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


def _renamed(record: dict, column_map: dict[str, str]) -> dict:
    if not column_map:
        return record
    return {column_map.get(k, k): v for k, v in record.items()}


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


Records = Iterator[tuple[str, dict]]


def _peek(spec: str, column_map: dict[str, str]) -> tuple[set[str], Records]:
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
    first = _renamed(first, column_map)

    def chained():
        yield where, first
        for w, r in records:
            yield w, _renamed(r, column_map)

    return set(first), chained()


def _unknown_columns(spec: str, expected: str, hint: str) -> DataError:
    where, first = next(read_records(spec))
    return DataError(
        f"{where}: cannot tell the kind of data from the columns ({', '.join(map(str, first))}); "
        f"expected {expected}; {hint}"
    )


TRAINING_COLUMNS_HINT = "map other names with --columns, e.g. --columns anchor=question,positive=answer"
STS_COLUMNS_HINT = "map other names with --columns, e.g. --columns sentence1=text_a,sentence2=text_b,score=label"


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
            rows.append(tuple(_text(record, c, where) for c in columns))
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
    columns, records = _peek(spec, column_map or {})
    if not isinstance(kind_of(columns), NLIKind):
        raise _unknown_columns(spec, NLIKind.name, TRAINING_COLUMNS_HINT)
    return _nli_records(spec, records)


def _nli_records(spec: str, records: Records) -> list[NLIRecord]:
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
    wants: str = RANKING,
    hard_negatives: bool = False,
    column_map: dict[str, str] | None = None,
    strict_qrels: bool = False,
) -> TrainingSet:
    """Read every file in ``specs`` and build the rows of form ``wants`` from each by its kind.

    * ``wants=RANKING``: NLI files give (premise, entailment) pairs, or (premise, entailment,
      contradiction) triplets with ``hard_negatives``; pair files give their own columns; retrieval
      folders their (query, relevant passage) pairs (``strict_qrels``: see ``mnr.retrieval.load_retrieval``).
    * ``wants=LABELLED``: NLI files only; every labelled (premise, hypothesis) with its label.

    All files must give the same columns: a batch is one tensor per column.
    """
    if not specs:
        raise DataError("no training data given (--data FILE...)")
    column_map = column_map or {}
    parts: list[TrainingSet] = []
    for spec in specs:
        if is_retrieval_spec(spec):  # a folder of corpus, queries and judgements: (query, relevant passage) rows
            if wants != RANKING:
                raise DataError(f"{spec}: this loss trains on labelled NLI data (premise, hypothesis, label), "
                                "not on retrieval judgements")
            from mnr.retrieval import training_set

            parts.append(training_set(spec, strict=strict_qrels))
            continue
        columns, records = _peek(spec, column_map)
        kind = kind_of(columns)
        if kind is None:
            raise _unknown_columns(spec, " or ".join(k.name for k in KINDS if not isinstance(k, STSKind)),
                                   TRAINING_COLUMNS_HINT)
        parts.append(kind.training_set(spec, records, wants, hard_negatives))

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


# ---------------------------------------------------------------- STS


def load_sts(spec: str, column_map: dict[str, str] | None = None,
             hint: str = "rename its columns to sentence1, sentence2, score") -> list[STSExample]:
    """(sentence1, sentence2, score) examples of an STS file; scores on any scale (STSb: 0-5).

    ``hint`` ends the message for a file whose columns are not those: what the calling command
    offers to fix it (``mnr eval`` has --columns, ``mnr train --sts-dev`` does not).
    """
    columns, records = _peek(spec, column_map or {})
    if not isinstance(kind_of(columns), STSKind):
        raise _unknown_columns(spec, STSKind.name, hint)
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
