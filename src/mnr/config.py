"""A training run's settings: defaults < ``--config file.toml`` < flags.

Each component owns its settings, as a group (litgpt's ``args.py``): the model's, the data's, training's,
evaluation's and the run directory's here; mining's in ``mnr.mine``; each loss's own in ``mnr.losses``. Users
see every setting as one flat key (``TrainConfig(lr=3e-5)``, ``lr = 3e-5`` in TOML, ``--lr 3e-5``); the code
reads it in its group (``config.training.lr``, ``config.loss.scale``). Each group checks its values when it is
made, naming the flag at fault, so a bad setting fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from mnr import layout as layouts
from mnr.data import RANKING
from mnr.device import check_device_name
from mnr.errors import ConfigError
from mnr.fileio import short_name
from mnr.guide import GuideSettings
from mnr.losses import LOSSES, MatryoshkaSettings
from mnr.mine import MiningSettings
from mnr.mixture import SAMPLINGS, Dataset, dataset_tables, plan
from mnr.model import POOLING_MODES
from mnr.prompts import PromptSettings
from mnr.retrieval import split_spec
from mnr.settings import check_types, default, flag, require, setting, toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelSettings:
    model: str = setting("sentence-transformers/all-MiniLM-L6-v2", "base model: a local directory, a Hugging Face "
                         "hub name, or a sentence-transformers model", weights=True)
    pooling: str = setting("", "mean, cls or max (default: the model's own; mean for a plain checkpoint)",
                           weights=True)
    max_seq_length: int = setting(0, "truncate texts to this many tokens; saved with the model (0: the model's own, "
                                     "e.g. 256 for all-MiniLM-L6-v2, 512 for a plain BERT checkpoint)", weights=True)
    layout: str = setting("auto", "how a forward is laid out: padded, buckets (packed: real tokens only, attention "
                                  "in blocks of similar length), jagged (packed, one variable-length attention per "
                                  "layer), or auto: buckets on a CPU, on CUDA the fastest that agrees with padded, "
                                  "measured on the first batches (mnr.layout); packed layouts need a BERT/RoBERTa-"
                                  "family model", weights=True)

    def __post_init__(self):
        check_types(self)
        require(self, "pooling", self.pooling in ("", *POOLING_MODES), "must be " + ", ".join(POOLING_MODES))
        require(self, "max_seq_length", self.max_seq_length == 0 or self.max_seq_length >= 2,
                "must be 0 (the model's own) or at least 2 (room for the special tokens)")
        require(self, "layout", self.layout in layouts.SETTINGS, "must be " + ", ".join(layouts.SETTINGS))


@dataclass
class DataSettings:
    data: list[str] = setting([], "training files (.jsonl/.csv/.tsv[.gz], .parquet) or hub datasets "
                                  "(hf:NAME[:CONFIG]:SPLIT): NLI (premise, hypothesis, label) or pairs "
                                  "(anchor, positive[, negative | negative_1, negative_2 ...]); or retrieval folders "
                                  "DIR[:SPLIT][[START:STOP]] (corpus, queries, qrels: (query, relevant passage) rows; "
                                  "e.g. retrieval/scifact:train[100:]); NAME=SPEC puts a source in dataset NAME "
                                  "(several datasets: each batch from one; see --dataset-sampling)", weights=True,
                         metavar="SPEC")
    data_dir: str = setting("", "where relative --data/--sts-dev/--ir-dev paths are looked up (default: "
                                "$MNR_DATA_DIR)", weights=False)
    columns: str = setting("", "map your column names to ours: OURS=THEIRS,... e.g. anchor=question,positive=answer",
                           weights=True)
    max_examples: int = setting(0, "train on a seeded random sample of this many examples (0: all)", weights=True)
    strict_qrels: bool = setting(False, "retrieval folders (--data, --ir-dev): refuse a judgement of a passage that "
                                        "is not in the corpus (default: evaluation counts it as relevant and never "
                                        "retrieved, as BEIR and MTEB do; training and mining skip it; a warning says "
                                        "how many)", weights=False)
    hard_negatives: bool = setting(False, "NLI data: train on (premise, entailment, contradiction) triplets "
                                          "instead of (premise, entailment) pairs", weights=True)
    dataset_sampling: str = setting("proportional", "with several datasets (--data NAME=SPEC, or [datasets.NAME] "
                                                    "tables in --config), each batch is from one of them: "
                                                    "proportional (every batch of every dataset once per epoch, in a "
                                                    "seeded random order) or round-robin (one of each in turn, until "
                                                    "one has none left)", weights=True)

    def __post_init__(self):
        check_types(self)
        require(self, "max_examples", self.max_examples >= 0, "must be >= 0")
        require(self, "dataset_sampling", self.dataset_sampling in SAMPLINGS, "must be " + " or ".join(SAMPLINGS))


@dataclass
class TrainingSettings:
    loss: str = setting("mnr", "mnr (Multiple Negatives Ranking) or softmax (SBERT NLI classifier)", weights=True)
    batch_size: int = setting(32, "rows per batch and process; with MNR every other row's texts in the batch "
                                  "(of all processes) are negatives", weights=True)
    mini_batch_size: int = setting(0, "mnr: embed the batch in chunks of this many texts with gradient caching, so "
                                      "a batch of thousands fits in memory; same loss and gradients (0: no caching)",
                                   weights=True)
    epochs: int = setting(1, "passes over the training data", weights=True)
    lr: float = setting(2e-5, "peak learning rate of AdamW", weights=True)
    warmup_ratio: float = setting(0.1, "fraction of steps with linear warm-up from 0 to --lr, then linear decay to "
                                       "0", weights=True)
    weight_decay: float = setting(0.01, "AdamW weight decay (not applied to biases and LayerNorm)", weights=True)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", weights=True)
    seed: int = setting(0, "seed for shuffling, dropout and initialisation", weights=True)
    bf16: bool | None = setting(None, "bf16 autocast for the encoder (fp32 weights and loss); default: on where bf16 "
                                      "is faster (GPUs from compute capability 8.0; CPUs with bf16 instructions "
                                      "whose bf16 matrix products measure at least 1.2x fp32's, e.g. with AMX), "
                                      "fp32 elsewhere; the choice is printed and saved in config.toml",
                                weights=True)
    device: str = setting("auto", "auto (cuda if available), cpu, cuda or cuda:N", weights=False)

    def __post_init__(self):
        check_types(self)
        require(self, "loss", self.loss in LOSSES, "must be one of " + ", ".join(LOSSES))
        require(self, "batch_size", self.batch_size >= 2, "must be at least 2 (MNR needs in-batch negatives)")
        require(self, "mini_batch_size", self.mini_batch_size >= 0, "must be >= 0")
        require(self, "mini_batch_size", not self.mini_batch_size or LOSSES[self.loss].cacheable,
                f"cannot be used with --loss {self.loss} (it is not computed from cached embeddings)")
        require(self, "epochs", self.epochs >= 1, "must be at least 1")
        require(self, "lr", math.isfinite(self.lr) and self.lr > 0, "must be a positive number")
        require(self, "warmup_ratio", 0 <= self.warmup_ratio <= 1, "must be between 0 and 1")
        require(self, "weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be >= 0")
        require(self, "max_grad_norm", math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "must be >= 0")
        check_device_name(self.device)


@dataclass
class EvalSettings:
    sts_dev: list[str] = setting([], "STS files (sentence1, sentence2, score) to evaluate on during training; best/ "
                                     "keeps the best model by the first one's Spearman (see --best-metric); with "
                                     "several, each is named sts_dev/FILE_STEM", weights=False, metavar="FILE")
    ir_dev: list[str] = setting([], "retrieval dev sets to evaluate on during training, DIR[:SPLIT][[START:STOP]] "
                                    "(BEIR-layout folders, e.g. retrieval/scifact:train[:100]); best/ keeps the best "
                                    "model by NDCG@10; with several, each is named ir_dev/FOLDER", weights=False,
                                metavar="SPEC")
    ignore_identical_ids: bool = setting(False, "--ir-dev: leave a passage whose id is the query's own out of that "
                                                "query's ranking (MTEB's rule where queries are themselves passages: "
                                                "argument retrieval, duplicate questions)", weights=False)
    best_metric: str = setting("", "the dev metric best/ is chosen by: a dev set (its headline metric: sts_dev, "
                                   "ir_dev, or with several of a kind sts_dev/FILE_STEM, ir_dev/FOLDER) or "
                                   "SET:METRIC, e.g. ir_dev:recall@100 (default: the first dev set given, STS first)",
                               weights=False)
    eval_steps: int = setting(500, "evaluate on the dev set every this many steps (and before and after training)",
                              weights=False)
    tensorboard: bool = setting(False, "also write the loss, learning rate and dev metrics as TensorBoard scalars to "
                                       "OUTPUT/tensorboard (needs the tensorboard package: pip install "
                                       "'mnr[tensorboard]')", weights=False)

    def __post_init__(self):
        check_types(self)
        require(self, "eval_steps", self.eval_steps >= 1, "must be at least 1")
        require(self, "best_metric", self.best()[0] in ("", *self.dev_sets()),
                "must name a dev set of this run (" + (", ".join(self.dev_sets()) or "none: give --sts-dev or "
                "--ir-dev") + "), optionally with :METRIC (e.g. ir_dev:recall@100)")

    def best(self) -> tuple[str, str]:
        """--best-metric as (dev set, metric); "" where it names none."""
        name, _, metric = self.best_metric.partition(":")
        return name, metric

    def dev_sets(self) -> dict[str, tuple[str, str]]:
        """{name: (kind: "sts" or "retrieval", spec)} of every dev set, in the order best/ prefers them (STS
        first): "sts_dev" and "ir_dev" when there is one of a kind, else "sts_dev/FILE_STEM" and "ir_dev/FOLDER"
        (a number added to a name given twice). Names have no ':' (--best-metric SET:METRIC)."""
        sets: dict[str, tuple[str, str]] = {}
        for key, kind, specs in (("sts_dev", "sts", self.sts_dev), ("ir_dev", "retrieval", self.ir_dev)):
            for spec in specs:
                stem = Path(split_spec(spec)[0].rstrip("/")).name if kind == "retrieval" else short_name(spec)
                name = key if len(specs) == 1 else f"{key}/{stem.replace(':', '_')}"
                name = next(n for n in (name, *(f"{name}-{i}" for i in range(2, len(specs) + 2))) if n not in sets)
                sets[name] = (kind, spec)
        return sets


@dataclass
class RunSettings:
    output: str = setting("", "output directory: final/ (last model), best/ (best on the dev set), log.jsonl, "
                              "config.toml", weights=False)
    save_every: int = setting(500, "write a checkpoint (model, optimizer, RNG, position) every this many steps and at "
                                   "the end (0: only when stopped by Ctrl-C/SIGTERM)", weights=False)
    keep_checkpoints: int = setting(2, "keep this many of the latest checkpoints", weights=False)
    resume: bool = setting(False, "continue the run in --output from its latest complete checkpoint (same settings)",
                           weights=False)
    nproc: int = setting(1, "train with this many processes (torchrun, DistributedDataParallel); negatives are "
                            "shared across all of them", weights=False)

    def __post_init__(self):
        check_types(self)
        require(self, "save_every", self.save_every >= 0, "must be >= 0")
        require(self, "keep_checkpoints", self.keep_checkpoints >= 1, "must be at least 1")
        require(self, "nproc", self.nproc >= 1, "must be at least 1")


# attribute of TrainConfig -> its group of settings, whose fields are keys as they are named
GROUPS = {"model": ModelSettings, "data": DataSettings, "prompts": PromptSettings, "training": TrainingSettings,
          "matryoshka": MatryoshkaSettings, "guide": GuideSettings, "eval": EvalSettings, "run": RunSettings}
# mnr train reads mining's settings as mine_ keys; the count is --mine-negatives, 0 for no mining
MINING_KEYS = {f.name: "mine_negatives" if f.name == "num_negatives" else f"mine_{f.name}"
               for f in dataclasses.fields(MiningSettings)}
MINING_HELP = ("mine this many hard negatives for every (anchor, positive) row before training, as `mnr mine` does "
               "(the other mine_ settings are its controls): the best-ranked passages of --mine-corpus by the base "
               "model (or --mine-model) that are not the anchor's positives; rows that find fewer are left out; the "
               "rows trained on are written to OUTPUT/mined.jsonl (0: none; with several datasets: each dataset of "
               "pairs whose loss ranks candidates, OUTPUT/mined-NAME.jsonl)")


def keys() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every key mnr train reads -> (where it lives: a group of ``GROUPS``, "mining" or "loss", its field); each
    loss's settings are there, so a key of a loss added to ``LOSSES`` is a key and a flag with nothing else done."""
    known = {f.name: (where, f) for where, group in GROUPS.items() for f in dataclasses.fields(group)}
    known |= {MINING_KEYS[f.name]: ("mining", f) for f in dataclasses.fields(MiningSettings)}
    for loss in LOSSES.values():
        known |= {f.name: ("loss", f) for f in dataclasses.fields(loss.Settings) if f.name not in known}
    return known


