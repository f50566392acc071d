"""The training loop: setup, then one loop of LR -> forward/backward -> clip/step -> log -> eval/checkpoint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from mnr import checkpoint, distributed
from mnr.batching import epoch_batches
from mnr.cache import cached_backward
from mnr.config import TrainConfig
from mnr.data import STSExample, TrainingSet, data_dir, load_sts, load_training_set, parse_column_map, resolve_path
from mnr.errors import ConfigError, MnrError
from mnr.evaluate import evaluate_sts
from mnr.losses import MultipleNegativesRankingLoss, SoftmaxLoss
from mnr.model import SentenceEncoder

log = logging.getLogger(__name__)

# Settings that change the trained weights: a checkpoint only resumes with the same values.
RESULT_SETTINGS = ("model", "loss", "hard_negatives", "symmetric", "scale", "pooling", "max_seq_length", "packing",
                   "batch_size", "mini_batch_size", "epochs", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
                   "seed", "bf16", "max_examples", "columns")


class TrainingError(MnrError):
    """Training cannot go on (a non-finite loss)."""


class Stopped(MnrError):
    """Stopped by SIGINT/SIGTERM after writing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    final: Path
    best: Path | None
    best_score: float | None  # STS dev Spearman of best/
    train_seconds: float  # the loop's forward/backward/step time, evaluation and saving excluded
    steps: int
    rows: int  # training examples seen (by this process)


@dataclass
class Setup:
    """Everything loaded and checked before the output directory is touched."""

    data: TrainingSet
    sts_dev: list[STSExample] | None
    encoder: SentenceEncoder
    loss_fn: torch.nn.Module
    token_ids: dict[str, list[int]]  # every distinct text, tokenised once
    device: torch.device
    steps_per_epoch: int
    rank: int
    world_size: int
    model: torch.nn.Module  # the encoder, or its DistributedDataParallel wrapper
    loss: torch.nn.Module  # the loss, or its DistributedDataParallel wrapper (softmax)


def prepare(config: TrainConfig) -> Setup:
    """Load and validate data and model. Any bad input fails here, before anything is written."""
    if not config.data:
        raise ConfigError("--data: no training files given")
    root = data_dir(config.data_dir)
    specs = [resolve_path(spec, root) for spec in config.data]
    sts_dev = load_sts(resolve_path(config.sts_dev, root)) if config.sts_dev else None
    data = load_training_set(specs, objective=config.loss, hard_negatives=config.hard_negatives,
                             column_map=parse_column_map(config.columns))
    data = data.sample(config.max_examples, config.seed)
    rank, world_size = distributed.world()
    steps_per_epoch = len(batches_of_epoch(data, config, 0, rank, world_size))  # fails early if no full batch

    device = _device(config.device) if world_size == 1 else _distributed_device()
    torch.manual_seed(config.seed)  # the softmax classifier's initialisation
    encoder = SentenceEncoder.load(config.model, pooling=config.pooling or None,
                                   max_seq_length=config.max_seq_length, packed=config.packing).to(device)
    if config.loss == "softmax":
        loss_fn = SoftmaxLoss(encoder.dim, num_labels=3).to(device)
    else:
        loss_fn = MultipleNegativesRankingLoss(scale=config.scale, symmetric=config.symmetric)
    model, loss = encoder, loss_fn
    if world_size > 1:  # gradients averaged across processes; weights broadcast from rank 0
        ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(encoder, device_ids=ids)
        if any(p.requires_grad for p in loss_fn.parameters()):
            loss = DistributedDataParallel(loss_fn, device_ids=ids)
    # Re-tokenising every batch costs as much as a small model's forward on CPU: do it once.
    texts = list(dict.fromkeys(t for row in data.rows for t in row))
    token_ids = dict(zip(texts, encoder.tokenize(texts), strict=True))
    return Setup(data, sts_dev, encoder, loss_fn, token_ids, device, steps_per_epoch, rank, world_size, model, loss)


def batches_of_epoch(data: TrainingSet, config: TrainConfig, epoch: int, rank: int = 0,
                     world_size: int = 1) -> list[list[int]]:
    """This process's batches of one epoch.

    With several processes, each global batch (``batch_size`` x processes rows, duplicate-free
    as a whole) is cut into one slice per process; a last global batch too small to give every
    process a full slice is dropped, since the processes gather equal-sized tensors.
    """
    size = config.batch_size * world_size
    batches = epoch_batches(data, size, config.seed, epoch, duplicate_free=config.loss == "mnr")
    if world_size == 1:
        return batches
    return [b[rank * config.batch_size : (rank + 1) * config.batch_size] for b in batches if len(b) == size]


def forward_backward(s: Setup, batch: list[int], config: TrainConfig) -> float | None:
    """Loss of one batch and its gradients (averaged over processes); None, and no gradients, if
    the loss is not finite on any process."""
    data = s.data
    # every column in one forward pass (bigger matrix products), column-major: (C·B, D) -> C x (B, D)
    ids = [s.token_ids[data.rows[i][c]] for c in range(len(data.columns)) for i in batch]
    labels = torch.tensor([data.labels[i] for i in batch], device=s.device) if data.labels is not None else None

    def autocast():
        return torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=config.bf16)

    mean_loss = None

    def is_finite(loss: torch.Tensor) -> bool:
        nonlocal mean_loss
        mean_loss = distributed.mean(loss.detach())
        return bool(torch.isfinite(mean_loss))  # the same answer on every process

    if config.mini_batch_size:
        if cached_backward(s.model, s.loss, ids, len(batch), labels, config.mini_batch_size, autocast, s.device,
                           is_finite) is None:
            return None
    else:
        with autocast():
            embeddings = s.model(ids).split(len(batch))
        loss = s.loss(list(embeddings), labels)  # fp32 (pooling returns fp32), outside autocast
        if not is_finite(loss):
            return None
        loss.backward()
    return mean_loss.item()


def train_step(s: Setup, optimizer: torch.optim.Optimizer, batch: list[int], config: TrainConfig) -> float | None:
    """One optimizer step on the rows ``batch``; returns the loss, or None (and no step) if it is not finite."""
    loss = forward_backward(s, batch, config)
    if loss is not None:
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           config.max_grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(s: Setup, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per parameter instead of a dozen elementwise passes (the foreach
    version spent a quarter of a CPU step updating MiniLM's 12M-entry embedding matrix)."""
    return torch.optim.AdamW(_param_groups([s.encoder, s.loss_fn], config.weight_decay), lr=config.lr, fused=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to the peak over ``warmup_steps``, then linear decay to 0; never a 0-lr step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (total_steps - step) / max(1, total_steps - warmup_steps)


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data``; write final/, best/ and checkpoints/ under ``config.output``."""
    output = _check_output(config)
    s = prepare(config)
    main = s.rank == 0
    optimizer = make_optimizer(s, config)
    total_steps = s.steps_per_epoch * config.epochs
    warmup_steps = math.ceil(total_steps * config.warmup_ratio)
    fingerprint = _fingerprint(s, config)
    position = {"step": 0, "epoch": 0, "batch": 0, "rows": 0, "train_seconds": 0.0, "best_score": None}
    if config.resume and checkpoint.latest_complete(output) is not None:
        position = _restore(s, optimizer, output, fingerprint)
    else:
        if config.resume and s.rank == 0:
            log.warning("--resume: %s has no complete checkpoint yet; starting from the beginning", output)
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed + s.rank)  # dropout: each process draws its own masks
    if main:
        _start_output(output, config, position["step"])

    def save_checkpoint() -> Path | None:
        rngs = _gather_objects(checkpoint.rng_states(), s.world_size)
        if not main:
            return None
        return checkpoint.save(output, {
            "format": checkpoint.FORMAT, "fingerprint": fingerprint, "state": dict(position),
            "encoder": s.encoder.state_dict(), "loss": s.loss_fn.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rngs,
        }, keep=config.keep_checkpoints)

    def evaluate_and_keep_best(step: int) -> None:
        if s.sts_dev is None or not main:
            return
        scores = evaluate_sts(s.encoder, s.sts_dev, bf16=config.bf16)
        _record(output, {"step": step, "sts_dev": scores})
        tqdm.write(f"step {step}: STS dev Spearman {scores['spearman']:.2f}, Pearson {scores['pearson']:.2f}")
        if position["best_score"] is None or scores["spearman"] > position["best_score"]:
            position["best_score"] = scores["spearman"]
            _save_model(s.encoder, output / "best", config)

    s.model.train()
    recent_losses: list[float] = []
    bar = tqdm(total=total_steps, initial=position["step"], desc="train", unit="step",
               disable=not (progress and main), dynamic_ncols=True)
    with _StopSignals() as stop:
        if position["step"] == 0:
            evaluate_and_keep_best(0)
        for epoch in range(position["epoch"], config.epochs):
            batches = batches_of_epoch(s.data, config, epoch, s.rank, s.world_size)
            for index in range(position["batch"] if epoch == position["epoch"] else 0, len(batches)):
                step = position["step"]
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(step, total_steps, warmup_steps)
                t0 = time.perf_counter()
                loss = train_step(s, optimizer, batches[index], config)
                if loss is None:
                    last = checkpoint.latest_complete(output, quiet=True)
                    raise TrainingError(f"step {step + 1}: the loss is not finite; lower --lr or check the data. "
                                        f"The last good checkpoint is {last or 'none (no checkpoint written yet)'}")
                position.update(step=step + 1, epoch=epoch, batch=index + 1,
                                rows=position["rows"] + len(batches[index]),
                                train_seconds=position["train_seconds"] + time.perf_counter() - t0)
                if index + 1 == len(batches):
                    position.update(epoch=epoch + 1, batch=0)
                step = position["step"]
                if main:
                    _record(output, {"step": step, "epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"]})
                    recent_losses = (recent_losses + [loss])[-50:]
                    bar.set_postfix(loss=f"{sum(recent_losses) / len(recent_losses):.4f}",
                                    rows_per_s=f"{position['rows'] / position['train_seconds']:.1f}", refresh=False)
                    bar.update()
                if step % config.eval_steps == 0 and step < total_steps:
                    evaluate_and_keep_best(step)
                stopping = distributed.any_process(stop.signal is not None, s.device)
                if stopping or (config.save_every and step % config.save_every == 0 and step < total_steps):
                    path = save_checkpoint()
                    if stopping:
                        bar.close()
                        name = signal.Signals(stop.signal or signal.SIGTERM).name
                        raise Stopped(f"stopped by {name} at step {step} of {total_steps}; checkpoint {path}. "
                                      "Continue with the same command and --resume", 128 + (stop.signal or 15))
    bar.close()
    evaluate_and_keep_best(total_steps)
    if config.save_every:
        save_checkpoint()
    if main:
        _save_model(s.encoder, output / "final", config)
        _record(output, {"step": total_steps, "done": True, "train_seconds": position["train_seconds"],
                         "rows": position["rows"]})
    best = output / "best" if position["best_score"] is not None else None
    return TrainResult(output / "final", best, position["best_score"], position["train_seconds"], total_steps,
                       position["rows"])


# ---------------------------------------------------------------- helpers


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (and write a checkpoint).
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict = {}

    def _handle(self, number, frame):
        if self.signal is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = number
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


def _check_output(config: TrainConfig) -> Path:
    """Refuse to mix runs in one output directory, before any work starts."""
    if not config.output:
        raise ConfigError("--output: no output directory given")
    output = Path(config.output)
    if config.resume:
        if not (output / "config.toml").exists():
            raise ConfigError(f"--resume: no run to continue in {output}")
        if (output / "final").exists():
            raise ConfigError(f"--resume: the run in {output} has already finished ({output / 'final'})")
    elif (output / "final").exists():
        raise ConfigError(f"--output: {output} already holds a finished run ({output / 'final'}); "
                          "choose another directory or remove it")
    elif checkpoint.latest_complete(output, quiet=True) is not None:
        raise ConfigError(f"--output: {output} holds checkpoints of an unfinished run; add --resume to continue "
                          "it, or choose another directory")
    return output


def _start_output(output: Path, config: TrainConfig, step: int) -> None:
    """Create the output directory (a clear error if it cannot be written) and its log."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        log_file = output / "log.jsonl"
        if log_file.exists():  # resuming: drop what the interrupted run logged after its checkpoint
            kept = [line for line in log_file.read_text().splitlines() if step and _logged_step(line) <= step]
            log_file.write_text("".join(line + "\n" for line in kept))
    except OSError as e:
        raise ConfigError(f"--output: cannot write to {output}: {e.strerror or e}") from None


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a line torn by a crash, so it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


def _record(output: Path, entry: dict) -> None:
    with open(output / "log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def _save_model(encoder: SentenceEncoder, path: Path, config: TrainConfig) -> Path:
    try:
        return encoder.save(path, extra_files={"mnr_config.toml": config.to_toml()})
    except OSError as e:
        raise checkpoint.CheckpointError(f"cannot write the model to {path}: {e.strerror or e}; "
                                         "anything saved there before is intact") from None


def _fingerprint(s: Setup, config: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed: model, data (by content) and result-changing settings."""
    digest = hashlib.sha256()
    for i, row in enumerate(s.data.rows):
        digest.update("\x1f".join(row).encode())
        digest.update(f"\x1e{s.data.labels[i] if s.data.labels is not None else ''}\x1d".encode())
    settings = {key: getattr(config, key) for key in RESULT_SETTINGS}
    settings["processes"] = s.world_size
    return {"model": config.model, "data": digest.hexdigest(), "rows": len(s.data), "sources": s.data.sources,
            "settings": settings}


def _restore(s: Setup, optimizer: torch.optim.Optimizer, output: Path, fingerprint: dict) -> dict:
    path, saved = checkpoint.load(output)
    problems = checkpoint.mismatches(saved["fingerprint"], fingerprint)
    if problems:
        raise checkpoint.CheckpointError(f"--resume: cannot continue from {path}: " + "; ".join(problems))
    s.encoder.load_state_dict(saved["encoder"])
    s.loss_fn.load_state_dict(saved["loss"])
    optimizer.load_state_dict(saved["optimizer"])
    checkpoint.set_rng_states(saved["rng"][s.rank])
    if s.rank == 0:
        log.info("resuming from %s (step %d)", path, saved["state"]["step"])
    return dict(saved["state"])


def _gather_objects(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _param_groups(modules: list[torch.nn.Module], weight_decay: float) -> list[dict]:
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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _distributed_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
