"""Training configuration: one dataclass, defaults < ``--config file.toml`` < flags.

Each field's ``help`` becomes its ``--flag``'s help text; ``__post_init__`` checks every value
and names the flag at fault, so a bad setting fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mnr.data import short_name, split_spec
from mnr.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _f(default, help: str, *, weights: bool):
    """A setting: its default, its ``--flag`` help, and whether it changes the trained weights
    (``weights``; a checkpoint only resumes under the same values of those, see ``RESULT_SETTINGS``)."""
    metadata = {"help": help, "weights": weights}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # what to train
    model: str = _f("sentence-transformers/all-MiniLM-L6-v2", "base model: a local directory, a Hugging Face hub "
                    "name, or a sentence-transformers model", weights=True)
    data: list[str] = _f([], "training files (.jsonl/.csv/.tsv[.gz], .parquet) or hub datasets "
                             "(hf:NAME[:CONFIG]:SPLIT): NLI (premise, hypothesis, label) or pairs "
                             "(anchor, positive[, negative | negative_1, negative_2 ...]); or retrieval folders "
                             "DIR[:SPLIT][[START:STOP]] (corpus, queries, qrels: (query, relevant passage) rows; "
                             "e.g. retrieval/scifact:train[100:])", weights=True)
    data_dir: str = _f("", "where relative --data/--sts-dev/--ir-dev paths are looked up (default: $MNR_DATA_DIR)",
                       weights=False)
    columns: str = _f("", "map your column names to ours: OURS=THEIRS,... e.g. anchor=question,positive=answer",
                      weights=True)
    output: str = _f("", "output directory: final/ (last model), best/ (best on the dev set), log.jsonl, config.toml",
                     weights=False)
    max_examples: int = _f(0, "train on a seeded random sample of this many examples (0: all)", weights=True)
    strict_qrels: bool = _f(False, "retrieval folders (--data, --ir-dev): refuse a judgement of a passage that is not "
                                   "in the corpus (default: evaluation counts it as relevant and never retrieved, as "
                                   "BEIR and MTEB do; training and mining skip it; a warning says how many)",
                            weights=False)
    # objective
    loss: str = _f("mnr", "mnr (Multiple Negatives Ranking) or softmax (SBERT NLI classifier)", weights=True)
    hard_negatives: bool = _f(False, "NLI data: train on (premise, entailment, contradiction) triplets "
                                     "instead of (premise, entailment) pairs", weights=True)
    mine_negatives: int = _f(0, "mine this many hard negatives for every (anchor, positive) row before training, as "
                                "`mnr mine` does (its other controls are there): the best-ranked passages of "
                                "--mine-corpus by the base model (or --mine-model) that are not the anchor's "
                                "positives; rows that find fewer are left out; the rows trained on are written to "
                                "OUTPUT/mined.jsonl (0: none)",
                             weights=True)
    mine_corpus: str = _f("", "where mined negatives come from: a retrieval folder or a corpus file (default: the "
                              "corpus of the retrieval folders in --data, and every text of --data but its anchors)",
                          weights=True)
    mine_model: str = _f("", "mining: rank the candidates with this model (a directory or hub name, with its own "
                             "pooling and max length, as `mnr mine` does) instead of the base model; e.g. the best/ "
                             "of a first run, for a second round of mining (training still starts from --model)",
                         weights=True)
    mine_range_max: int = _f(50, "mining: candidates are taken from this many of the best-ranked passages",
                             weights=True)
    mine_relative_margin: float = _f(0.05, "mining: a candidate scoring above (1 - this) x the anchor's positive is "
                                           "left out as a likely unjudged positive (0.05: NV-Retriever's setting; "
                                           "0: no margin)", weights=True)
    symmetric: bool = _f(False, "mnr: also rank anchors given each positive, and average both directions",
                         weights=True)
    scale: float = _f(20.0, "mnr: cosine similarities are multiplied by this (1 / temperature)", weights=True)
    # model
    pooling: str = _f("", "mean, cls or max (default: the model's own; mean for a plain checkpoint)", weights=True)
    max_seq_length: int = _f(0, "truncate texts to this many tokens; saved with the model (0: the model's own, e.g. "
                                "256 for all-MiniLM-L6-v2, 512 for a plain BERT checkpoint)", weights=True)
    layout: str = _f("auto", "how a forward is laid out: padded, buckets (packed: real tokens only, attention in "
                             "blocks of similar length), jagged (packed, one variable-length attention per layer), "
                             "or auto: buckets on a CPU, on CUDA the fastest that agrees with padded, measured on "
                             "the first batches (mnr.layout); packed layouts need a BERT/RoBERTa-family model",
                     weights=True)
    # optimisation
    batch_size: int = _f(32, "rows per batch and process; with MNR every other row's texts in the batch "
                             "(of all processes) are negatives", weights=True)
    mini_batch_size: int = _f(0, "mnr: embed the batch in chunks of this many texts with gradient caching, so a "
                                 "batch of thousands fits in memory; same loss and gradients (0: no caching)",
                              weights=True)
    epochs: int = _f(1, "passes over the training data", weights=True)
    lr: float = _f(2e-5, "peak learning rate of AdamW", weights=True)
    warmup_ratio: float = _f(0.1, "fraction of steps with linear warm-up from 0 to --lr, then linear decay to 0",
                             weights=True)
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm)", weights=True)
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)", weights=True)
    seed: int = _f(0, "seed for shuffling, dropout and initialisation", weights=True)
    bf16: bool | None = _f(None, "bf16 autocast for the encoder (fp32 weights and loss); default: on where the "
                                 "device computes bf16 natively (GPUs from compute capability 8.0, CPUs with AVX-512 "
                                 "BF16 or AMX), fp32 elsewhere; the choice is printed and saved in config.toml",
                           weights=True)
    device: str = _f("auto", "auto (cuda if available), cpu, cuda or cuda:N", weights=False)
    # evaluation
    sts_dev: list[str] = _f([], "STS files (sentence1, sentence2, score) to evaluate on during training; best/ keeps "
                                "the best model by the first one's Spearman (see --best-metric); with several, each "
                                "is named sts_dev/FILE_STEM", weights=False)
    ir_dev: list[str] = _f([], "retrieval dev sets to evaluate on during training, DIR[:SPLIT][[START:STOP]] (BEIR-"
                               "layout folders, e.g. retrieval/scifact:train[:100]); best/ keeps the best model by "
                               "NDCG@10; with several, each is named ir_dev/FOLDER", weights=False)
    ignore_identical_ids: bool = _f(False, "--ir-dev: leave a passage whose id is the query's own out of that "
                                           "query's ranking (MTEB's rule where queries are themselves passages: "
                                           "argument retrieval, duplicate questions)", weights=False)
    best_metric: str = _f("", "the dev metric best/ is chosen by: a dev set (its headline metric: sts_dev, ir_dev, "
                              "or with several of a kind sts_dev/FILE_STEM, ir_dev/FOLDER) or SET:METRIC, e.g. "
                              "ir_dev:recall@100 (default: the first dev set given, STS first)", weights=False)
    eval_steps: int = _f(500, "evaluate on the dev set every this many steps (and before and after training)",
                         weights=False)
    tensorboard: bool = _f(False, "also write the loss, learning rate and dev metrics as TensorBoard scalars to "
                                  "OUTPUT/tensorboard (needs the tensorboard package: pip install 'mnr[tensorboard]')",
                           weights=False)
    # never lose work
    save_every: int = _f(500, "write a checkpoint (model, optimizer, RNG, position) every this many steps and at "
                              "the end (0: only when stopped by Ctrl-C/SIGTERM)", weights=False)
    keep_checkpoints: int = _f(2, "keep this many of the latest checkpoints", weights=False)
    resume: bool = _f(False, "continue the run in --output from its latest complete checkpoint (same settings)",
                      weights=False)
    nproc: int = _f(1, "train with this many processes (torchrun, DistributedDataParallel); negatives are "
                       "shared across all of them", weights=False)

    def __post_init__(self):
        _check_types(self, "")
        checks = [
            (self.pooling in ("", "mean", "cls", "max"), "--pooling must be mean, cls or max"),
            (self.batch_size >= 2, "--batch-size must be at least 2 (MNR needs in-batch negatives)"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (math.isfinite(self.lr) and self.lr > 0, "--lr must be a positive number"),
            (0 <= self.warmup_ratio <= 1, "--warmup-ratio must be between 0 and 1"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0, "--max-grad-norm must be >= 0"),
            (math.isfinite(self.scale) and self.scale > 0, "--scale must be a positive number"),
            (self.max_seq_length == 0 or self.max_seq_length >= 2,
             "--max-seq-length must be 0 (the model's own) or at least 2 (room for the special tokens)"),
            (self.max_examples >= 0, "--max-examples must be >= 0"),
            (self.eval_steps >= 1, "--eval-steps must be at least 1"),
            (self.mini_batch_size >= 0, "--mini-batch-size must be >= 0"),
            (self.save_every >= 0, "--save-every must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (self.nproc >= 1, "--nproc must be at least 1"),
            (self.mine_negatives >= 0, "--mine-negatives must be >= 0"),
            (self.layout in ("auto", "padded", "buckets", "jagged"),
             "--layout must be auto, padded, buckets or jagged"),
            (self.mine_range_max >= max(1, self.mine_negatives),
             "--mine-range-max must leave room for --mine-negatives candidates"),
            (0 <= self.mine_relative_margin < 1, "--mine-relative-margin must be in [0, 1)"),
            (self.mine_negatives or not self.mine_corpus, "--mine-corpus is used only with --mine-negatives"),
            (self.mine_negatives or not self.mine_model, "--mine-model is used only with --mine-negatives"),
            (self.nproc == 1 or not self.mine_negatives,
             "--mine-negatives with --nproc above 1: mine first with `mnr mine`, then train on its file"),
            (self.best_metric.partition(":")[0] in ("", *self.dev_sets()),
             "--best-metric must name a dev set of this run (" + (", ".join(self.dev_sets()) or "none: give --sts-dev "
             "or --ir-dev") + "), optionally with :METRIC (e.g. ir_dev:recall@100)"),
            (self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
             "--device must be auto, cpu, cuda or cuda:N"),
        ]
        for ok, message in checks:
            if not ok:
                name = message.split()[0][2:].replace("-", "_")
                raise ConfigError(f"{message}, got {getattr(self, name)!r}")
        from mnr.losses import check_settings  # the loss says which settings it reads

        check_settings(self)

    def dev_sets(self) -> dict[str, tuple[str, str]]:
        """{name: (kind, spec)} of every dev set, in the order best/ prefers them (STS first): "sts_dev" and
        "ir_dev" when there is one of a kind, else "sts_dev/FILE_STEM" and "ir_dev/FOLDER" (a number added
        to a name given twice). Names have no ':' (--best-metric SET:METRIC)."""
        sets: dict[str, tuple[str, str]] = {}
        for kind, specs in (("sts_dev", self.sts_dev), ("ir_dev", self.ir_dev)):
            for spec in specs:
                name = kind if len(specs) == 1 else f"{kind}/{_stem(spec, kind)}"
                name = next(n for n in (name, *(f"{name}-{i}" for i in range(2, len(specs) + 2))) if n not in sets)
                sets[name] = (kind, spec)
        return sets

    # ------------------------------------------------------------ files

    @classmethod
    def from_sources(cls, config_file: str | None = None, **flags) -> TrainConfig:
        """defaults < values in ``config_file`` < ``flags`` (flags that are None were not given)."""
        values = load_toml(config_file) if config_file else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        return cls(**values)

    def to_toml(self) -> str:
        """The resolved config, to save beside the model: every field, in declaration order."""
        lines = ["# resolved mnr training config: `mnr train --config THIS_FILE --output NEW_DIR` repeats the run"]
        for f in dataclasses.fields(self):
            value = False if f.name == "resume" else getattr(self, f.name)  # a flag of one command, not a setting
            lines.append(f"# {f.name}: not set (decided at run time)" if value is None else
                         f"{f.name} = {_toml_value(value)}")
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
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    if "packing" in values and "layout" not in values:  # config.toml files written before --layout
        values["layout"] = "auto" if values.pop("packing") else "padded"
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: [{key}] tables are not used; write key = value at the top level")
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    try:
        TrainConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return values


def _stem(spec: str, kind: str) -> str:
    """A dev set's short name: an STS file's name without its extensions; a retrieval folder's name."""
    if kind == "ir_dev":
        return Path(split_spec(spec)[0].rstrip("/")).name
    return short_name(spec).replace(":", "_")


def _check_types(config: TrainConfig, where: str) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(config):
        value, expected = getattr(config, f.name), hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
            continue
        if expected == list[str] and isinstance(value, str):  # one file where a list is expected (older config.toml)
            setattr(config, f.name, [value] if value else [])
            continue
        if value is None and expected == (bool | None):  # not set: decided at run time
            continue
        if expected == (bool | None):
            expected = bool
        if expected == list[str]:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            kind = {str: "text", int: "an integer", float: "a number", bool: "true or false"}.get(expected,
                                                                                                 "a list of text")
            raise ConfigError(f"{where}{flag} must be {kind}, got {value!r}")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string is a valid TOML basic string
