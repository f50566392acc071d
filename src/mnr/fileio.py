"""Files: where relative paths are looked up, reading records (with the file and line of each, for error
messages) and rows, and writing files and directories so that a crash never leaves half of one behind.

Records come from JSON Lines (or a .json array), CSV, TSV (each optionally gzipped), Parquet, or a Hugging Face
hub dataset (``hf:NAME[:CONFIG]:SPLIT``); ``read_records`` yields ``(where, record)`` with ``where`` the
``file:line`` (``file:row N`` for Parquet and the hub).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mnr.errors import ConfigError, DataError

HUB_PREFIX = "hf:"


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it becomes ``path``.

    The temporary directory is a sibling (same file system), so the final step is a rename. An
    existing ``path`` is moved aside first and deleted only after the new one is in place, so at
    every instant one complete copy exists. On any exception the temporary directory is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path`` (a rename), so
    ``path`` never holds half a file. On any exception the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def check_new_file(path: str | os.PathLike, flag: str = "--output", overwrite: bool | None = None) -> None:
    """Refuse, before any work, an output file whose directory does not exist, or (``overwrite`` False) one
    that exists; ``overwrite`` None: replacing is the command's normal business (a plot, a report)."""
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise ConfigError(f"{flag} {path}: no such directory {path.resolve().parent}")
    if overwrite is False and path.exists():
        raise ConfigError(f"{flag} {path} exists; give --overwrite to replace it")


def write_json(path: Path, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _fsync_tree(root: Path) -> None:
    """Flush file contents before the rename makes them visible: a rename can reach the disk
    before the data it points to, and a power cut would then leave an empty 'complete' copy."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- data directory


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The directory relative data paths are looked up in: the flag, else ``$MNR_DATA_DIR``."""
    value = explicit or os.environ.get("MNR_DATA_DIR")
    return Path(value) if value else None


def resolve_path(spec: str, root: Path | None) -> str:
    """Return a local path or a hub spec for ``spec``, a file (a retrieval folder:
    ``mnr.retrieval.resolve_retrieval_spec``).

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
        header = _csv_row(reader, path, "header")
        if header is None:
            return
        header = [h.strip() for h in header]
        while (values := _csv_row(reader, path, "line")) is not None:
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: malformed line: {len(values)} fields, "
                    f"the header has {len(header)} ({', '.join(header)})"
                )
            yield f"{path}:{reader.line_num}", dict(zip(header, values, strict=True))


def _csv_row(reader, path: Path, what: str) -> list[str] | None:
    """The next row (None at the end); a malformed one is an error naming its line."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as e:
        raise DataError(f"{path}:{max(reader.line_num, 1)}: malformed {what} ({e})") from None


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
