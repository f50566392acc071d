"""The run directory: what a training run writes, and how a stopped run continues where it stopped.

    OUTPUT/
        config.toml              every setting of the run; `mnr train --config FILE --output NEW_DIR` repeats it
        log.jsonl                one line per step (loss, lr) and per evaluation
        checkpoints/step-N/      checkpoint.pt (model, loss and optimizer state, every process's RNG
                                 states, the position in the data, the best score) and state.json
        best/, final/            models in sentence-transformers' layout

Rules, each checked before any work starts: one directory holds one run (a finished run or
checkpoints are never overwritten without ``--resume``), and a run resumes only with the same
model, data (compared by content) and the settings that change the weights (``TrainConfig.weight_settings``).

Checkpoints and models are written to a temporary directory that is renamed into place, so a
directory with the final name is always complete; a temporary one left by a crash is ignored
(with a warning) and removed. Checkpoint names are zero-padded step numbers, so they sort by step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from mnr.config import TrainConfig, tomllib
from mnr.config import defaults as config_defaults
from mnr.data import TrainingSet
from mnr.errors import CheckpointError, ConfigError, ModelError
from mnr.fileio import atomic_directory, atomic_file, write_json
from mnr.mixture import Mixture

log = logging.getLogger(__name__)

FORMAT = 1



@dataclasses.dataclass
class Position:
    """Where a run is: what a checkpoint must restore besides the weights and RNG states."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch the next batch belongs to
    batch: int = 0  # the index of the next batch in that epoch
    rows: int = 0  # training rows seen (by this process)
    train_seconds: float = 0.0  # time in training steps, evaluation and saving excluded
    best_score: float | None = None  # the best dev metric so far (best/ holds that model)
    best_step: int | None = None  # the step it was reached at

    def advance(self, epoch: int, index: int, batches: int, rows: int) -> None:
        """One step done: batch ``index`` of the ``batches`` of ``epoch``, of ``rows`` rows."""
        self.step, self.rows = self.step + 1, self.rows + rows
        self.epoch, self.batch = (epoch + 1, 0) if index + 1 == batches else (epoch, index + 1)


