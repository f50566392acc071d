"""The training loop: setup, then one loop of LR -> forward/backward -> clip/step -> log -> eval/checkpoint.

``prepare`` loads and checks everything (data, model, loss, dev sets) before anything is written;
``train`` is the loop. What goes to disk, and how a stopped run resumes, is ``mnr.rundir``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import random
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mnr import cache, distributed, rundir
from mnr import layout as layouts
from mnr import mine as mining
from mnr.batching import epoch_batches
from mnr.card import RunFacts, hardware, model_card, read_license
from mnr.config import TrainConfig
from mnr.data import (
    TrainingSet,
    data_dir,
    is_retrieval_spec,
    load_sts,
    load_training_set,
    parse_column_map,
    resolve_path,
    split_spec,
    write_rows,
)
from mnr.device import choose_bf16, resolve_device
from mnr.dropout import use_fast_dropout
from mnr.errors import ConfigError, DataError, Stopped, TrainingError
from mnr.evaluate import Evaluator, STSEvaluator
from mnr.losses import LOSSES, Loss
from mnr.losses import build as build_loss
from mnr.mine import MiningSettings, columns, mining_corpus
from mnr.model import SentenceEncoder
from mnr.packing import to_device
from mnr.plot import plot_runs
from mnr.retrieval import RetrievalEvaluator, load_retrieval
from mnr.rundir import Position, RunDir

log = logging.getLogger(__name__)

MINED_FILE = "mined.jsonl"  # --mine-negatives: the rows trained on, in the run's directory


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
class Setup:
    """Everything loaded and checked before the output directory is touched."""

    data: TrainingSet
    evaluators: list[Evaluator]  # dev sets; best/ keeps the model with the best primary metric of the first
    encoder: SentenceEncoder  # the model being trained: evaluated and saved
    objective: Loss  # the loss module (with parameters of its own for the softmax classifier)
    train_encoder: torch.nn.Module  # what a step calls: the encoder, or its DistributedDataParallel wrapper
    train_objective: torch.nn.Module  # the objective, or its wrapper when it has parameters
    token_ids: dict[str, list[int]]  # every distinct text, tokenised once
    device: torch.device
    bf16: bool  # the encoder runs under bf16 autocast (config.bf16, or chosen for the device when unset)
    total_steps: int  # every epoch's batches counted (epochs can differ by a batch or two)
    rank: int
    world_size: int
    layout: layouts.Choice  # how the training forward is laid out, and why
    # dev set name -> its corpus as the base model embedded it while mining: the evaluation before the first
    # step uses these instead of encoding the corpus again (minutes on a CPU)
    base_passages: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    mining: dict = dataclasses.field(default_factory=dict)  # --mine-negatives: what mining kept and left out (logged)


def prepare(config: TrainConfig, *, data: TrainingSet | None = None,
            encoder: SentenceEncoder | None = None, progress: bool = True) -> Setup:
    """Load and validate data, model, loss and dev sets. Any bad input fails here, before anything is written.

    ``data`` and ``encoder`` replace the training set and model that ``config`` names (for Python
    callers: rows built in code, a model changed after loading); the config still names them in
    the run's records.
    """
    loss_class = LOSSES[config.loss]
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'mnr[tensorboard]'")
    root = data_dir(config.data_dir)
    evaluators = dev_evaluators(config, root)
    best_metric(config, evaluators)  # a metric the dev set does not have fails now
    if data is None:
        if not config.data:
            raise ConfigError("--data: no training files given")
        data = load_training_set([resolve_path(spec, root) for spec in config.data], wants=loss_class.input,
                                 hard_negatives=config.hard_negatives, column_map=parse_column_map(config.columns),
                                 strict_qrels=config.strict_qrels)
    data = data.sample(config.max_examples, config.seed)
    if config.mini_batch_size and not loss_class.cacheable:
        raise ConfigError(f"--mini-batch-size: --loss {config.loss} cannot be computed from cached embeddings")
    if config.mine_negatives and len(data.columns) != 2:
        raise ConfigError(f"--mine-negatives: the training rows already have negatives ({', '.join(data.columns)}); "
                          "mine for (anchor, positive) pairs")
    corpus = mining_corpus(config.mine_corpus, root, data, config.data) if config.mine_negatives else []
    rank, world_size = distributed.world()
    batches_of_epoch(data, config, 0, rank, world_size)  # fails early, before the model loads, if no full batch

    device = resolve_device(config.device) if world_size == 1 else distributed.local_device()
    bf16, why = choose_bf16(config.bf16, device)
    torch.manual_seed(config.seed)  # the loss's own initialisation (the softmax classifier)
    if encoder is None:
        encoder = SentenceEncoder.load(config.model, pooling=config.pooling or None,
                                       max_seq_length=config.max_seq_length, layout=config.layout, device=device)
    encoder.to(device)
    base_passages, mining_record = {}, {}
    if config.mine_negatives:
        miner = encoder
        if config.mine_model:  # e.g. a first run's best/: a second round of mining, with its own settings
            miner = SentenceEncoder.load(config.mine_model, layout=config.layout, device=device)
        rows_before = len(data)
        data, candidates, mined = mine_negatives(config, data, corpus, miner, bf16, progress)
        mining_record = {"model": config.mine_model or config.model, "rows": rows_before, "kept": len(mined.rows),
                         "left_out": mined.short, "candidates_removed": mined.skipped,
                         "positive_mean": round(mined.positive_mean, 4), "negative_mean": round(mined.negative_mean, 4)}
        if miner is encoder:  # the step-0 evaluation scores the base model: it reuses the corpus mining embedded
            base_passages = {e.name: emb for e in evaluators if isinstance(e, RetrievalEvaluator)
                             and (emb := candidates.embeddings_of(e.data.passages)) is not None}
        del candidates, miner
    total_steps = count_steps(data, config, rank, world_size)  # of the rows trained on (mined ones, if mining)
    # BERT-like models carry a pooler head (a dense layer on [CLS]) that sentence embeddings never
    # use: frozen, it gets no update, and DistributedDataParallel accepts it (no gradient ever).
    if getattr(encoder.transformer, "pooler", None) is not None:
        encoder.transformer.pooler.requires_grad_(False)
    use_fast_dropout(encoder.transformer)  # cheap dropout masks on CPU (torch's own elsewhere)
    objective = build_loss(config, encoder.dim, world_size).to(device)
    train_encoder, train_objective = encoder, objective
    if world_size > 1:  # gradients averaged across processes; weights broadcast from rank 0
        ids = [device.index] if device.type == "cuda" else None
        train_encoder = DistributedDataParallel(encoder, device_ids=ids)
        if any(p.requires_grad for p in objective.parameters()):
            train_objective = DistributedDataParallel(objective, device_ids=ids)
    # Re-tokenising every batch costs as much as a small model's forward on CPU: do it once.
    texts = list(dict.fromkeys(t for row in data.rows for t in row))
    ids, cut = encoder.tokenize_and_count(texts)
    token_ids = dict(zip(texts, ids, strict=True))
    layout = training_layout(config, encoder, data, token_ids, bf16, world_size)
    if rank == 0:
        log.info("device: %s; %s (%s)", device, "bf16 autocast" if bf16 else "fp32", why)
        log.info("layout: %s", layout.describe())
        log.info("training data: %s rows of %s from %s", f"{len(data):,}", ", ".join(data.columns),
                 ", ".join(f"{name} ({rows:,})" for name, rows in data.sources.items()))
        if cut:
            log.info("%s of %s distinct texts are longer than --max-seq-length %d tokens and were cut to it",
                     f"{cut:,}", f"{len(texts):,}", encoder.max_seq_length)
    return Setup(data, evaluators, encoder, objective, train_encoder, train_objective, token_ids, device, bf16,
                 total_steps, rank, world_size, layout, base_passages, mining_record)


def training_layout(config: TrainConfig, encoder: SentenceEncoder, data: TrainingSet, token_ids: dict,
                    bf16: bool, world_size: int) -> layouts.Choice:
    """How the training forward is laid out (``mnr.layout``): as --layout says, or with auto on CUDA the fastest
    forward and backward of the run's first batches that agrees with padded (one process: several processes
    would have to agree, so they keep the device's default)."""
    if encoder.layout != "auto":
        return layouts.Choice(encoder.layout, f"as asked (--layout {config.layout})" if config.layout != "auto"
                              else "the only layout this model has")
    default = layouts.default(encoder.device, encoder.packable)
    if not layouts.measures(encoder.device, encoder.packable) or world_size > 1:
        why = ("with several processes: the device's default, unmeasured" if world_size > 1 else
               "on a CPU: the fastest in bench/speed.py, and one fixed choice keeps runs bitwise reproducible")
        choice = layouts.Choice(default, f"auto: {why}")
        encoder.chosen["train"] = choice
        return choice
    texts = [[token_ids[data.rows[i][c]] for c in range(len(data.columns)) for i in batch]
             for batch in batches_of_epoch(data, config, 0)[: layouts.MEASURED_BATCHES]]
    if config.mini_batch_size:  # gradient caching runs the encoder on chunks: measure chunks, never a whole batch
        chunks = [ids[i : i + config.mini_batch_size] for ids in texts for i in range(0, len(ids),
                                                                                      config.mini_batch_size)]
        texts = chunks[: layouts.MEASURED_BATCHES]
    return encoder.choose_layout("train", texts, bf16)


def mine_negatives(config: TrainConfig, data: TrainingSet, corpus: list[str], encoder: SentenceEncoder, bf16: bool,
                   progress: bool) -> tuple[TrainingSet, mining.Candidates, mining.Mined]:
    """--mine-negatives: each (anchor, positive) row with the negatives ``encoder`` ranks best in ``corpus``,
    and the ranking (with the corpus embeddings). Mining is deterministic on a device, so a resumed run mines the
    same rows (its checkpoint checks that)."""
    settings = MiningSettings(config.mine_negatives, range_max=config.mine_range_max,
                              relative_margin=config.mine_relative_margin or None)
    log.info("mining %d negatives for %s rows from %s passages with %s", config.mine_negatives, f"{len(data):,}",
             f"{len(corpus):,}", config.mine_model or "the base model")
    candidates = mining.rank(encoder, [(a, p) for a, p in data.rows], corpus, settings.range_max, bf16=bf16,
                             progress=progress)
    mined = mining.select(candidates, settings)
    if not mined.rows:
        raise DataError(f"--mine-negatives: no row found {config.mine_negatives} negatives that pass the filters; "
                        "lower --mine-negatives or --mine-relative-margin, or raise --mine-range-max")
    log.info("mined: %s", mined.summary())
    return TrainingSet(("anchor", "positive") + ("negative",) * config.mine_negatives, mined.rows,
                       data.sources_of(mined.kept)), candidates, mined


def dev_evaluators(config: TrainConfig, root: Path | None) -> list[Evaluator]:
    """The dev sets the config names (``config.dev_sets()``), loaded (and checked) now; the one best/ is
    chosen by first."""
    evaluators: list[Evaluator] = []
    for name, (kind, spec) in config.dev_sets().items():
        if kind == "sts_dev":
            evaluators.append(STSEvaluator(load_sts(resolve_path(spec, root)), name=name))
            continue
        if not is_retrieval_spec(spec, root):
            raise ConfigError(f"--ir-dev {spec}: not a retrieval folder (DIR[:SPLIT][[START:STOP]])")
        data = load_retrieval(resolve_path(spec, root), default_split="dev", strict=config.strict_qrels)
        evaluators.append(RetrievalEvaluator(data, name=name, ignore_identical_ids=config.ignore_identical_ids))
    chosen = config.best_metric.partition(":")[0]
    return sorted(evaluators, key=lambda e: e.name != chosen) if chosen else evaluators


def best_metric(config: TrainConfig, evaluators: list[Evaluator]) -> tuple[str, str] | None:
    """(dev set, metric) that best/ is chosen by: --best-metric, else the first dev set's headline metric."""
    if not evaluators:
        return None
    metric = config.best_metric.partition(":")[2] or evaluators[0].primary
    if metric not in evaluators[0].metrics:
        raise ConfigError(f"--best-metric: {evaluators[0].name} has no metric {metric!r} "
                          f"(it has: {', '.join(evaluators[0].metrics)})")
    return evaluators[0].name, metric


def batches_of_epoch(data: TrainingSet, config: TrainConfig, epoch: int, rank: int = 0,
                     world_size: int = 1) -> list[list[int]]:
    """This process's batches of one epoch.

    With several processes, each global batch (``batch_size`` x processes rows, duplicate-free
    as a whole) is cut into one slice per process; a last global batch too small to give every
    process a full slice is dropped, since the processes gather equal-sized tensors.
    """
    size = config.batch_size * world_size
    batches = epoch_batches(data, size, config.seed, epoch, duplicate_free=LOSSES[config.loss].in_batch_negatives)
    if world_size == 1:
        return batches
    return [b[rank * config.batch_size : (rank + 1) * config.batch_size] for b in batches if len(b) == size]


def count_steps(data: TrainingSet, config: TrainConfig, rank: int = 0, world_size: int = 1) -> int:
    """The run's optimizer steps, for the learning-rate schedule. Every epoch is counted: rows that clash
    with every batch left wait for one of their own, so one epoch can have a batch more than another."""
    return sum(len(batches_of_epoch(data, config, epoch, rank, world_size)) for epoch in range(config.epochs))


