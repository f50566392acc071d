"""The run's recipe, around the loop of ``mnr.train``: what it trains on and with, and what it leaves.

``prepare`` loads and checks everything (data, mining, model, loss, dev sets, the layout) before anything is
written; ``Run`` is the run while it trains: its directory (started, or restored from its last checkpoint), its
evaluations and best/, its checkpoints and losses in the log, and at the end final/, the model cards, the
curves and the summary. What goes to disk, and how a stopped run resumes, is ``mnr.rundir``'s.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import shlex
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mnr import distributed, rundir
from mnr import layout as layouts
from mnr import mine as mining
from mnr.card import RunFacts, hardware, model_card, read_license
from mnr.config import TrainConfig
from mnr.data import RANKING, TrainingSet, load_training_set, parse_column_map
from mnr.device import choose_bf16, resolve_device
from mnr.dropout import use_fast_dropout
from mnr.errors import ConfigError, DataError, Stopped, TrainingError
from mnr.evaluate import RETRIEVAL, Evaluator, evaluators
from mnr.fileio import data_dir, write_rows
from mnr.guide import Guide, load_guide
from mnr.losses import LOSSES, Loss, Matryoshka
from mnr.mixture import Dataset, Mixture
from mnr.model import SentenceEncoder
from mnr.plot import plot_runs
from mnr.prompts import MODELS_OWN, PromptChoice, saved
from mnr.retrieval import RetrievalEvaluator, split_spec
from mnr.rundir import Position, RunDir
from mnr.signals import StopNow, StopSignals

log = logging.getLogger(__name__)

MINED_FILE = "mined.jsonl"  # --mine-negatives: the rows trained on, in the run's directory (mined-NAME.jsonl each)


@dataclass
class TrainResult:
    final: Path
    best: Path | None
    best_score: float | None  # the dev metric of best/
    best_metric: str | None  # which one, e.g. "sts_dev spearman"
    train_seconds: float  # the loop's forward/backward/step time, evaluation and saving excluded
    steps: int
    rows: int  # training examples seen (by this process)
    summary: dict  # what the run tells its user at the end (also the last line of log.jsonl)


@dataclass
class Task:
    """What a step on a batch of one dataset runs: that dataset's loss and its columns' prompts."""

    objective: Loss  # the loss module (with parameters of its own for the softmax classifier)
    train_objective: torch.nn.Module  # what a step calls: the objective, or its wrapper when it has parameters
    prompts: list[str]  # the prompt put before each column's texts ("" for none)
    prompt_lengths: list[int] | None  # how many first tokens of each column pooling leaves out (--no-include-prompt)


@dataclass
class Setup:
    """Everything loaded and checked before the output directory is touched."""

    data: Mixture  # the training rows: one dataset, or several (mnr.mixture), numbered across them
    evaluators: list[Evaluator]  # dev sets; best/ keeps the model with the best primary metric of the first
    encoder: SentenceEncoder  # the model being trained: evaluated and saved
    objective: torch.nn.Module  # the loss, or with several datasets all their losses (a ModuleDict): checkpointed
    tasks: list[Task]  # per dataset: its loss and prompts
    train_encoder: torch.nn.Module  # what a step calls: the encoder, or its DistributedDataParallel wrapper
    token_ids: dict[str, list[int]]  # every distinct text, with its column's prompt, tokenised once
    device: torch.device
    bf16: bool  # the encoder runs under bf16 autocast (config's bf16, or chosen for the device when unset)
    total_steps: int  # every epoch's batches counted (epochs can differ by a batch or two)
    rank: int
    world_size: int
    layout: layouts.Choice  # how the training forward is laid out, and why
    mining: dict = field(default_factory=dict)  # --mine-negatives: what mining kept and left out (logged)
    guide: Guide | None = None  # --guide: its embeddings of the training texts, and the candidates it leaves out


def prepare(config: TrainConfig, *, data: TrainingSet | None = None,
            encoder: SentenceEncoder | None = None, progress: bool = True) -> Setup:
    """Load and validate data, model, loss and dev sets. Any bad input fails here, before anything is written.

    ``data`` and ``encoder`` replace the training set and model that ``config`` names (for Python
    callers: rows built in code, a model changed after loading); the config still names them in
    the run's records.
    """
    training = config.training
    if config.eval.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'mnr[tensorboard]'")
    root = data_dir(config.data.data_dir)
    dev = dev_evaluators(config, root)
    best_metric(config, dev)  # a metric the dev set does not have fails now
    data = training_data(config, root, data)
    mined = minable(config, data)
    column_prompt_names(config, data, mined)  # every prompt has a column (mining's negatives too)
    corpora = {k: mining.mining_corpus(config.mining.corpus, root, data.parts[k].data,
                                       list(data.parts[k].dataset.specs)) for k in mined}
    rank, world_size = distributed.world()
    batches_of_epoch(data, config, 0, rank, world_size)  # fails early, before the model loads, if no full batch

    device = resolve_device(training.device) if world_size == 1 else distributed.local_device()
    bf16, why = choose_bf16(training.bf16, device)
    torch.manual_seed(training.seed)  # the loss's own initialisation (the softmax classifier)
    if encoder is None:
        encoder = SentenceEncoder.load(config.model.model, pooling=config.model.pooling or None,
                                       max_seq_length=config.model.max_seq_length, layout=config.model.layout,
                                       device=device)
    encoder.to(device)
    use_prompts(config, encoder)
    matryoshka_dims(config, encoder.dim)  # before mining's minutes
    guide_model = load_guide(config.guide, device)  # likewise: a guide that does not load fails now
    mining_record, rows = {}, [(part.dataset, part.data) for part in data.parts]
    for k in mined:  # a dataset's negatives from its own corpus (--mine-corpus: one for all)
        part = data.parts[k]
        mined_rows, mining_record[part.name] = mine_negatives(config, part.data, corpora[k], encoder, dev, bf16,
                                                              progress, part.name)
        rows[k] = (part.dataset, mined_rows)
    if mined:
        data = Mixture.of(rows, mined=[data.parts[k].name for k in mined])
        mining_record = mining_record.get("", {"datasets": mining_record})  # a run of one unnamed dataset: its own
    guide = Guide.embed(guide_model, config.guide, data, device, bf16, world_size, progress) if guide_model else None
    del guide_model  # its embeddings are all a run needs of it
    total_steps = count_steps(data, config, rank, world_size)  # of the rows trained on (mined ones, if mining)
    tasks = [task_of(config, encoder, part.dataset.loss, names, world_size) for part, names in
             zip(data.parts, column_prompt_names(config, data), strict=True)]
    objective = tasks[0].objective if len(tasks) == 1 else torch.nn.ModuleDict(
        {str(k): task.objective for k, task in enumerate(tasks)})
    train_encoder = trainable(encoder, world_size)
    # Re-tokenising every batch costs as much as a small model's forward on CPU: do it once.
    texts = list(dict.fromkeys(prompt + t for part, task in zip(data.parts, tasks, strict=True)
                               for row in part.data.rows for prompt, t in zip(task.prompts, row, strict=True)))
    ids, cut = encoder.tokenize_and_count(texts)
    token_ids = dict(zip(texts, ids, strict=True))
    layout = training_layout(config, encoder, data, tasks, token_ids, bf16, world_size)
    if rank == 0:
        log.info("device: %s; %s (%s)", device, "bf16 autocast" if bf16 else "fp32", why)
        log.info("layout: %s", layout.describe())
        for part in data.parts:
            log.info("training data%s: %s rows of %s from %s", f" {part.name!r}" if part.name else "",
                     f"{len(part.data):,}", ", ".join(part.data.columns),
                     ", ".join(f"{name} ({rows:,})" for name, rows in part.data.sources.items()))
        if cut:
            log.info("%s of %s distinct texts are longer than --max-seq-length %d tokens and were cut to it",
                     f"{cut:,}", f"{len(texts):,}", encoder.max_seq_length)
    return Setup(data, dev, encoder, objective, tasks, train_encoder, token_ids, device, bf16, total_steps, rank,
                 world_size, layout, mining_record, guide)


def training_data(config: TrainConfig, root: Path | None, data: TrainingSet | None) -> Mixture:
    """The rows of each dataset the config names (or ``data``, the run's one dataset), sampled as it says, in the
    form its loss trains on."""
    datasets = config.datasets()
    if data is not None:  # rows built in code
        if len(datasets) > 1:
            raise ConfigError("training rows given in code make the run's one dataset; the config names "
                              f"{len(datasets)} ({', '.join(d.name for d in datasets)})")
        loaded = [(datasets[0] if datasets else Dataset("", (), **config.dataset_defaults()), data)]
    else:
        if not datasets:
            raise ConfigError("--data: no training files given")
        loaded = [(d, load_dataset(d, root, config.data.strict_qrels)) for d in datasets]
    loaded = [(d, rows.sample(d.max_examples, config.training.seed)) for d, rows in loaded]
    mixture = Mixture.of(loaded)
    check_mining(config, mixture)
    return mixture


def check_mining(config: TrainConfig, data: Mixture) -> None:
    """What a table's ``mine`` asks fits the run, the dataset's loss and its rows, and --mine-negatives has a dataset
    to mine (all checked here, on the loaded rows, not in the config: a config file may leave mining to a flag)."""
    columns = data.parts[0].data.columns
    if config.mining and len(data.parts) == 1 and len(columns) != 2:
        raise ConfigError(f"--mine-negatives: the training rows already have negatives ({', '.join(columns)}); "
                          "mine for (anchor, positive) pairs")
    for part in data.parts:
        table = config.dataset_tables.get(part.name)
        if table and table.mine and not config.mining:
            raise ConfigError(f"[datasets.{part.name}] mine = true: mining is the run's --mine-negatives N (the "
                              "number of negatives per row); give it, or leave mine out")
        if table and table.mine and LOSSES[part.dataset.loss].input != RANKING:
            raise ConfigError(f"[datasets.{part.name}] mine = true: --loss {part.dataset.loss} trains on labelled "
                              "pairs, not ranked candidates; nothing to mine for")
        if table and table.mine and len(part.data.columns) != 2:
            raise ConfigError(f"[datasets.{part.name}] mine = true: its rows already have negatives "
                              f"({', '.join(part.data.columns)}); mining is for (anchor, positive) pairs")
    if config.mining and not minable(config, data):
        raise ConfigError("--mine-negatives: no dataset to mine, of (anchor, positive) pairs with a ranking loss and "
                          "not mine = false: " + "; ".join(
                              f"{p.name} has ({', '.join(p.data.columns)}) for --loss {p.dataset.loss}"
                              + ("" if p.dataset.mine else ", mine = false") for p in data.parts))


def minable(config: TrainConfig, data: Mixture) -> list[int]:
    """The datasets --mine-negatives mines (their index): those of (anchor, positive) pairs whose loss ranks
    in-batch candidates, unless their table says ``mine = false``; the others (rows with negatives, a classifier's
    labelled pairs) train as they are."""
    if not config.mining:
        return []
    return [k for k, part in enumerate(data.parts)
            if part.dataset.mine and len(part.data.columns) == 2 and LOSSES[part.dataset.loss].input == RANKING]


def load_dataset(dataset: Dataset, root: Path | None, strict_qrels: bool) -> TrainingSet:
    """One dataset's rows, in the form its loss trains on; an error names the dataset where it has a name."""
    try:
        return load_training_set(list(dataset.specs), root=root, wants=LOSSES[dataset.loss].input,
                                 hard_negatives=dataset.hard_negatives, column_map=parse_column_map(dataset.columns),
                                 strict_qrels=strict_qrels)
    except (DataError, ConfigError) as e:
        if not dataset.name:
            raise
        raise type(e)(f"dataset {dataset.name!r} (--loss {dataset.loss}): {e}") from None


def column_prompt_names(config: TrainConfig, data: Mixture, mined: list[int] = ()) -> list[list[str]]:
    """Per dataset, the prompt name of each column ("" for none; ``mined``: the datasets mining will give a negative
    column); every prompt of --prompts goes before a column of some dataset."""
    columns = [p.data.columns + (("negative",) if k in mined else ()) for k, p in enumerate(data.parts)]
    if len(data.parts) == 1:
        return [config.prompts.names(columns[0], data.parts[0].dataset.prompt_columns)]
    names = [config.prompts.names(c, p.dataset.prompt_columns, check=False) for c, p in
             zip(columns, data.parts, strict=True)]
    unused = [name for name in config.prompts.prompts if not any(name in n for n in names)]
    if unused:
        raise ConfigError(f"--prompts: no column of any dataset gets {', '.join(map(repr, unused))}; say which with "
                          "--prompt-columns COLUMN=NAME (or prompt_columns in a dataset's table)")
    return names


def task_of(config: TrainConfig, encoder: SentenceEncoder, loss: str, prompt_names: list[str],
            world_size: int) -> Task:
    """A dataset's loss (on ``encoder``'s device) and its columns' prompts."""
    objective = objective_of(config, loss, encoder.dim, world_size).to(encoder.device)
    prompts, prompt_lengths = column_prompts(encoder, prompt_names)
    return Task(objective, wrap_objective(objective, encoder.device, world_size), prompts, prompt_lengths)


def objective_of(config: TrainConfig, loss: str, dim: int, world_size: int) -> torch.nn.Module:
    """The loss ``loss`` (the run's own settings if it is the run's --loss, else its defaults), for embeddings of
    ``dim`` values; with --matryoshka-dims, on each prefix too."""
    kind = LOSSES[loss]
    objective = kind.from_settings(config.loss if loss == config.training.loss else kind.Settings(), dim, world_size)
    dims = matryoshka_dims(config, dim)
    return Matryoshka(objective, dims, config.matryoshka.matryoshka_weights) if dims else objective


def matryoshka_dims(config: TrainConfig, dim: int) -> list[int]:
    """--matryoshka-dims, checked against the model's dimension ``dim``."""
    dims = config.matryoshka.matryoshka_dims
    if dims and dims[0] > dim:
        raise ConfigError(f"--matryoshka-dims: {dims[0]} is above the model's dimension, {dim}")
    return dims


def trainable(encoder: SentenceEncoder, world_size: int) -> torch.nn.Module:
    """The encoder as a step calls it: made ready to train, and wrapped in DistributedDataParallel with several
    processes (gradients averaged; weights broadcast from rank 0)."""
    # BERT-like models carry a pooler head (a dense layer on [CLS]) that sentence embeddings never
    # use: frozen, it gets no update, and DistributedDataParallel accepts it (no gradient ever).
    if getattr(encoder.transformer, "pooler", None) is not None:
        encoder.transformer.pooler.requires_grad_(False)
    use_fast_dropout(encoder.transformer)  # cheap dropout masks on CPU (torch's own elsewhere)
    if world_size == 1:
        return encoder
    device = encoder.device
    return DistributedDataParallel(encoder, device_ids=[device.index] if device.type == "cuda" else None)


def wrap_objective(objective: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """A loss with parameters of its own (the softmax classifier), wrapped in DistributedDataParallel with several
    processes; any other as it is."""
    if world_size == 1 or not any(p.requires_grad for p in objective.parameters()):
        return objective
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)


def training_layout(config: TrainConfig, encoder: SentenceEncoder, data: Mixture, tasks: list[Task], token_ids: dict,
                    bf16: bool, world_size: int) -> layouts.Choice:
    """How the training forward is laid out (``mnr.layout``): as --layout says, or with auto on CUDA the fastest
    forward and backward of the run's first batches that agrees with padded (one process: several processes
    would have to agree, so they keep the device's default)."""
    if encoder.layout != "auto":
        return layouts.Choice(encoder.layout, f"as asked (--layout {config.model.layout})"
                              if config.model.layout != "auto" else "the only layout this model has")
    default = layouts.default(encoder.device, encoder.packable)
    if not layouts.measures(encoder.device, encoder.packable) or world_size > 1:
        why = ("with several processes: the device's default, unmeasured" if world_size > 1 else
               "on a CPU: the fastest in bench/speed.py, and one fixed choice keeps runs bitwise reproducible")
        choice = layouts.Choice(default, f"auto: {why}")
        encoder.chosen["train"] = choice
        return choice
    texts = [batch_token_ids(data.parts[k].data, tasks[k].prompts, token_ids, rows)
             for k, rows in map(data.part_of, batches_of_epoch(data, config, 0)[: layouts.MEASURED_BATCHES])]
    chunk = config.training.mini_batch_size
    if chunk:  # gradient caching runs the encoder on chunks: measure chunks, never a whole batch
        texts = [ids[i : i + chunk] for ids in texts for i in range(0, len(ids), chunk)][: layouts.MEASURED_BATCHES]
    return encoder.choose_layout("train", texts, bf16)


def batch_token_ids(data: TrainingSet, prompts: list[str], token_ids: dict, rows: list[int]) -> list[list[int]]:
    """The token ids of the texts of ``rows`` (of one dataset, ``data``), every column in turn (column-major), each
    with its column's prompt."""
    return [token_ids[prompts[c] + data.rows[i][c]] for c in range(len(data.columns)) for i in rows]


def use_prompts(config: TrainConfig, encoder: SentenceEncoder) -> None:
    """The run's prompts become the model's (saved with it); a base model's own prompts that the run does not
    train with are not kept: the model would be used with prompts it was not trained with."""
    settings = config.prompts
    own = {name: text for name, text in encoder.prompts.items() if text}  # sentence-transformers saves empty ones
    if own and own != {name: text for name, text in saved(settings.prompts).items() if text}:
        log.warning("the base model's prompts (%s) are not this run's%s: it trains %s and saves %s",
                    ", ".join(f"{k}={v!r}" for k, v in own.items()),
                    "" if settings.prompts else " (--prompts)", "with --prompts" if settings.prompts else
                    "on the texts as they are", "the run's" if settings.prompts else "no prompts")
    encoder.prompts, encoder.include_prompt = dict(settings.prompts), settings.include_prompt
    if encoder.default_prompt_name not in encoder.prompts:
        encoder.default_prompt_name = None


def column_prompts(encoder: SentenceEncoder, names: list[str]) -> tuple[list[str], list[int] | None]:
    """The prompt before each column's texts ("" for none; ``names``: each column's prompt name) and, with
    --no-include-prompt, how many first tokens of each column's texts pooling leaves out (None: every token
    counts)."""
    prompts = [encoder.prompt(name) for name in names]
    if encoder.include_prompt or not any(prompts):
        return prompts, None
    return prompts, [encoder.prompt_length(p) if p else 0 for p in prompts]


def mine_negatives(config: TrainConfig, data: TrainingSet, corpus: list[str], encoder: SentenceEncoder,
                   dev: list[Evaluator], bf16: bool, progress: bool, name: str = "") -> tuple[TrainingSet, dict]:
    """--mine-negatives: each (anchor, positive) row with the negatives the base model (or --mine-model) ranks best
    in ``corpus``, and what mining kept and left out. Mining is deterministic on a device, so a resumed run mines
    the same rows (its checkpoint checks that). The base model's embeddings of a retrieval dev set's corpus are
    handed to its evaluator: the score before the first step need not encode them again."""
    settings = config.mining
    miner = SentenceEncoder.load(settings.model, layout=config.model.layout, device=encoder.device) \
        if settings.model else encoder  # e.g. a first run's best/: a second round of mining, with its own settings
    log.info("mining %d negatives for %s rows%s from %s passages with %s", settings.num_negatives, f"{len(data):,}",
             f" of {name!r}" if name else "", f"{len(corpus):,}", settings.model or "the base model")
    candidates = mining.rank(miner, [(a, p) for a, p in data.rows], corpus, settings.range_max, bf16=bf16,
                             progress=progress,  # another model (--mine-model) with its own prompts, if any
                             prompts=PromptChoice.of_run(config.prompts) if miner is encoder else MODELS_OWN)
    mined = mining.select(candidates, settings)
    if not mined.rows:
        raise DataError(f"--mine-negatives: no row{f' of {name!r}' if name else ''} found {settings.num_negatives} "
                        "negatives that pass the filters; "
                        "lower --mine-negatives or --mine-relative-margin, or raise --mine-range-max")
    log.info("mined: %s", mined.summary())
    if miner is encoder:  # the step-0 evaluation scores the base model: it reuses the corpus mining embedded
        for e in dev:
            if isinstance(e, RetrievalEvaluator) and (known := candidates.embeddings_of(e.data.passages)) is not None:
                e.reuse(known)
    record = {"model": settings.model or config.model.model, "rows": len(data), "kept": len(mined.rows),
              "left_out": mined.short, "candidates_removed": mined.skipped,
              "positive_mean": round(mined.positive_mean, 4), "negative_mean": round(mined.negative_mean, 4)}
    return TrainingSet(("anchor", "positive") + ("negative",) * settings.num_negatives, mined.rows,
                       data.sources_of(mined.kept)), record


def mined_file(name: str) -> str:
    """The file of a dataset's mined rows in the run's directory: mined.jsonl, or mined-NAME.jsonl where named."""
    return f"mined-{name}.jsonl" if name else MINED_FILE


def dev_evaluators(config: TrainConfig, root: Path | None) -> list[Evaluator]:
    """The dev sets the config names, loaded (and checked) now; the one best/ is chosen by first."""
    dev = evaluators(config.eval.dev_sets(), root, flags={"sts": "--sts-dev", RETRIEVAL: "--ir-dev"},
                     default_split="dev", strict_qrels=config.data.strict_qrels,
                     ignore_identical_ids=config.eval.ignore_identical_ids, dims=config.matryoshka.matryoshka_dims,
                     prompts=PromptChoice.of_run(config.prompts))
    chosen = config.eval.best()[0]
    return sorted(dev, key=lambda e: e.name != chosen) if chosen else dev


def best_metric(config: TrainConfig, dev: list[Evaluator]) -> tuple[str, str] | None:
    """(dev set, metric) that best/ is chosen by: --best-metric, else the first dev set's headline metric."""
    if not dev:
        return None
    metric = config.eval.best()[1] or dev[0].primary
    if metric not in dev[0].metrics:
        raise ConfigError(f"--best-metric: {dev[0].name} has no metric {metric!r} "
                          f"(it has: {', '.join(dev[0].metrics)})")
    return dev[0].name, metric


def batches_of_epoch(data: Mixture | TrainingSet, config: TrainConfig, epoch: int, rank: int = 0,
                     world_size: int = 1) -> list[list[int]]:
    """This process's batches of one epoch: each dataset's own (``mnr.batching.process_batches``), interleaved as
    --dataset-sampling says with several (``mnr.mixture``); ``data``: the run's datasets, or rows of its one."""
    if isinstance(data, TrainingSet):
        data = Mixture.of([(Dataset("", (), **config.dataset_defaults()), data)])
    return data.batches(config.data.dataset_sampling, config.training.seed, epoch,
                        [LOSSES[p.dataset.loss].in_batch_negatives for p in data.parts], rank, world_size)


def count_steps(data: Mixture, config: TrainConfig, rank: int = 0, world_size: int = 1) -> int:
    """Steps of the whole run: each epoch's batches counted, since duplicate-free batching can leave rows
    with every batch left wait for one of their own, so one epoch can have a batch more than another."""
    return sum(len(batches_of_epoch(data, config, epoch, rank, world_size)) for epoch in range(config.training.epochs))


def decided_when_it_began(config: TrainConfig, run: RunDir) -> TrainConfig:
    """A resumed run's layout and precision, where auto measured them when the run began (config.toml has what
    was chosen): measured again they could come out otherwise, and the run would not go on bitwise."""
    layout = run.recorded_setting("layout") if config.model.layout == "auto" else None
    bf16 = run.recorded_setting("bf16") if config.training.bf16 is None else None
    return config.replace(**({"layout": layout} if layout in layouts.LAYOUTS else {}),
                          **({"bf16": bf16} if isinstance(bf16, bool) else {}))


class Run:
    """A run while it trains: everything prepared, its directory started (or restored from its latest checkpoint),
    and what the loop asks of it at each event: log the losses, evaluate, write a checkpoint, stop, finish."""

    def __init__(self, config: TrainConfig, optimizer: Callable[[Setup, TrainConfig], torch.optim.Optimizer], *,
                 data: TrainingSet | None = None, encoder: SentenceEncoder | None = None, progress: bool = True):
        self.dir = RunDir.for_config(config)  # refuses to mix runs in a directory; touches nothing
        if config.run.resume:
            config = decided_when_it_began(config, self.dir)
        # Loading, mining and evaluating take minutes, and a checkpoint cannot keep half of them: a stop
        # during them acts at once (one process only: several must stop together, at a step's end).
        self.stop = StopSignals(at_once=distributed.world()[1] == 1)
        try:
            with StopSignals(at_once=self.stop.allowed) as stop, stop.at_once():
                s = prepare(config, data=data, encoder=encoder, progress=progress)
        except StopNow as e:
            raise Stopped(f"stopped by {signal.Signals(e.signal).name} before the first step (while loading and "
                          "mining); nothing was trained", e.signal) from None
        self.config = config.replace(bf16=s.bf16, layout=s.layout.layout)  # what ran: config.toml, checkpoints, cards
        self.setup, self.progress, self.main = s, progress, s.rank == 0
        self.optimizer = optimizer(s, self.config)
        self.fingerprint = rundir.fingerprint(s.data, self.config, s.world_size)
        self.stateful = {"encoder": s.encoder, "loss": s.objective, "optimizer": self.optimizer}
        self.position = self._restore_or_seed()
        if self.main:
            self.dir.start(self.config, self.position.step)
            for part in s.data.parts:  # what was trained on, to read (or to train on again without mining)
                if part.mined:
                    write_rows(self.dir.path / mined_file(part.name), mining.columns(len(part.data.columns) - 2),
                               part.data.rows)
            if s.mining and self.position.step == 0:
                self.dir.record({"step": 0, "mining": s.mining})
        self.best = best_metric(self.config, s.evaluators)
        self.facts = RunFacts(self.config, s.data, [type(t.objective).__name__ for t in s.tasks], s.encoder.pooling,
                              s.encoder.dim,
                              s.encoder.max_seq_length, s.encoder.normalize, s.world_size, s.total_steps,
                              data_dir(self.config.data.data_dir), read_license(s.encoder.source),
                              evaluations=rundir.evaluations(self.dir.read_log()) if self.main else [],
                              best=self.best, hardware=hardware(s.device), layout=s.layout.describe())
        self.recent: list[float] = []  # the last losses, for the progress bar
        self.bar = tqdm(total=s.total_steps, initial=self.position.step, desc="train", unit="step",
                        disable=not (progress and self.main), dynamic_ncols=True)

    def _restore_or_seed(self) -> Position:
        if self.config.run.resume and self.dir.latest_checkpoint() is not None:
            return self.dir.restore(self.fingerprint, self.stateful, self.setup.rank)
        if self.config.run.resume and self.main:
            log.warning("--resume: %s has no complete checkpoint yet; starting from the beginning", self.dir.path)
        seed = self.config.training.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed + self.setup.rank)  # dropout: each process draws its own masks
        return Position()

    def log_losses(self, losses: list[tuple[int, int, list[int], torch.Tensor, float]]) -> None:
        """Log (step, epoch, batch, loss, lr) of the steps since the last read (with several datasets, each step's
        dataset; with --guide, the share of candidates it left out); stop at the first loss that is not finite
        (before anything is evaluated or saved: a bad step is never kept)."""
        s = self.setup
        guided = s.guide.read() if s.guide else [None] * len(losses)  # per step: None where the guide had no say
        read = torch.stack([loss for *_, loss, _ in losses] + [g for g in guided if g is not None]).tolist()
        values, left_out = read[: len(losses)], iter(read[len(losses):])  # one wait for the device, above
        for (step, epoch, batch, _, lr), value, guide in zip(losses, values, guided, strict=True):
            if not math.isfinite(value):
                last = self.dir.latest_checkpoint(quiet=True)
                raise TrainingError(f"step {step}: the loss is not finite; lower --lr or check the data. "
                                    f"The last good checkpoint is {last or 'none (no checkpoint written yet)'}")
            entry = {"step": step, "epoch": epoch, "loss": value, "lr": lr}
            if len(s.data.parts) > 1:
                entry["dataset"] = s.data.parts[s.data.part_of(batch)[0]].name
            if guide is not None:
                entry["guide_left_out"] = next(left_out)
            if self.main:
                self.dir.record(entry)
        self.recent = (self.recent + values)[-50:]
        self.bar.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.4f}",
                             rows_per_s=f"{self.position.rows / self.position.train_seconds:.1f}", refresh=False)

    def stop_asked(self) -> bool:
        """Whether any process was asked to stop (all stop at the same step)."""
        return distributed.any_process(self.stop.signal is not None, self.setup.device)

    def evaluated(self, step: int) -> bool:
        return any(e["step"] == step for e in self.facts.evaluations)

    def evaluate(self, step: int) -> int | None:
        """Score every dev set, log it, keep best/; return the stop signal that cut the scoring short (it can
        take minutes, so a stop acts at once: nothing of it is logged), else None."""
        s = self.setup
        if not s.evaluators or not self.main:
            return None
        if step == 0:
            tqdm.write(f"evaluating the base model on {', '.join(e.name for e in s.evaluators)} before training")
        try:
            with self.stop.at_once():
                results = {e.name: e(s.encoder, bf16=s.bf16, progress=self.progress) for e in s.evaluators}
        except StopNow as e:
            return e.signal
        self.dir.record({"step": step, **results})
        self.facts.evaluations.append({"step": step, **results})
        tqdm.write(f"step {step}: " + "; ".join(f"{name} " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
                                                for name, scores in results.items()))
        score = results[self.best[0]][self.best[1]]
        if self.position.best_score is None or score > self.position.best_score:
            self.position.best_score, self.position.best_step = score, step
            self.save_model("best", step)
        return None

    def evaluate_due(self) -> None:
        """Before the loop: the base model's score before training; on resume, an evaluation a stop cut short."""
        step, eval_steps = self.position.step, self.config.eval.eval_steps
        if step:  # mining's embeddings of a dev corpus are the base model's: a resumed model embeds it anew
            self._forget_reused()
        due = step == 0 or step % eval_steps == 0 or step == self.setup.total_steps
        if due and not self.evaluated(step) and (number := self.evaluate(step)) is not None:
            raise self.stopped(number, f"while evaluating step {step}", self.dir.latest_checkpoint(quiet=True))
        self._forget_reused()  # only the base model's: free them

    def _forget_reused(self) -> None:
        for e in self.setup.evaluators:
            if isinstance(e, RetrievalEvaluator):
                e.reused = None

    def evaluate_last(self) -> None:
        self.bar.close()
        total = self.setup.total_steps
        if not self.evaluated(total) and (number := self.evaluate(total)) is not None:
            raise self.stopped(number, f"while evaluating the last step ({total})", self.save_checkpoint())

    def save_model(self, name: str, step: int) -> None:
        self.facts.step, self.facts.train_seconds = step, self.position.train_seconds
        self.facts.rows = self.position.rows
        self.dir.save_model(self.setup.encoder, name, {"mnr_config.toml": self.config.to_toml(),
                                                       "README.md": model_card(self.facts, self.dir.path / name, name)})

    def save_checkpoint(self) -> Path | None:
        rngs = distributed.gather_objects(rundir.rng_states())
        if not self.main:
            return None
        payload = rundir.checkpoint_payload(self.position, self.fingerprint, self.stateful, rngs)
        return self.dir.save_checkpoint(payload, keep=self.config.run.keep_checkpoints)

    def stopped(self, number: int, where: str, path: Path | None) -> Stopped:
        self.bar.close()
        saved = f"checkpoint {path} saved" if path else "no checkpoint yet"
        return Stopped(f"stopped by {signal.Signals(number).name} {where}; {saved}", number)

    def finish(self) -> TrainResult:
        """After the last step: a last checkpoint, final/, best/'s card with every evaluation, the summary, the
        curves."""
        config, position, total = self.config, self.position, self.setup.total_steps
        if config.run.save_every:
            self.save_checkpoint()
        summary = {}
        if self.main:
            self.save_model("final", total)
            if position.best_step is not None:  # its card, now with every evaluation of the run
                self.facts.step = position.best_step
                self.dir.write_text("best/README.md", model_card(self.facts, self.dir.path / "best", "best"))
            summary = run_summary(self.dir, config, position, self.best, self.facts)
            self.dir.record({"step": total, "done": True, "train_seconds": position.train_seconds,
                             "rows": position.rows, "summary": summary})
            plot_runs([self.dir.path], self.dir.path / "curves.png")
            self.dir.close()
        best = self.dir.path / "best" if position.best_score is not None else None
        return TrainResult(self.dir.path / "final", best, position.best_score,
                           " ".join(self.best) if self.best else None, position.train_seconds, total, position.rows,
                           summary)


