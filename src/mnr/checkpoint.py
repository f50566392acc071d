"""Checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a directory ``OUTPUT/checkpoints/step-NNNNNNNN/`` holding ``checkpoint.pt`` (model,
loss and optimizer state, every process's RNG state, the position in the data, the best score so
far) and ``state.json`` (the same position, readable). It is written to a temporary directory and
renamed into place, so a directory with that name is always complete; a temporary one left by a
crash is ignored (with a warning) and removed. The step number in the name is zero-padded so the
names sort by step.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mnr.errors import MnrError
from mnr.fileio import atomic_directory, write_json

log = logging.getLogger(__name__)

FORMAT = 1


class CheckpointError(MnrError):
    """A checkpoint cannot be written or read."""


def directory(output: Path) -> Path:
    return output / "checkpoints"


def rng_states() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU and (if any) CUDA."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(output: Path, payload: dict, keep: int) -> Path:
    """Write ``payload`` as the checkpoint of ``payload['state']['step']``; keep the latest ``keep``."""
    path = directory(output) / f"step-{payload['state']['step']:08d}"
    previous = latest_complete(output, quiet=True)
    try:
        with atomic_directory(path) as tmp:
            torch.save(payload, tmp / "checkpoint.pt")
            write_json(tmp / "state.json", {"format": FORMAT, **payload["state"]})
    except OSError as e:
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; {kept}") from None
    for old in sorted(directory(output).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_complete(output: Path, quiet: bool = False) -> Path | None:
    """The newest complete checkpoint directory, or None; warns about (and removes) half-written ones."""
    root = directory(output)
    if not root.is_dir():
        return None
    for partial in root.glob(".step-*.tmp-*"):
        if not quiet:
            log.warning("ignoring a half-written checkpoint %s (the run stopped while writing it)", partial.name)
            shutil.rmtree(partial, ignore_errors=True)
    complete = sorted(p for p in root.glob("step-*") if (p / "checkpoint.pt").is_file())
    return complete[-1] if complete else None


def load(output: Path) -> tuple[Path, dict]:
    """The latest complete checkpoint that reads; an unreadable one is skipped with a warning."""
    while (path := latest_complete(output)) is not None:
        try:
            return path, torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged file (disk error): fall back to the one before
            log.warning("cannot read checkpoint %s (%s); trying the previous one", path, e)
            shutil.move(path, path.with_name(f".{path.name}.damaged"))
    raise CheckpointError(f"--resume: no complete checkpoint in {directory(output)}")


def mismatches(saved: dict, current: dict) -> list[str]:
    """What differs between the run that wrote a checkpoint and this one (``fingerprint`` dicts)."""
    problems = []
    if saved["model"] != current["model"]:
        problems.append(f"the checkpoint was trained from model {saved['model']!r}, not {current['model']!r}")
    if saved["data"] != current["data"]:
        problems.append(f"the training data differ from the checkpoint's (it saw {saved['rows']} rows "
                        f"from {', '.join(saved['sources'])})")
    for key, value in saved["settings"].items():
        if current["settings"].get(key) != value:
            problems.append(f"--{key.replace('_', '-')} was {value!r}, now {current['settings'].get(key)!r}")
    return problems
