"""Writing directories so that a crash never leaves a half-written model or checkpoint behind."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnr.errors import ConfigError


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
