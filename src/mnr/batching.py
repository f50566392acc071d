"""Rows -> batches: duplicate-free and seeded.

MNR treats every other candidate in a batch as a negative, so a text that appears twice in a
batch (in any column) becomes a false negative: the loss pushes a sentence away from itself.
``duplicate_free_batches`` never lets that happen.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence

from mnr.data import TrainingSet
from mnr.errors import DataError


def duplicate_free_batches(rows: Sequence[tuple[str, ...]], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle ``rows`` with ``seed`` and cut them into batches in which no text repeats.

    A row that clashes with the batch being filled waits for the next one (it is tried first
    there), so every row is used exactly once per epoch and the order stays close to the shuffle.
    Returns lists of row indices; only the last batch is smaller than ``batch_size``, unless the
    rows clash too much for that (then the last few are).
    The result depends only on (rows, batch_size, seed), which makes a run's batch order
    reproducible and a resumed run's position a plain index.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pending = deque(order)
    waiting: list[int] = []  # rows that clashed with an earlier batch, oldest first
    batches: list[list[int]] = []
    while pending or waiting:
        batch: list[int] = []
        seen: set[str] = set()
        still_waiting: list[int] = []
        candidates = iter(waiting)
        while len(batch) < batch_size:
            index = next(candidates, None)
            if index is None:
                if not pending:
                    break
                index = pending.popleft()
            if seen.isdisjoint(rows[index]):
                batch.append(index)
                seen.update(rows[index])
            else:
                still_waiting.append(index)
        waiting = still_waiting + list(candidates)  # keep the oldest first
        batches.append(batch)
    return _merge_short_batches(rows, batches, batch_size)


def _merge_short_batches(rows: Sequence[tuple[str, ...]], batches: list[list[int]],
                         batch_size: int) -> list[list[int]]:
    """Refill the short batches at the end, so that at most one is short where the rows allow it.

    The filling above leaves rows that clash with the last batch for batches of their own, often of
    1-3 rows: a full optimizer step on a handful of in-batch negatives. Each such row joins the short
    batch being filled if it fits there; otherwise it trades places with a row of a full batch that
    fits the short batch, when its own texts fit that full batch without the row it replaces.
    """
    full = [b for b in batches if len(b) == batch_size]
    leftover = [i for b in batches if len(b) < batch_size for i in b]
    texts = [{t for i in b for t in rows[i]} for b in full]  # each full batch's texts (none twice)
    merged: list[list[int]] = []
    while leftover:
        batch, seen, rest = [], set(), []
        for index in leftover:
            row = set(rows[index])
            if len(batch) == batch_size:
                rest.append(index)
            elif seen.isdisjoint(row):
                batch.append(index)
                seen |= row
            elif (swap := _swap(rows, full, texts, index, seen)) is not None:
                batch.append(swap)
                seen |= set(rows[swap])
            else:
                rest.append(index)
        merged.append(batch)
        leftover = rest
    return full + merged


def epoch_batches(data: TrainingSet, batch_size: int, seed: int, epoch: int,
                  duplicate_free: bool = True) -> list[list[int]]:
    """The batches of one epoch: a fresh shuffle per epoch, reproducible from (seed, epoch).

    ``duplicate_free=False`` is for losses without in-batch negatives (softmax), where a repeated
    premise is harmless and plain shuffled batches keep every batch full.
    """
    epoch_seed = seed * 1_000_003 + epoch
    if not duplicate_free:
        order = list(range(len(data.rows)))
        random.Random(epoch_seed).shuffle(order)
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches = duplicate_free_batches(data.rows, batch_size, seed=epoch_seed)
    if max(len(b) for b in batches) < batch_size:
        distinct = len({t for row in data.rows for t in row})
        raise DataError(
            f"{', '.join(data.sources)}: not enough distinct texts for one batch of {batch_size} without "
            f"duplicates ({len(data.rows)} rows, {distinct} distinct texts); lower --batch-size or add data"
        )
    return batches


def _swap(rows: Sequence[tuple[str, ...]], full: list[list[int]], texts: list[set[str]], index: int,
          seen: set[str]) -> int | None:
    """Put row ``index`` into a full batch in place of a row whose texts are disjoint from ``seen``;
    returns the row taken out, or None when no full batch has such a place."""
    row = set(rows[index])
    for batch, batch_texts in zip(full, texts, strict=True):
        clash = row & batch_texts
        for position, other in enumerate(batch):
            others = set(rows[other])
            if clash <= others and seen.isdisjoint(others):  # index fits without it; it fits the short batch
                batch[position] = index
                batch_texts -= others
                batch_texts |= row
                return other
    return None