def run_summary(run: RunDir, config: TrainConfig, position: Position, best: tuple[str, str] | None,
                facts: RunFacts) -> dict:
    """Where the models are, how good the best is against the base model, how long it took, what to run next."""
    summary = {"final": str(run.path / "final"), "curves": str(run.path / "curves.png"), "layout": facts.layout,
               "train_seconds": round(position.train_seconds, 1), "rows": position.rows,
               "rows_per_s": round(position.rows / max(position.train_seconds, 1e-9), 1)}
    if best is not None and position.best_step is not None:
        base = facts.evaluations[0] if facts.evaluations and facts.evaluations[0]["step"] == 0 else None
        summary |= {"best": str(run.path / "best"), "best_metric": " ".join(best),
                    "best_score": round(position.best_score, 2), "best_step": position.best_step,
                    "base_score": round(base[best[0]][best[1]], 2) if base else None}
    log_entries = run.read_log()
    if len(facts.data.parts) > 1:  # each dataset's rows, steps and last losses (the mean of its last 50 steps)
        summary["datasets"] = {}
        for part in facts.data.parts:
            losses = [e["loss"] for e in log_entries if "loss" in e and e.get("dataset") == part.name]
            summary["datasets"][part.name] = {"rows": len(part.data), "steps": len(losses),
                                              "loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 4)}
    if config.guide.guide:  # the mean, over the steps, of the share of each anchor's candidates the guide left out
        left_out = [e["guide_left_out"] for e in log_entries if "guide_left_out" in e]
        summary["guide_left_out"] = round(sum(left_out) / max(1, len(left_out)), 4)
        if summary["guide_left_out"] > 0.5:
            log.warning("the guide left out %.0f%% of the in-batch candidates: the loss learns little from so few; "
                        "lower --guide-margin", 100 * summary["guide_left_out"])
    models = [config.model.model, summary["final"]] + ([summary["best"]] if "best" in summary else [])
    # the dev sets' own files, for a table of every model on them (retrieval: the folders' test split)
    sts_dev, ir_dev = config.eval.sts_dev, config.eval.ir_dev
    sets = (["--sts", *sts_dev] if sts_dev else []) + \
        (["--retrieval", *dict.fromkeys(split_spec(spec)[0] for spec in ir_dev)] if ir_dev else [])
    data = ["--data-dir", str(facts.data_dir)] if sets and facts.data_dir else []
    summary["next"] = shlex.join(["mnr", "eval", *models, *(sets or ["--sts", "YOUR_STS_FILE"]), *data])
    return summary
