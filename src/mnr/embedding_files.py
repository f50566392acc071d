"""``mnr encode``'s files: the texts to embed and the embeddings written.

Input: a ``.txt`` file (one text per line, read in blocks: into ``.npy`` its size is not bounded by memory), or
records (``.jsonl``/``.json``/``.csv``/``.tsv``, optionally gzipped, or ``.parquet``) whose text column is
``text``, the only column, or the one ``--columns text=NAME`` names; an ``_id``/``id`` column (or
``--columns id=NAME``) is kept beside each embedding. Row i of the output is record i, always.

Output, by the extension: ``.npy`` (the (N, D) float32 array), ``.npz`` (``embeddings`` and ``ids``),
``.jsonl`` (one ``{"id": ..., "embedding": [...]}`` per record) or ``.parquet`` (columns ``id`` and
``embedding``). Ids are the input's id column, else the record's position (0, 1, ...). Everything that
can be checked is checked before the model loads; the file appears complete or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnr.data import parse_column_map
from mnr.errors import ConfigError, DataError
from mnr.fileio import atomic_file, check_new_file, count_texts, format_of, read_records, text_blocks

OUTPUT_FORMATS = (".npy", ".npz", ".jsonl", ".parquet")
ID_COLUMNS = ("_id", "id")  # BEIR's and the usual name


@dataclass
class Texts:
    """What to embed: ``count`` texts, and their ids."""

    source: Path
    count: int
    ids: list  # one per text: the input's ids, or positions
    records: list[str] | None  # the texts of a records file (None for .txt: read in blocks)

    def blocks(self, size: int) -> Iterator[list[str]]:
        if self.records is None:
            yield from text_blocks(self.source, self.count, size)
            return
        for start in range(0, self.count, size):
            yield self.records[start : start + size]


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output mnr encode cannot write or would silently replace."""
    if not path.name.lower().endswith(OUTPUT_FORMATS):
        raise ConfigError(f"--output {path}: unknown file type; write {', '.join(OUTPUT_FORMATS)}")
    check_new_file(path, overwrite=overwrite)


def read_texts(path: Path, columns: str = "") -> Texts:
    """The texts of ``path`` (see the module's docstring), every record checked."""
    if path.name.lower().endswith(".txt"):
        if columns:
            raise ConfigError("--columns: a .txt file has no columns (every line is a text)")
        count = count_texts(path)
        return Texts(path, count, list(range(count)), None)
    format_of(path)  # a file type we read
    mapping = {ours: theirs for theirs, ours in parse_column_map(columns, known={"text", "id"}).items()}
    texts, ids = [], []
    text_column = id_column = None
    for where, record in read_records(str(path)):
        if text_column is None:  # the first record decides, for every record
            text_column, id_column = _columns(record, mapping, where)
        value = record.get(text_column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: empty or missing text in column {text_column!r}")
        texts.append(value)
        ids.append(record.get(id_column) if id_column else len(ids))
    if not texts:
        raise DataError(f"{path}: empty file (no records)")
    return Texts(path, len(texts), ids, texts)


def _columns(record: dict, mapping: dict[str, str], where: str) -> tuple[str, str | None]:
    """(text column, id column or None) of a records file, from its first record."""
    names = list(map(str, record))
    for ours, theirs in mapping.items():
        if theirs not in record:
            raise DataError(f"{where}: --columns {ours}={theirs}: the file has no column {theirs!r} (its columns: "
                            f"{', '.join(names)})")
    id_column = mapping.get("id") or next((c for c in ID_COLUMNS if c in record), None)
    if "text" in mapping:
        return mapping["text"], id_column
    if "text" in record:
        return "text", id_column
    others = [c for c in names if c != id_column]
    if len(others) == 1:
        return others[0], id_column
    raise DataError(f"{where}: which column is the text? The file has {', '.join(names)}; name it with "
                    f"--columns text=COLUMN (and id=COLUMN to keep an id beside each embedding)")


def write_embeddings(path: Path, texts: Texts, dim: int, embed) -> None:
    """Write the embeddings of ``texts`` (``embed(block) -> (n, D) array``, a block at a time) to ``path``
    in its extension's format, through a temporary file renamed into place."""
    name = path.name.lower()
    with atomic_file(path) as tmp:
        if name.endswith(".npy"):  # written as it goes: a .txt of any size fits
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(texts.count, dim))
            row = 0
            for block in texts.blocks(BLOCK):
                array[row : row + len(block)] = embed(block)
                row += len(block)
            array.flush()
            del array
            return
        embeddings = np.concatenate([embed(block) for block in texts.blocks(BLOCK)]) if texts.count else \
            np.zeros((0, dim), np.float32)
        if name.endswith(".npz"):
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=embeddings, ids=np.asarray(texts.ids))
        elif name.endswith(".jsonl"):
            with open(tmp, "w", encoding="utf-8") as f:
                for id_, vector in zip(texts.ids, embeddings.tolist(), strict=True):
                    f.write(json.dumps({"id": id_, "embedding": vector}) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel(), pa.float32()), dim)
            pq.write_table(pa.table({"id": pa.array(texts.ids), "embedding": vectors}), tmp)


BLOCK = 65536  # texts read, sorted by length and embedded at a time: bounds memory, keeps batches tight