def forward_backward(s: Setup, batch: list[int], config: TrainConfig) -> torch.Tensor:
    """Loss of the rows ``batch`` and its gradients (averaged over processes); returns the loss, the
    mean over processes, as a 0-dim tensor on the device (reading it waits for the GPU)."""
    data = s.data
    # every column in one forward pass (bigger matrix products), column-major: (C·B, D) -> C x (B, D)
    ids = [s.token_ids[data.rows[i][c]] for c in range(len(data.columns)) for i in batch]
    labels = (to_device(torch.tensor([data.labels[i] for i in batch]), s.device) if data.labels is not None
              else None)

    def autocast():
        return torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16)

    if config.mini_batch_size:  # embeddings without activations; the encoder's backward comes after the loss's
        embeddings, replay = cache.embed_without_graph(s.train_encoder, ids, config.mini_batch_size, autocast,
                                                       s.device)
    else:
        with autocast():
            embeddings = s.train_encoder(ids)
    loss = s.train_objective(list(embeddings.split(len(batch))), labels)  # fp32 (pooling returns fp32)
    loss.backward()
    if config.mini_batch_size:
        cache.replay_with_gradients(s.train_encoder, replay, embeddings.grad, autocast)
    return distributed.mean(loss.detach())


def train_step(s: Setup, optimizer: torch.optim.Optimizer, batch: list[int], config: TrainConfig) -> torch.Tensor:
    """One optimizer step on the rows ``batch``; returns the loss (a 0-dim tensor on the device).

    A step whose loss is not finite changes nothing: its gradients are dropped. The fused
    optimizer learns that on the device (``found_inf``, as under a gradient scaler), so the CPU
    never waits for the GPU here; the loop reports the bad step when it next reads the losses.
    """
    loss = forward_backward(s, batch, config)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(loss)).float()
        optimizer.step()
    elif torch.isfinite(loss):  # other optimizers: decide on the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(s: Setup, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per parameter instead of a dozen elementwise passes (the foreach
    version spent a quarter of a CPU step updating MiniLM's 12M-entry embedding matrix)."""
    return torch.optim.AdamW(param_groups([s.encoder, s.objective], config.weight_decay), lr=config.lr, fused=True)


