"""The training loop: setup, then one loop of LR -> eval/save -> forward/backward -> clip/step -> log."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mnr.batching import epoch_batches
from mnr.config import TrainConfig
from mnr.data import STSExample, TrainingSet, data_dir, load_sts, load_training_set, parse_column_map, resolve_path
from mnr.errors import ConfigError, MnrError
from mnr.evaluate import evaluate_sts
from mnr.losses import MultipleNegativesRankingLoss, SoftmaxLoss
from mnr.model import SentenceEncoder

log = logging.getLogger(__name__)


class TrainingError(MnrError):
    """Training cannot go on (a non-finite loss)."""


@dataclass
class TrainResult:
    final: Path
    best: Path | None
    best_score: float | None  # STS dev Spearman of best/
    train_seconds: float  # the loop's forward/backward/step time, evaluation and saving excluded
    steps: int
    rows: int  # training examples seen


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
    steps_per_epoch = len(epoch_batches(data, config.batch_size, config.seed, 0,  # fails early if no
                                        duplicate_free=config.loss == "mnr"))      # full batch is possible

    device = _device(config.device)
    torch.manual_seed(config.seed)  # the softmax classifier's initialisation
    encoder = SentenceEncoder.load(config.model, pooling=config.pooling or None,
                                   max_seq_length=config.max_seq_length, packed=config.packing).to(device)
    if config.loss == "softmax":
        loss_fn = SoftmaxLoss(encoder.dim, num_labels=3)
    else:
        loss_fn = MultipleNegativesRankingLoss(scale=config.scale, symmetric=config.symmetric)
    # Re-tokenising every batch costs as much as a small model's forward on CPU: do it once.
    texts = list(dict.fromkeys(t for row in data.rows for t in row))
    token_ids = dict(zip(texts, encoder.tokenize(texts), strict=True))
    return Setup(data, sts_dev, encoder, loss_fn.to(device), token_ids, device, steps_per_epoch)


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    """Fine-tune ``config.model`` on ``config.data``; write final/ and best/ under ``config.output``."""
    if not config.output:
        raise ConfigError("--output: no output directory given")
    output = Path(config.output)
    if (output / "final").exists():
        raise ConfigError(f"--output: {output} already holds a finished run ({output / 'final'}); "
                          "choose another directory or remove it")
    s = prepare(config)
    data, encoder = s.data, s.encoder
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)  # dropout

    total_steps = s.steps_per_epoch * config.epochs
    warmup_steps = math.ceil(total_steps * config.warmup_ratio)
    optimizer = make_optimizer(s, config)

    output.mkdir(parents=True, exist_ok=True)
    (output / "config.toml").write_text(config.to_toml(), encoding="utf-8")
    log_file = open(output / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed after the loop)

    def record(entry: dict) -> None:
        log_file.write(json.dumps(entry) + "\n")
        log_file.flush()

    best_score, best_path = None, None

    def evaluate_and_keep_best(step: int) -> None:
        nonlocal best_score, best_path
        if s.sts_dev is None:
            return
        scores = evaluate_sts(encoder, s.sts_dev)
        record({"step": step, "sts_dev": scores})
        tqdm.write(f"step {step}: STS dev Spearman {scores['spearman']:.2f}, Pearson {scores['pearson']:.2f}")
        if best_score is None or scores["spearman"] > best_score:
            best_score = scores["spearman"]
            best_path = encoder.save(output / "best", extra_files={"mnr_config.toml": config.to_toml()})

    encoder.train()
    step, rows_seen, train_seconds, recent_losses = 0, 0, 0.0, []
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    evaluate_and_keep_best(0)
    for epoch in range(config.epochs):
        for batch in epoch_batches(data, config.batch_size, config.seed, epoch, duplicate_free=config.loss == "mnr"):
            t0 = time.perf_counter()
            # linear warm-up to the peak over warmup_steps, then linear decay to 0 (never a 0-lr step)
            scale = (step + 1) / warmup_steps if step < warmup_steps else \
                (total_steps - step) / max(1, total_steps - warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * scale

            loss = train_step(s, optimizer, batch, config)
            if loss is None:
                raise TrainingError(f"step {step + 1}: the loss is not finite; lower --lr or check the data "
                                    f"(the last good model is in {best_path or 'no saved model'})")
            train_seconds += time.perf_counter() - t0

            step += 1
            rows_seen += len(batch)
            recent_losses = (recent_losses + [loss])[-50:]
            record({"step": step, "epoch": epoch, "loss": loss, "lr": config.lr * scale})
            bar.set_postfix(loss=f"{sum(recent_losses) / len(recent_losses):.4f}",
                            rows_per_s=f"{rows_seen / train_seconds:.1f}", refresh=False)
            bar.update()
            if step % config.eval_steps == 0 and step < total_steps:
                evaluate_and_keep_best(step)
    bar.close()
    evaluate_and_keep_best(step)
    final = encoder.save(output / "final", extra_files={"mnr_config.toml": config.to_toml()})
    record({"step": step, "done": True, "train_seconds": train_seconds, "rows": rows_seen})
    log_file.close()
    return TrainResult(final, best_path, best_score, train_seconds, step, rows_seen)


def train_step(s: Setup, optimizer: torch.optim.Optimizer, batch: list[int], config: TrainConfig) -> float | None:
    """One optimizer step on the rows ``batch``; returns the loss, or None (and no step) if it is not finite."""
    data = s.data
    # every column in one forward pass (bigger matrix products), column-major: (C·B, D) -> C x (B, D)
    ids = [s.token_ids[data.rows[i][c]] for c in range(len(data.columns)) for i in batch]
    labels = torch.tensor([data.labels[i] for i in batch], device=s.device) if data.labels is not None else None
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        embeddings = s.encoder(ids).split(len(batch))
    loss = s.loss_fn(list(embeddings), labels)  # fp32, outside autocast
    if not torch.isfinite(loss):
        return None
    loss.backward()
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def make_optimizer(s: Setup, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per parameter instead of a dozen elementwise passes (the foreach
    version spent a quarter of a CPU step updating MiniLM's 12M-entry embedding matrix)."""
    return torch.optim.AdamW(_param_groups([s.encoder, s.loss_fn], config.weight_decay), lr=config.lr, fused=True)


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