class RunDir:
    """One run's output directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.tensorboard = None  # a SummaryWriter mirroring the log's numbers, once ``start`` opened one

    @classmethod
    def for_config(cls, config: TrainConfig) -> RunDir:
        """The run directory of ``config``, refusing to mix runs in it; touches nothing."""
        if not config.run.output:
            raise ConfigError("--output: no output directory given")
        run = cls(config.run.output)
        output = run.path
        if config.run.resume:
            if not (output / "config.toml").exists():
                raise ConfigError(f"--resume: no run to continue in {output}")
            if (output / "final").exists():
                raise ConfigError(f"--resume: the run in {output} has already finished ({output / 'final'})")
        elif (output / "final").exists():
            raise ConfigError(f"--output: {output} already holds a finished run ({output / 'final'}); choose "
                              f"another directory or remove it (to repeat that run: mnr train --config "
                              f"{output / 'config.toml'} --output NEW_DIR)")
        elif run.latest_checkpoint(quiet=True) is not None:
            raise ConfigError(f"--output: {output} holds checkpoints of an unfinished run; add --resume to "
                              "continue it, or choose another directory")
        return run

    # ------------------------------------------------------------ config and log

    def start(self, config: TrainConfig, step: int) -> None:
        """Create the directory (a clear error if it cannot be written), write config.toml, and drop
        from the log what an interrupted run wrote after the checkpoint it resumes from (``step``)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.toml").write_text(config.to_toml(), encoding="utf-8")
            log_file = self.path / "log.jsonl"
            if log_file.exists():
                kept = [line for line in log_file.read_text().splitlines() if step and _logged_step(line) <= step]
                log_file.write_text("".join(line + "\n" for line in kept))
        except OSError as e:
            raise ConfigError(f"--output: cannot write to {self.path}: {e.strerror or e}") from None
        if config.eval.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.path / "tensorboard"), purge_step=step or None)

    def recorded_setting(self, name: str):
        """A setting as this run's config.toml recorded it when the run began (None if there is none)."""
        try:
            with open(self.path / "config.toml", "rb") as f:
                return tomllib.load(f).get(name)
        except (OSError, tomllib.TOMLDecodeError):
            return None

    def record(self, entry: dict) -> None:
        """Append ``entry`` to log.jsonl (and its numbers to TensorBoard, when it is on)."""
        with open(self.path / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.tensorboard is not None and "done" not in entry and "mining" not in entry:
            for key, value in entry.items():
                if isinstance(value, dict):  # an evaluation: {metric: value}
                    for metric, number in value.items():
                        self.tensorboard.add_scalar(f"{key}/{metric}", number, entry["step"])
                elif key in ("loss", "lr"):
                    self.tensorboard.add_scalar(f"train/{key}", value, entry["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def write_text(self, name: str, text: str) -> None:
        """Replace the file OUTPUT/name whole (a new file renamed over the old one)."""
        with atomic_file(self.path / name) as tmp:
            tmp.write_text(text, encoding="utf-8")

    def read_log(self) -> list[dict]:
        """Every complete line of log.jsonl (a line torn by a crash is skipped)."""
        path = self.path / "log.jsonl"
        if not path.exists():
            return []
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    # ------------------------------------------------------------ models

    def save_model(self, encoder, name: str, extra_files: dict[str, str]) -> Path:
        """Write ``encoder`` to OUTPUT/name atomically (a previous copy stays intact on failure)."""
        path = self.path / name
        try:
            return encoder.save(path, extra_files=extra_files)
        except OSError as e:
            raise ModelError(f"cannot write the model to {path}: {e.strerror or e}; "
                             "anything saved there before is intact") from None

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, payload: dict, keep: int) -> Path:
        """Write ``payload`` as the checkpoint of ``payload['state']['step']``; keep the latest ``keep``."""
        path = self.checkpoints / f"step-{payload['state']['step']:08d}"
        previous = self.latest_checkpoint(quiet=True)
        try:
            with atomic_directory(path) as tmp:
                torch.save(payload, tmp / "checkpoint.pt")
                write_json(tmp / "state.json", {"format": FORMAT, **payload["state"]})
        except OSError as e:
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}; {kept}") from None
        for old in sorted(self.checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def latest_checkpoint(self, quiet: bool = False) -> Path | None:
        """The newest complete checkpoint directory, or None; warns about (and removes) half-written ones."""
        if not self.checkpoints.is_dir():
            return None
        for partial in self.checkpoints.glob(".step-*.tmp-*"):
            if not quiet:
                log.warning("ignoring a half-written checkpoint %s (the run stopped while writing it)", partial.name)
                shutil.rmtree(partial, ignore_errors=True)
        complete = sorted(p for p in self.checkpoints.glob("step-*") if (p / "checkpoint.pt").is_file())
        return complete[-1] if complete else None

    def load_checkpoint(self) -> tuple[Path, dict]:
        """The latest complete checkpoint that reads; an unreadable one is set aside with a warning."""
        while (path := self.latest_checkpoint()) is not None:
            try:
                return path, torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)
            except Exception as e:  # a damaged file (disk error): fall back to the one before
                log.warning("cannot read checkpoint %s (%s); trying the previous one", path, e)
                shutil.move(path, path.with_name(f".{path.name}.damaged"))
        raise CheckpointError(f"--resume: no complete checkpoint in {self.checkpoints}")

    def restore(self, fingerprint: dict, stateful: dict, rank: int) -> Position:
        """Load the latest checkpoint into ``stateful`` (name -> object with ``load_state_dict``) and
        this process's RNGs; refuse one written by a run that differs from ``fingerprint``."""
        path, saved = self.load_checkpoint()
        if saved.get("format") != FORMAT:
            raise CheckpointError(f"--resume: {path} was written by another version of mnr "
                                  f"(format {saved.get('format')}, this one reads {FORMAT})")
        problems = mismatches(saved["fingerprint"], fingerprint)
        if problems:
            raise CheckpointError(f"--resume: cannot continue from {path}: " + "; ".join(problems))
        for name, obj in stateful.items():
            obj.load_state_dict(saved[name])
        set_rng_states(saved["rng"][rank])
        if rank == 0:
            log.info("resuming from %s (step %d)", path, saved["state"]["step"])
        return Position(**saved["state"])


def evaluations(entries: list[dict]) -> list[dict]:
    """The evaluation lines of a log: {"step": N, DEV_SET: {METRIC: value}, ...}."""
    return [e for e in entries
            if "done" not in e and "mining" not in e and any(isinstance(v, dict) for v in e.values())]


def checkpoint_payload(position: Position, fingerprint: dict, stateful: dict, rngs: list[dict]) -> dict:
    """What a checkpoint holds: ``stateful``'s state dicts, every process's RNG states, the position."""
    return {"format": FORMAT, "fingerprint": fingerprint, "state": dataclasses.asdict(position),
            "rng": rngs, **{name: obj.state_dict() for name, obj in stateful.items()}}


def fingerprint(data: Mixture | TrainingSet, config: TrainConfig, processes: int) -> dict:
    """What a checkpoint must match to be resumed: model, data (by content; each dataset's by its name too) and
    result-changing settings. ``data``: the run's datasets, or the rows of its one."""
    parts = [("", data)] if isinstance(data, TrainingSet) else [(p.name, p.data) for p in data.parts]
    digest = hashlib.sha256()
    for name, rows in parts:
        if name:  # a run of one unnamed dataset: the digest of its rows alone, as before datasets had names
            digest.update(f"\x1c{name}\x1c".encode())
        for i, row in enumerate(rows.rows):
            digest.update("\x1f".join(row).encode())
            digest.update(f"\x1e{rows.labels[i] if rows.labels is not None else ''}\x1d".encode())
    settings = config.weight_settings() | {"processes": processes}
    return {"model": config.model.model, "data": digest.hexdigest(), "rows": len(data),
            "sources": [source for _, rows in parts for source in rows.sources], "settings": settings}


def mismatches(saved: dict, current: dict) -> list[str]:
    """What differs between the run that wrote a checkpoint and this one (``fingerprint`` dicts)."""
    defaults = config_defaults()
    problems = []
    if saved["model"] != current["model"]:
        problems.append(f"the checkpoint was trained from model {saved['model']!r}, not {current['model']!r}")
    if saved["data"] != current["data"]:
        problems.append(f"the training data differ from the checkpoint's (it saw {saved['rows']} rows "
                        f"from {', '.join(saved['sources'])})")
    # a setting this run does not read (another loss's, mining's when off) cannot matter; one that is new since
    # the checkpoint was written matters only if this run sets it
    names = {"datasets": "the datasets' own settings ([datasets.NAME] tables)", "dataset_names": "the datasets"}
    for key, value in current["settings"].items():
        before = saved["settings"].get(key, defaults.get(key))
        if before != value and key in names:
            problems.append(f"{names[key]} differ: {before!r} then, {value!r} now")
        elif before != value:
            problems.append(f"--{key.replace('_', '-')} was {before!r}, now {value!r}")
    return problems


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


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a line torn by a crash, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf
