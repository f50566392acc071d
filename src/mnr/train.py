"""The training loop, on one screen: for each step, LR -> forward/backward -> clip/step -> read the losses ->
evaluate / checkpoint; and one step of it.

``train`` is the whole run: ``mnr.recipe`` prepares it (data, mining, model, loss, dev sets: every check before
anything is written) and keeps its records (the log, best/, checkpoints, final/, the cards, the curves); ``fit``
is the loop.
"""

from __future__ import annotations

import math
import signal
import time

import torch

from mnr import cache, distributed
from mnr.config import TrainConfig
from mnr.data import TrainingSet
from mnr.model import SentenceEncoder
from mnr.packing import to_device
from mnr.recipe import Run, Setup, TrainResult, batch_token_ids, batches_of_epoch


def train(config: TrainConfig, *, data: TrainingSet | None = None, encoder: SentenceEncoder | None = None,
          progress: bool = True) -> TrainResult:
    """Fine-tune the config's model on its data; write final/, best/ and checkpoints/ under its output.

    ``data`` and ``encoder`` replace the training set and model the config names (``mnr.recipe.prepare``).
    """
    run = Run(config, make_optimizer, data=data, encoder=encoder, progress=progress)
    fit(run)
    return run.finish()


def fit(run: Run) -> None:
    """Train from the run's position (its start, or its checkpoint's step) to its last step."""
    s, config, position, optimizer = run.setup, run.config, run.position, run.optimizer
    total, training = s.total_steps, config.training
    warmup = math.ceil(total * training.warmup_ratio)
    read_every = 1 if s.device.type == "cpu" else 25  # reading a loss waits for the GPU: there, every few steps
    unread: list[tuple[int, int, list[int], torch.Tensor, float]] = []  # (step, epoch, batch, loss, lr) not yet read
    s.train_encoder.train()
    with run.stop:
        run.evaluate_due()  # the base model before training; on resume, an evaluation a stop cut short
        for epoch in range(position.epoch, training.epochs):
            batches = batches_of_epoch(s.data, config, epoch, s.rank, s.world_size)
            for index in range(position.batch if epoch == position.epoch else 0, len(batches)):
                t0 = time.perf_counter()
                step = position.step + 1  # the step this iteration completes
                # learning rate: linear warm-up, then linear decay
                lr = training.lr * lr_factor(step - 1, total, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # forward, backward, optimizer step
                unread.append((step, epoch, batches[index], train_step(s, optimizer, batches[index], config), lr))
                position.advance(epoch, index, len(batches), len(batches[index]))
                evaluating = step % config.eval.eval_steps == 0 and step < total
                saving = config.run.save_every and step % config.run.save_every == 0 and step < total
                # read the losses (the GPU waits for nothing until then), always before anything is kept
                stopping = False
                if len(unread) >= read_every or evaluating or saving or step == total:
                    position.train_seconds += time.perf_counter() - t0  # so far: rows/s for the bar
                    t0 = time.perf_counter()
                    run.log_losses(unread)
                    unread = []
                    stopping = run.stop_asked()
                position.train_seconds += time.perf_counter() - t0
                run.bar.update()
                # evaluate and checkpoint
                if evaluating and run.evaluate(step) is not None:
                    stopping = True  # the checkpoint is of this step: resuming evaluates it again first
                if stopping or saving:
                    path = run.save_checkpoint()
                    if stopping:
                        raise run.stopped(run.stop.signal or signal.SIGTERM, f"at step {step} of {total}", path)
        run.evaluate_last()


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to the peak over ``warmup_steps``, then linear decay to 0; never a 0-lr step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return (total_steps - step) / max(1, total_steps - warmup_steps)


def forward_backward(s: Setup, batch: list[int], config: TrainConfig) -> torch.Tensor:
    """Loss of the rows ``batch`` and its gradients (averaged over processes); returns the loss, the
    mean over processes, as a 0-dim tensor on the device (reading it waits for the GPU)."""
    k, rows = s.data.part_of(batch)  # the batch's dataset (each batch is of one) and its rows there
    data, task = s.data.parts[k].data, s.tasks[k]
    # every column in one forward pass (bigger matrix products), column-major: (C·B, D) -> C x (B, D)
    ids = batch_token_ids(data, task.prompts, s.token_ids, rows)
    skip = [n for n in task.prompt_lengths for _ in rows] if task.prompt_lengths else None
    labels = to_device(torch.tensor([data.labels[i] for i in rows]), s.device) if data.labels is not None else None

    def autocast():
        return torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16)

    chunk = config.training.mini_batch_size
    if chunk:  # embeddings without activations; the encoder's backward comes after the loss's
        embeddings, replay = cache.embed_without_graph(s.train_encoder, ids, chunk, autocast, s.device, skip)
    else:
        with autocast():
            embeddings = s.train_encoder(ids, skip)
    exclude = s.guide.exclude(rows, k) if s.guide else None  # --guide: likely false negatives left out
    given = {"exclude": exclude} if exclude is not None else {}
    loss = task.train_objective(list(embeddings.split(len(batch))), labels, **given)  # fp32 (pooling returns fp32)
    loss.backward()
    if chunk:
        cache.replay_with_gradients(s.train_encoder, replay, embeddings.grad, autocast)
    return distributed.mean(loss.detach())


def train_step(s: Setup, optimizer: torch.optim.Optimizer, batch: list[int], config: TrainConfig) -> torch.Tensor:
    """One optimizer step on the rows ``batch``; returns the loss (a 0-dim tensor on the device).

    A step whose loss is not finite changes nothing: its gradients are dropped. The fused
    optimizer learns that on the device (``found_inf``, as under a gradient scaler), so the CPU
    never waits for the GPU here; the loop reports the bad step when it next reads the losses.
    """
    loss = forward_backward(s, batch, config)
    if config.training.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                       config.training.max_grad_norm)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~torch.isfinite(loss)).float()
        optimizer.step()
    elif torch.isfinite(loss):  # other optimizers: decide on the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(s: Setup, config: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per parameter instead of a dozen elementwise passes (the foreach
    version spent a quarter of a CPU step updating MiniLM's 12M-entry embedding matrix; ``fused=False``
    measures it: bench/speed.py)."""
    return torch.optim.AdamW(param_groups([s.encoder, s.objective], config.training.weight_decay),
                             lr=config.training.lr, fused=fused)


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