def defaults() -> dict:
    """Every key's default (0 for --mine-negatives: no mining; no dataset tables)."""
    return {key: default(f) for key, (_, f) in keys().items()} | {"mine_negatives": 0, "datasets": {},
                                                                  "dataset_names": None}


class TrainConfig:
    """The settings of one run, by group: ``model``, ``data``, ``training``, ``eval``, ``run`` (this module's),
    ``prompts`` (``mnr.prompts.PromptSettings``), ``matryoshka`` (``mnr.losses.MatryoshkaSettings``), ``guide``
    (``mnr.guide.GuideSettings``),
    ``mining`` (``mnr.mine.MiningSettings``; None without --mine-negatives) and ``loss`` (the chosen loss's own
    ``Settings``). Made from flat keys: ``TrainConfig(lr=3e-5, symmetric=True)``."""

    def __init__(self, **values):
        known = keys()
        self.dataset_tables = dataset_tables(values.pop("datasets", None) or {})  # [datasets.NAME] tables
        given: dict[str, dict] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(known))})")
            where, f = known[key]
            given.setdefault(where, {})[f.name] = value
        self.model, self.data, self.prompts, self.training, self.matryoshka, self.guide, self.eval, self.run = (
            group(**given.get(name, {})) for name, group in GROUPS.items())
        self.loss = self._loss_settings(given.get("loss", {}))
        self.mining = self._mining_settings(given.get("mining", {}))
        self._check_datasets()
        if self.mining and self.run.nproc > 1:
            raise ConfigError("--mine-negatives with --nproc above 1: mine first with `mnr mine`, then train on its "
                              "file")

    def datasets(self) -> list[Dataset]:
        """The run's datasets, each with its settings resolved (its table's, else the run's); none without data."""
        return plan(self.data.data, self.dataset_tables, self.dataset_defaults())

    def dataset_defaults(self) -> dict:
        """The run's values of the settings a dataset's table can give."""
        return {"loss": self.training.loss, "batch_size": self.training.batch_size, "columns": self.data.columns,
                "hard_negatives": self.data.hard_negatives, "max_examples": self.data.max_examples,
                "prompt_columns": None,  # None: the run's --prompt-columns (or their defaults)
                "mine": True}  # with --mine-negatives, every dataset it can mine

    def _check_datasets(self) -> None:
        """What each dataset's loss allows, before anything loads; the messages name the dataset where there are
        several."""
        datasets = self.datasets() or [Dataset("", (), **self.dataset_defaults())]
        if self.mining and not any(LOSSES[d.loss].input == RANKING for d in datasets):  # with several, it skips
            raise ConfigError(f"--mine-negatives adds negatives to ranking rows; --loss {datasets[0].loss} trains on "
                              "labelled pairs")  # the datasets whose loss takes none (recipe.minable)
        for d in datasets:
            where = f"[datasets.{d.name}] " if d.name else ""
            try:  # the training settings' own checks, on the dataset's loss and batch size
                dataclasses.replace(self.training, loss=d.loss, batch_size=d.batch_size)
            except ConfigError as e:
                raise ConfigError(f"{where}{e}") from None
            on = LOSSES[d.loss].input == RANKING
            if d.hard_negatives and not on:
                raise ConfigError(f"{where}--hard-negatives adds negatives to ranking rows; --loss {d.loss} trains on "
                                  "labelled pairs")
            if self.matryoshka.matryoshka_dims and not on:
                raise ConfigError(f"{where}--matryoshka-dims: --loss {d.loss}'s classifier takes the whole "
                                  "embedding; Matryoshka training needs a ranking loss (e.g. mnr)")
            if d.prompt_columns is not None:  # a table's own: its columns and prompts exist
                self.prompts.check_columns(d.prompt_columns, where)
        if self.guide.guide and not any(getattr(LOSSES[d.loss], "excludes", False) for d in datasets):
            raise ConfigError(f"--guide: --loss {datasets[0].loss} has no in-batch candidates to leave out; the "
                              "guide needs a ranking loss (e.g. mnr)")

    def __getattr__(self, name: str):
        """A flat key read as an attribute (``config.lr``) names the group it lives in."""
        known = keys()
        if name in known:
            where, f = known[name]
            raise AttributeError(f"TrainConfig has no attribute {name!r}: settings are grouped, read "
                                 f"config.{where}.{f.name}")
        raise AttributeError(f"TrainConfig has no attribute {name!r}")

    def _loss_settings(self, values: dict):
        """The chosen loss's settings; another loss's settings must be left at their defaults: a setting that
        silently does nothing is a mistake its user never sees."""
        chosen = LOSSES[self.training.loss].Settings
        own = {f.name for f in dataclasses.fields(chosen)}
        for name, value in values.items():
            users = {loss: f for loss, cls in LOSSES.items() for f in dataclasses.fields(cls.Settings)
                     if f.name == name}
            if name not in own and any(value != default(f) for f in users.values()):
                raise ConfigError(f"{flag(name)} applies to --loss {' or '.join(users)} only, got --loss "
                                  f"{self.training.loss}")
        return chosen(**{name: value for name, value in values.items() if name in own})

    @staticmethod
    def _mining_settings(values: dict) -> MiningSettings | None:
        count = values.pop("num_negatives", 0)
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"--mine-negatives must be an integer >= 0, got {count!r}")
        if not count:  # off: where negatives would come from, and which model ranks them, would do nothing
            for name in ("corpus", "model"):
                if values.get(name):
                    raise ConfigError(f"{flag(MINING_KEYS[name])} is used only with --mine-negatives")
            return None
        return MiningSettings(num_negatives=count, **values, keys=MINING_KEYS)

    # ------------------------------------------------------------ flat keys

    def flat(self) -> dict:
        """Every setting by its key, group by group (mining's only when it is on, the chosen loss's only)."""
        values = {f.name: getattr(getattr(self, name), f.name)
                  for name, group in GROUPS.items() for f in dataclasses.fields(group)}
        values |= {f.name: getattr(self.loss, f.name) for f in dataclasses.fields(self.loss)}
        values |= {"datasets": {name: {"data": t.data} | t.given() for name, t in self.dataset_tables.items()}}
        if self.mining is None:
            return values | {"mine_negatives": 0}
        return values | {MINING_KEYS[f.name]: getattr(self.mining, f.name) for f in dataclasses.fields(self.mining)}

    def weight_settings(self) -> dict:
        """The settings that change the trained weights (a checkpoint resumes only under the same values), the
        data aside: they are compared by content, so a moved file still resumes."""
        known = keys()
        settings = {key: value for key, value in self.flat().items()
                    if key in known and known[key][1].metadata["weights"] and key != "data"}
        # each dataset's own settings (its data too is compared by content), and which of them are named
        names = [d.name for d in self.datasets()]
        return settings | ({"datasets": {name: t.given() for name, t in self.dataset_tables.items()}}
                           if self.dataset_tables else {}) | ({"dataset_names": names} if any(names) else {})

    def replace(self, **values) -> TrainConfig:
        return TrainConfig(**(self.flat() | values))

    def __eq__(self, other) -> bool:
        return isinstance(other, TrainConfig) and self.flat() == other.flat()

    def __repr__(self) -> str:
        return "TrainConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.flat().items()) + ")"

    @classmethod
    def from_sources(cls, config_file: str | None = None, **flags) -> TrainConfig:
        """defaults < values in ``config_file`` < ``flags`` (flags that are None were not given)."""
        values = load_toml(config_file) if config_file else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)

    def to_toml(self) -> str:
        """The resolved config, to save beside the model: every setting, group by group."""
        lines = ["# resolved mnr training config: `mnr train --config THIS_FILE --output NEW_DIR` repeats the run"]
        tables = self.flat()
        for key, value in tables.items():
            value = False if key == "resume" else value  # a flag of one command, not a setting
            if key != "datasets":
                lines.append(f"# {key}: not set (decided at run time)" if value is None else
                             f"{key} = {toml_value(value)}")
        for name, table in tables["datasets"].items():  # tables come after the keys
            lines += ["", f"[datasets.{name}]", *(f"{key} = {toml_value(value)}" for key, value in table.items())]
        return "\n".join(lines) + "\n"


def load_toml(path: str | Path) -> dict:
    """Read a config file; unknown keys and wrong types are errors that name the file and key."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML ({e})") from None
    known = keys()
    if "packing" in values and "layout" not in values:  # config.toml files written before --layout
        values["layout"] = "auto" if values.pop("packing") else "padded"
    for key, value in values.items():
        if key == "datasets":  # [datasets.NAME] tables: checked below, with the rest
            continue
        if isinstance(value, dict) and not (key in known and isinstance(default(known[key][1]), dict)):
            raise ConfigError(f"{path}: [{key}] tables are not used; write key = value at the top level")
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    try:
        TrainConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return values
