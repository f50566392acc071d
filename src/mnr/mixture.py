"""Several datasets in one run: each with its own columns, loss, batch size and prompts; every batch from one of them.

Mixing NLI (general similarity) with a user's (query, passage) pairs (search) is how embedding models are trained,
and in-batch negatives only make sense within one task: an NLI hypothesis is no negative for a scientific claim. So
each dataset is cut into duplicate-free batches of its own (as a one-dataset run is), and an epoch's batches are
interleaved by a seeded draw (sentence-transformers' multi-dataset batch samplers, FlagEmbedding's
``same_dataset_within_batch``):

* ``proportional`` (the default): every batch of every dataset once per epoch, in a seeded random order, so a
  dataset's share of the steps is its share of the batches;
* ``round-robin``: one batch of each dataset in turn, until one of them has none left (the others' remaining
  batches are not used that epoch), so each dataset gets the same number of steps whatever its size.

A dataset is named on the command line (``--data nli=nli/snli.jsonl --data scifact=retrieval/scifact:train``) or in
a config file, one table per dataset, whose keys override the run's for that dataset::

    [datasets.nli]
    data = ["nli/snli_dev.jsonl.gz"]
    hard_negatives = true
    batch_size = 64

    [datasets.scifact]
    data = ["retrieval/scifact:train[100:]"]
    prompt_columns = {anchor = "query", positive = "passage"}
    mine = false  # with --mine-negatives, its pairs train as they are (the other datasets of pairs are mined)

A run's rows are numbered across its datasets (the first dataset's rows first), so a batch is a list of row numbers
as in a one-dataset run, and a run with one unnamed dataset is exactly the run it always was.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import re
from collections.abc import Collection
from dataclasses import dataclass

from mnr.batching import process_batches
from mnr.data import TrainingSet
from mnr.errors import ConfigError, DataError
from mnr.settings import check_types, setting

SAMPLINGS = ("proportional", "round-robin")
NAME = re.compile(r"^[A-Za-z][\w.-]*$")  # a dataset's name: NAME=SPEC on the command line, [datasets.NAME] in TOML


@dataclass
class DatasetSettings:
    """One dataset's own settings (a ``[datasets.NAME]`` table); a setting it does not give is the run's."""

    data: list[str] = setting([], "its training files, hub datasets or retrieval folders (as --data)", weights=True)
    columns: str | None = setting(None, "its column names, OURS=THEIRS,... (as --columns)", weights=True)
    hard_negatives: bool | None = setting(None, "NLI data: (premise, entailment, contradiction) triplets",
                                          weights=True)
    max_examples: int | None = setting(None, "a seeded random sample of this many of its rows (0: all)",
                                       weights=True)
    loss: str | None = setting(None, "its loss (as --loss)", weights=True)
    batch_size: int | None = setting(None, "rows per batch and process of its batches", weights=True)
    prompt_columns: dict[str, str] | None = setting(None, "which of its columns get which of --prompts "
                                                          "(COLUMN=NAME; {} for none)", weights=True)
    mine: bool | None = setting(None, "with --mine-negatives: whether its (anchor, positive) pairs are mined (false: "
                                      "they train as they are)", weights=True)

    def __post_init__(self):
        check_types(self)

    def given(self) -> dict:
        """The settings the table gives (the rest are the run's)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None and f.name != "data"}


def split_name(spec: str) -> tuple[str, str]:
    """``NAME=SPEC`` -> (NAME, SPEC); a spec without a name -> ("", spec)."""
    name, sep, rest = spec.partition("=")
    return (name, rest) if sep and NAME.match(name) else ("", spec)


def dataset_tables(values) -> dict[str, DatasetSettings]:
    """``datasets`` as a config gives it ({name: {key: value}}) -> {name: DatasetSettings}, each checked."""
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ConfigError(f"datasets: one table per dataset ([datasets.NAME] with its keys), got {values!r}")
    known = [f.name for f in dataclasses.fields(DatasetSettings)]
    out = {}
    for name, table in values.items():
        if not NAME.match(name):
            raise ConfigError(f"[datasets.{name}]: a dataset's name starts with a letter and has letters, digits, "
                              "'_', '-' or '.'")
        unknown = [key for key in table if key not in known]
        if unknown:
            raise ConfigError(f"[datasets.{name}]: unknown key {unknown[0]!r} (a dataset takes: {', '.join(known)})")
        try:
            out[name] = DatasetSettings(**table)
        except ConfigError as e:
            raise ConfigError(f"[datasets.{name}]: {e}") from None
    return out


@dataclass(frozen=True)
class Dataset:
    """One dataset of a run, its settings resolved (its own, else the run's)."""

    name: str  # "" for a run's only dataset when it is not named
    specs: tuple[str, ...]
    loss: str
    batch_size: int
    columns: str
    hard_negatives: bool
    max_examples: int
    prompt_columns: dict
    mine: bool  # with --mine-negatives: mine its pairs (a dataset of pairs with a ranking loss)


def plan(data: list[str], tables: dict[str, DatasetSettings], run: dict) -> list[Dataset]:
    """The run's datasets: named --data specs and ``[datasets.NAME]`` tables (their data together), unnamed specs one
    dataset (named "data" beside named ones, "" alone); ``run``: the run's values of the keys a table can override.
    """
    specs: dict[str, list[str]] = {}
    for spec in data:
        name, path = split_name(spec)
        specs.setdefault(name, []).append(path)
    for name, table in tables.items():
        specs.setdefault(name, [])[:0] = table.data
    if "" in specs and len(specs) > 1:
        if "data" in specs:
            raise ConfigError("--data: unnamed sources beside a dataset named 'data'; name them (NAME=SPEC)")
        specs = {name or "data": paths for name, paths in specs.items()}
    out = []
    for name, paths in specs.items():
        given = tables[name].given() if name in tables else {}
        if not paths:
            raise ConfigError(f"[datasets.{name}]: no data (give its data = [...] or --data {name}=SPEC)")
        values = run | given
        out.append(Dataset(name, tuple(paths), values["loss"], values["batch_size"], values["columns"],
                           values["hard_negatives"], values["max_examples"], values["prompt_columns"], values["mine"]))
    return out


@dataclass
class Part:
    """One dataset of a run, loaded: its rows, numbered from ``offset`` among the run's."""

    dataset: Dataset
    data: TrainingSet
    offset: int
    mined: bool = False  # its negatives were mined before training (--mine-negatives)

    @property
    def name(self) -> str:
        return self.dataset.name


class Mixture:
    """The datasets of a run, loaded; rows numbered across them."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.starts = [p.offset for p in parts]

    @classmethod
    def of(cls, datasets: list[tuple[Dataset, TrainingSet]], mined: Collection[str] = ()) -> Mixture:
        """``mined``: the names of the datasets whose negatives were mined."""
        parts, offset = [], 0
        for dataset, data in datasets:
            parts.append(Part(dataset, data, offset, dataset.name in mined))
            offset += len(data)
        return cls(parts)

    def __len__(self) -> int:
        return sum(len(p.data) for p in self.parts)

    def part_of(self, batch: list[int]) -> tuple[int, list[int]]:
        """The dataset of a batch (its index in ``parts``: all its rows are of one) and the rows' numbers in it."""
        k = bisect.bisect_right(self.starts, batch[0]) - 1
        return k, [i - self.parts[k].offset for i in batch]

    def batches(self, sampling: str, seed: int, epoch: int, duplicate_free: list[bool], rank: int = 0,
                world_size: int = 1) -> list[list[int]]:
        """This process's batches of one epoch: each dataset's own (``mnr.batching.process_batches``, its batch
        size), interleaved as ``sampling`` says by a draw seeded with (seed, epoch), the same in every process.
        ``duplicate_free``: per dataset, whether its loss takes in-batch negatives."""
        own = []
        for k, part in enumerate(self.parts):
            try:
                batches = process_batches(part.data, part.dataset.batch_size, seed + k, epoch, rank=rank,
                                          world_size=world_size, duplicate_free=duplicate_free[k])
            except DataError as e:
                raise DataError(f"dataset {part.name!r}: {e}" if part.name else str(e)) from None
            if not batches:
                raise DataError(f"{f'dataset {part.name!r}: ' if part.name else ''}{len(part.data)} rows, not one "
                                f"batch of {part.dataset.batch_size} per process for {world_size} processes")
            own.append([[i + part.offset for i in b] for b in batches])
        if len(own) == 1:
            return own[0]
        return interleave(own, sampling, random.Random(seed * 1_000_003 + epoch + 7_919))


def interleave(batches: list[list[list[int]]], sampling: str, rng: random.Random) -> list[list[int]]:
    """One list of the datasets' batches (each dataset's in its own order): ``proportional``, every batch once in a
    random order of datasets; ``round-robin``, one of each in turn until a dataset has none left."""
    if sampling == "round-robin":
        rounds = min(len(b) for b in batches)
        return [b[r] for r in range(rounds) for b in batches]
    order = [k for k, b in enumerate(batches) for _ in b]
    rng.shuffle(order)
    taken = [iter(b) for b in batches]
    return [next(taken[k]) for k in order]