def param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """Decay weight matrices only: decaying biases and LayerNorm gains just shrinks them toward 0
    with no regularising benefit (Loshchilov & Hutter; BERT's own recipe)."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name
             or param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to the peak over ``warmup_steps``, then linear decay to 0; never a 0-lr step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (total_steps - step) / max(1, total_steps - warmup_steps)


def train(config: TrainConfig, *, data: TrainingSet | None = None, encoder: SentenceEncoder | None = None,
          progress: bool = True) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data``; write final/, best/ and checkpoints/ under ``config.output``.

    ``data`` and ``encoder``: see ``prepare``.
    """
    run = RunDir.for_config(config)
    recorded = run.recorded_setting("layout") if config.resume and config.layout == "auto" else None
    if recorded in layouts.LAYOUTS:  # measured when the run began: the same layout keeps resume bitwise
        config = dataclasses.replace(config, layout=recorded)
    # Loading, mining and evaluating take minutes, and a checkpoint cannot keep half of them: a stop
    # during them acts at once (one process only: several must stop together, at a step's end).
    alone = distributed.world()[1] == 1
    try:
        with _StopSignals(at_once=alone) as stop, stop.at_once():
            s = prepare(config, data=data, encoder=encoder, progress=progress)
    except _StopNow as e:
        raise Stopped(f"stopped by {signal.Signals(e.signal).name} before the first step (while loading and mining); "
                      "nothing was trained", e.signal) from None
    # what ran: in config.toml, checkpoints and model cards
    config = dataclasses.replace(config, bf16=s.bf16, layout=s.layout.layout)
    main = s.rank == 0
    optimizer = make_optimizer(s, config)
    total_steps = s.total_steps
    warmup_steps = math.ceil(total_steps * config.warmup_ratio)
    fingerprint = rundir.fingerprint(s.data, config, s.world_size)
    stateful = {"encoder": s.encoder, "loss": s.objective, "optimizer": optimizer}
    if config.resume and run.latest_checkpoint() is not None:
        position = run.restore(fingerprint, stateful, s.rank)
    else:
        if config.resume and main:
            log.warning("--resume: %s has no complete checkpoint yet; starting from the beginning", run.path)
        position = Position()
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed + s.rank)  # dropout: each process draws its own masks
    if main:
        run.start(config, position.step)
        if config.mine_negatives:  # what was trained on, to read (or to train on again without mining)
            write_rows(run.path / MINED_FILE, columns(config.mine_negatives), s.data.rows)
            if position.step == 0:
                run.record({"step": 0, "mining": s.mining})
    best = best_metric(config, s.evaluators)
    facts = RunFacts(config, s.data, type(s.objective).__name__, s.encoder.pooling, s.encoder.dim,
                     s.encoder.max_seq_length, s.encoder.normalize, s.world_size, total_steps,
                     data_dir(config.data_dir), read_license(s.encoder.source),
                     evaluations=rundir.evaluations(run.read_log()) if main else [],
                     best=best, hardware=hardware(s.device), layout=s.layout.describe())

    def save_model(name: str, step: int) -> None:
        facts.step, facts.train_seconds, facts.rows = step, position.train_seconds, position.rows
        run.save_model(s.encoder, name, {"mnr_config.toml": config.to_toml(),
                                         "README.md": model_card(facts, run.path / name, name)})
    # Reading a loss waits for the GPU: there, losses are read (logged, checked) every few steps.
    read_every = 1 if s.device.type == "cpu" else 25

    def save_checkpoint() -> Path | None:
        rngs = distributed.gather_objects(rundir.rng_states())
        if not main:
            return None
        return run.save_checkpoint(rundir.checkpoint_payload(position, fingerprint, stateful, rngs),
                                   keep=config.keep_checkpoints)

    stop = _StopSignals(at_once=alone)

    def evaluate(step: int, passages: dict[str, torch.Tensor] | None = None) -> int | None:
        """Score every dev set, log it, keep best/; return the stop signal that cut the scoring short (it can
        take minutes, so a stop acts at once: nothing of it is logged), else None."""
        if not s.evaluators or not main:
            return None
        results = {}
        try:
            with stop.at_once():
                for e in s.evaluators:
                    known = (passages or {}).get(e.name)  # its corpus embedded by this model (a retrieval dev set)
                    extra = {} if known is None else {"passages": known}
                    results[e.name] = e(s.encoder, bf16=s.bf16, progress=progress, **extra)
        except _StopNow as e:
            return e.signal
        run.record({"step": step, **results})
        facts.evaluations.append({"step": step, **results})
        tqdm.write(f"step {step}: " + "; ".join(f"{name} " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
                                                for name, scores in results.items()))
        score = results[best[0]][best[1]]
        if position.best_score is None or score > position.best_score:
            position.best_score, position.best_step = score, step
            save_model("best", step)
        return None

    unread: list[tuple[int, int, torch.Tensor, float]] = []  # (step, epoch, loss, lr) not yet read
    recent: list[float] = []

    def read_losses() -> None:
        """Log the losses of the steps since the last read; stop at the first that is not finite."""
        values = torch.stack([loss for _, _, loss, _ in unread]).tolist()
        for (step, epoch, _, lr), value in zip(unread, values, strict=True):
            if not math.isfinite(value):
                last = run.latest_checkpoint(quiet=True)
                raise TrainingError(f"step {step}: the loss is not finite; lower --lr or check the data. "
                                    f"The last good checkpoint is {last or 'none (no checkpoint written yet)'}")
            if main:
                run.record({"step": step, "epoch": epoch, "loss": value, "lr": lr})
        unread.clear()
        recent[:] = (recent + values)[-50:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}",
                        rows_per_s=f"{position.rows / position.train_seconds:.1f}", refresh=False)

    s.train_encoder.train()
    bar = tqdm(total=total_steps, initial=position.step, desc="train", unit="step",
               disable=not (progress and main), dynamic_ncols=True)

    def evaluated(step: int) -> bool:
        return any(e["step"] == step for e in facts.evaluations)

    def stopped(number: int, where: str, path: Path | None) -> Stopped:
        bar.close()
        saved = f"checkpoint {path} saved" if path else "no checkpoint yet"
        return Stopped(f"stopped by {signal.Signals(number).name} {where}; {saved}", number)

    with stop:
        # the base model's score before training; on resume, an evaluation a stop cut short
        due = position.step == 0 or position.step % config.eval_steps == 0 or position.step == total_steps
        if s.evaluators and main and due and not evaluated(position.step):
            if position.step == 0:
                tqdm.write(f"evaluating the base model on {', '.join(e.name for e in s.evaluators)} before training")
            # mining embedded the corpus with this same model
            if (number := evaluate(position.step, s.base_passages)) is not None:
                raise stopped(number, f"while evaluating step {position.step}", run.latest_checkpoint(quiet=True))
        s.base_passages.clear()  # only the base model's: free them
        for epoch in range(position.epoch, config.epochs):
            batches = batches_of_epoch(s.data, config, epoch, s.rank, s.world_size)
            for index in range(position.batch if epoch == position.epoch else 0, len(batches)):
                t0 = time.perf_counter()
                step = position.step + 1  # the step this iteration completes
                lr = config.lr * lr_factor(step - 1, total_steps, warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                unread.append((step, epoch, train_step(s, optimizer, batches[index], config), lr))
                done = index + 1 == len(batches)
                position.step, position.rows = step, position.rows + len(batches[index])
                position.epoch, position.batch = (epoch + 1, 0) if done else (epoch, index + 1)
                evaluating = step % config.eval_steps == 0 and step < total_steps
                saving = config.save_every and step % config.save_every == 0 and step < total_steps
                stopping = False
                if len(unread) >= read_every or evaluating or saving or step == total_steps:
                    position.train_seconds += time.perf_counter() - t0  # so far: rows/s for the bar
                    t0 = time.perf_counter()
                    read_losses()  # before anything is evaluated or saved: a bad step is never kept
                    stopping = distributed.any_process(stop.signal is not None, s.device)
                position.train_seconds += time.perf_counter() - t0
                bar.update()
                if evaluating and evaluate(step) is not None:
                    stopping = True  # the checkpoint is of this step: resuming evaluates it again first
                if stopping or saving:
                    path = save_checkpoint()
                    if stopping:
                        raise stopped(stop.signal or signal.SIGTERM, f"at step {step} of {total_steps}", path)
        bar.close()
        if not evaluated(total_steps) and (number := evaluate(total_steps)) is not None:
            raise stopped(number, f"while evaluating the last step ({total_steps})", save_checkpoint())
    if config.save_every:
        save_checkpoint()
    summary = {}
    if main:
        save_model("final", total_steps)
        if position.best_step is not None:  # its card, now with every evaluation of the run
            facts.step = position.best_step
            run.write_text("best/README.md", model_card(facts, run.path / "best", "best"))
        summary = run_summary(run, config, position, best, facts)
        run.record({"step": total_steps, "done": True, "train_seconds": position.train_seconds,
                    "rows": position.rows, "summary": summary})
        plot_runs([run.path], run.path / "curves.png")
        run.close()
    return TrainResult(run.path / "final", run.path / "best" if position.best_score is not None else None,
                       position.best_score, " ".join(best) if best else None, position.train_seconds, total_steps,
                       position.rows, summary)


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
    models = [config.model, summary["final"]] + ([summary["best"]] if "best" in summary else [])
    # the dev sets' own files, for a table of every model on them (retrieval: the folders' test split)
    sets = (["--sts", *config.sts_dev] if config.sts_dev else []) + \
        (["--retrieval", *dict.fromkeys(split_spec(spec)[0] for spec in config.ir_dev)]
         if config.ir_dev else [])
    data = ["--data-dir", str(facts.data_dir)] if sets and facts.data_dir else []
    summary["next"] = shlex.join(["mnr", "eval", *models, *(sets or ["--sts", "YOUR_STS_FILE"]), *data])
    return summary


class _StopNow(Exception):
    """A stop signal that arrived inside ``_StopSignals.at_once()``."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.signal = number


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (and write a checkpoint).
    Inside ``at_once()`` (loading, mining, an evaluation: minutes of work that a checkpoint cannot keep)
    they raise ``_StopNow`` there and then (unless ``at_once`` is False: then it is a no-op). A second
    Ctrl-C stops at once."""

    def __init__(self, at_once: bool = True):
        self.signal: int | None = None
        self.previous: dict = {}
        self.immediate = False
        self.allowed = at_once

    @contextlib.contextmanager
    def at_once(self):
        if not self.allowed:
            yield
            return
        if self.signal is not None:  # asked before this work began
            raise _StopNow(self.signal)
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def _handle(self, number, frame):
        if self.signal is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = number
        if self.immediate:
            self.immediate = False
            raise _StopNow(number)
        tqdm.write(f"{signal.Signals(number).name}: stopping after this step and writing a checkpoint "
                   "(Ctrl-C again to stop at once)")

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
