from __future__ import annotations

import random

import pytest

from mnr.batching import duplicate_free_batches, epoch_batches
from mnr.data import TrainingSet
from mnr.errors import DataError


def clashing_rows(n: int, vocab: int, columns: int = 2, seed: int = 0) -> list[tuple[str, ...]]:
    """Rows drawn from a small vocabulary, so many texts repeat across rows and columns."""
    rng = random.Random(seed)
    return [tuple(f"t{rng.randrange(vocab)}" for _ in range(columns)) for _ in range(n)]


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("batch_size", [4, 16])
def test_no_text_twice_in_a_batch_and_every_row_once(columns, batch_size):
    rows = clashing_rows(500, vocab=120, columns=columns)
    batches = duplicate_free_batches(rows, batch_size, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        texts = [t for i in batch for t in set(rows[i])]  # a row may repeat its own text (SimCSE-style)
        assert len(texts) == len(set(texts)), f"duplicate text in batch {batch}"


def test_batches_are_full_except_at_the_end():
    rows = clashing_rows(1000, vocab=5000)
    batches = duplicate_free_batches(rows, 32, seed=0)
    sizes = [len(b) for b in batches]
    assert all(s == 32 for s in sizes[:-1])


@pytest.mark.parametrize("seed", range(10))
def test_rows_left_at_the_end_fill_one_batch(seed):
    """Queries sharing relevant passages (as in retrieval judgements): rows that clash with the last batch
    trade places with rows of full batches instead of taking 1-3-row batches of their own."""
    rng = random.Random(seed)
    rows = [(f"query {i}", f"passage {rng.randrange(400)}") for i in range(795)]
    batches = duplicate_free_batches(rows, 32, seed=seed)
    assert [len(b) for b in batches] == [32] * 24 + [27]
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    for batch in batches:
        texts = [t for i in batch for t in rows[i]]
        assert len(texts) == len(set(texts))


def test_many_rows_sharing_one_text():
    """300 rows share a query: each needs a batch of its own, and the rows that no swap can place end in
    batches of one (quickly: a row looks through a bounded number of full batches for a place)."""
    rows = [("hub", f"x{i}") for i in range(300)] + [(f"a{i}", f"b{i}") for i in range(2000)]
    batches = duplicate_free_batches(rows, 32, seed=0)
    assert len(batches) == 300
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    assert all(sum(rows[i][0] == "hub" for i in b) == 1 for b in batches)


def test_seeded_and_different_per_epoch():
    data = TrainingSet(("anchor", "positive"), clashing_rows(300, vocab=10_000), ["x"])
    assert epoch_batches(data, 8, seed=3, epoch=0) == epoch_batches(data, 8, seed=3, epoch=0)
    assert epoch_batches(data, 8, seed=3, epoch=0) != epoch_batches(data, 8, seed=3, epoch=1)
    assert epoch_batches(data, 8, seed=3, epoch=0) != epoch_batches(data, 8, seed=4, epoch=0)


def test_fewer_distinct_texts_than_one_batch():
    # every row shares the anchor "q": no two rows can ever be in one batch
    data = TrainingSet(("anchor", "positive"), [("q", f"p{i}") for i in range(50)], ["few.jsonl"])
    with pytest.raises(DataError, match=r"^few.jsonl: not enough distinct texts for one batch of 4 .*"
                                        r"50 rows, 51 distinct texts"):
        epoch_batches(data, 4, seed=0, epoch=0)


def test_fewer_rows_than_one_batch():
    data = TrainingSet(("anchor", "positive"), [("a", "b"), ("c", "d")], ["tiny.jsonl"])
    with pytest.raises(DataError, match="tiny.jsonl: not enough distinct texts for one batch of 32"):
        epoch_batches(data, 32, seed=0, epoch=0)
