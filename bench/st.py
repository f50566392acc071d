"""The sentence-transformers side of every comparison: its own trainer on the rows mnr trains on, with the
settings of the mnr run it is compared with (``TrainConfig``): MultipleNegativesRankingLoss on no-duplicates
batches (SoftmaxLoss on plain batches for --loss softmax), linear warm-up and decay, AdamW, clipping, seed."""

from __future__ import annotations

import time
from pathlib import Path

from mnr.config import TrainConfig
from mnr.data import TrainingSet
from mnr.mine import columns
from mnr.model import resolve_model_path


def train_st(config: TrainConfig, data: TrainingSet, workdir: Path, *, device: str = "cpu", bf16: bool = False,
             evaluator=None, eval_steps: int | None = None, logging_steps: int = 10, wrap=None):
    """Train ``config``'s model on ``data``; returns the model and what the run measured: rows, steps,
    ``seconds`` (the training loop, evaluation excluded), ``eval_seconds`` and the trainer's log history.
    ``wrap(model, loss)``: a loss around the loss (e.g. sentence-transformers' MatryoshkaLoss)."""
    import datasets
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from transformers import PrinterCallback, TrainerCallback

    try:
        from sentence_transformers.base.sampler import BatchSamplers
    except ImportError:  # older releases
        from sentence_transformers.training_args import BatchSamplers

    class EvaluationTime(TrainerCallback):
        """Time from a step's end to the evaluation it triggers: taken out of the training time."""

        seconds, since = 0.0, 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.since = time.perf_counter()

        def on_evaluate(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.since

    model = SentenceTransformer(str(resolve_model_path(config.model.model)), device=device)
    model.max_seq_length = config.model.max_seq_length or model.max_seq_length
    training = config.training
    if training.loss == "softmax":
        dataset = datasets.Dataset.from_dict({"premise": [r[0] for r in data.rows],
                                              "hypothesis": [r[1] for r in data.rows], "label": data.labels})
        loss = losses.SoftmaxLoss(model, model.get_embedding_dimension(), num_labels=3)
        sampler = BatchSamplers.BATCH_SAMPLER
    else:
        names = columns(len(data.columns) - 2)
        dataset = datasets.Dataset.from_dict({name: [r[i] for r in data.rows] for i, name in enumerate(names)})
        loss = losses.MultipleNegativesRankingLoss(model, scale=config.loss.scale)
        sampler = BatchSamplers.NO_DUPLICATES
    if wrap is not None:
        loss = wrap(model, loss)
    evaluation = {"eval_strategy": "steps", "eval_steps": eval_steps} if evaluator is not None and eval_steps else {}
    args = Arguments(output_dir=str(workdir / "st"), num_train_epochs=training.epochs,
                     per_device_train_batch_size=training.batch_size, learning_rate=training.lr,
                     warmup_ratio=training.warmup_ratio, weight_decay=training.weight_decay,
                     max_grad_norm=training.max_grad_norm, lr_scheduler_type="linear", seed=training.seed,
                     batch_sampler=sampler, save_strategy="no", report_to="none", disable_tqdm=True,
                     logging_steps=logging_steps, bf16=bf16, use_cpu=device == "cpu", dataloader_drop_last=False,
                     **evaluation)
    timer = EvaluationTime()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                         evaluator=evaluator if evaluation else None, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # a dict per step on stdout; the losses are kept in log_history
    start = time.perf_counter()
    trainer.train()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start - timer.seconds
    return model, {"rows": len(data) * training.epochs, "steps": trainer.state.global_step, "seconds": seconds,
                   "eval_seconds": timer.seconds, "history": trainer.state.log_history}
