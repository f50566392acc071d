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

SWAP_SEARCH = 64  # full batches a row left over at the end looks through for a place


def duplicate_free_batches(rows: Sequence[tuple[str, ...]], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffle ``rows`` with ``seed`` and cut them into batches in which no text repeats.

    A row that clashes with the batch being filled waits for the next one (it is tried first
    there), so every row is used exactly once per epoch and the order stays close to the shuffle.
    That leaves the rows that clash with the last batches for batches of their own, often of 1-3
    rows: an optimizer step as large as any other on a handful of in-batch negatives. So the rows of
    the short batches at the end are gathered into one, swapping places with rows of full batches
    where they clash with it. Returns lists of row indices; only the last batch is smaller than
    ``batch_size``, unless the rows clash too much for that (then the last few are).
    The result depends only on (rows, batch_size, seed), which makes a run's batch order
    reproducible and a resumed run's position a plain index.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    batches = _fill_in_order(rows, order, batch_size)
    full = [b for b in batches if len(b) == batch_size]
    if len(batches) - len(full) < 2:
        return batches
    last, rest = _fill_with_swaps(rows, full, [i for b in batches if len(b) < batch_size for i in b], batch_size)
    return full + [last] + _fill_in_order(rows, rest, batch_size)


def _fill_in_order(rows: Sequence[tuple[str, ...]], order: list[int], batch_size: int) -> list[list[int]]:
    """Batches in ``order``: a row that clashes with the batch being filled waits, first in line for the next."""
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
    return batches


def _fill_with_swaps(rows: Sequence[tuple[str, ...]], full: list[list[int]], leftover: list[int],
                     batch_size: int) -> tuple[list[int], list[int]]:
    """One batch of the ``leftover`` rows: a row that clashes with it takes the place of a row of a full batch
    that does not (when it fits that full batch without the row), which joins instead. Returns the batch
    and the rows that found no place."""
    holders: dict[int, dict[str, int]] = {}  # per full batch looked at: text -> position of the row with it
    batch: list[int] = []
    seen: set[str] = set()
    rest: list[int] = []
    for index in leftover:
        if len(batch) < batch_size and seen.isdisjoint(rows[index]):
            joins = index
        elif len(batch) < batch_size and (replaced := _swap(rows, full, holders, index, seen)) is not None:
            joins = replaced
        else:
            rest.append(index)
            continue
        batch.append(joins)
        seen.update(rows[joins])
    return batch, rest


def _swap(rows: Sequence[tuple[str, ...]], full: list[list[int]], holders: dict[int, dict[str, int]], index: int,
          seen: set[str]) -> int | None:
    """Put row ``index`` into a full batch in place of a row whose texts are not in ``seen``; returns the row
    taken out, or None when none of the first ``SWAP_SEARCH`` full batches has such a place (a bound on the work
    when many rows share a text and no swap can help)."""
    for k, batch in enumerate(full[:SWAP_SEARCH]):
        if k not in holders:
            holders[k] = {t: position for position, i in enumerate(batch) for t in rows[i]}
        holder = holders[k]
        clashes = {holder[t] for t in rows[index] if t in holder}
        if len(clashes) > 1:
            continue  # it shares texts with two of the batch's rows: taking one out is not enough
        for position in clashes or range(len(batch)):
            out = batch[position]
            if seen.isdisjoint(rows[out]):
                for t in rows[out]:
                    holder.pop(t, None)
                holder.update((t, position) for t in rows[index])
                batch[position] = index
                return out
    return None


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


def process_batches(data: TrainingSet, batch_size: int, seed: int, epoch: int, *, duplicate_free: bool = True,
                    rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This process's batches of one epoch.

    With several processes, each global batch (``batch_size`` x processes rows, duplicate-free
    as a whole) is cut into one slice per process; a last global batch too small to give every
    process a full slice is dropped, since the processes gather equal-sized tensors.
    """
    size = batch_size * world_size
    batches = epoch_batches(data, size, seed, epoch, duplicate_free=duplicate_free)
    if world_size == 1:
        return batches
    return [b[rank * batch_size : (rank + 1) * batch_size] for b in batches if len(b) == size]
