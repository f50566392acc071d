"""Gradient caching must be plain MNR in value and gradient, dropout included."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from mnr.cache import embed_without_graph, replay_with_gradients, rng_state, set_rng_state
from mnr.losses import MultipleNegativesRankingLoss
from mnr.model import SentenceEncoder

from .conftest import SENTENCES

CPU = torch.device("cpu")


def batch_ids(encoder: SentenceEncoder, columns: int, rows: int = 8) -> list[list[int]]:
    texts = [f"{SENTENCES[(3 * c + r) % 24]} {c}-{r}" for c in range(columns) for r in range(rows)]  # column-major
    return encoder.tokenize(texts)


def grads(encoder: SentenceEncoder) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return out


GTE = {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
       "hardness_mode": "in_batch_negatives", "hardness_strength": 9.0}


@pytest.mark.parametrize("columns, settings", [(2, {}), (3, {}), (2, {"symmetric": True}), (3, {"symmetric": True}),
                                               (3, GTE)],
                         ids=["pairs", "hard-negatives", "symmetric", "symmetric-hard-negatives", "gte-hardness"])
@pytest.mark.parametrize("mini_batch", [3, 5])
def test_cached_equals_plain_with_dropout(tiny_model_dir, columns, settings, mini_batch):
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.transformer.config.hidden_dropout_prob = 0.1  # dropout on: the replay must reproduce the masks
    encoder.train()
    loss_fn = MultipleNegativesRankingLoss(**settings)
    ids = batch_ids(encoder, columns)
    chunks = [ids[i : i + mini_batch] for i in range(0, len(ids), mini_batch)]

    torch.manual_seed(11)
    start = rng_state(CPU)
    plain = loss_fn(list(torch.cat([encoder(chunk) for chunk in chunks]).split(8)))  # one graph, same chunks
    plain.backward()
    expected = grads(encoder)
    after_plain = rng_state(CPU)

    set_rng_state(start, CPU)
    embeddings, replay = embed_without_graph(encoder, ids, mini_batch, contextlib.nullcontext, CPU)
    cached = loss_fn(list(embeddings.split(8)))
    cached.backward()
    replay_with_gradients(encoder, replay, embeddings.grad, contextlib.nullcontext)
    torch.testing.assert_close(cached.detach(), plain.detach(), atol=1e-5, rtol=1e-5)
    got = grads(encoder)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert torch.equal(rng_state(CPU)[0], after_plain[0]), "the RNG should end where one pass leaves it"


@pytest.mark.parametrize("mini_batch_size", [0, 4], ids=["plain", "cached"])
def test_a_step_with_a_non_finite_loss_changes_no_weight(tiny_model_dir, nli_file, mini_batch_size, monkeypatch):
    """The optimizer skips the step (on the device, without waiting for it) and the loss it returns says why."""
    from mnr.config import TrainConfig
    from mnr.recipe import prepare
    from mnr.train import make_optimizer, train_step

    config = TrainConfig(model=str(tiny_model_dir), data=[str(nli_file)], output="unused", batch_size=4,
                         mini_batch_size=mini_batch_size, lr=1e-3)
    s = prepare(config)
    optimizer = make_optimizer(s, config)
    before = {n: p.detach().clone() for n, p in s.encoder.named_parameters()}
    monkeypatch.setattr(type(s.objective), "forward", lambda self, columns, labels=None: columns[0].sum() * math.nan)
    loss = train_step(s, optimizer, [0, 1, 2, 3], config)
    assert not torch.isfinite(loss)
    for name, param in s.encoder.named_parameters():
        assert torch.equal(param, before[name]), f"{name} changed"
    assert all(state["step"].item() == 0 for state in optimizer.state.values()), "the skipped step was counted"
    assert all(p.grad is None for p in s.encoder.parameters())


def test_training_with_a_mini_batch_matches_training_without(tiny_model_dir, nli_file, tmp_path):
    """End to end through the CLI: a mini-batch holding the whole batch (4 rows x 3 columns) is exactly the
    plain step, dropout masks included; smaller ones draw other masks but train as well."""
    import json

    from mnr.cli import main

    logs = {}
    for name, extra in (("plain", []), ("cached", ["--mini-batch-size", "12"]), ("small", ["--mini-batch-size", "3"])):
        output = tmp_path / name
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(nli_file), "--output", str(output),
                     "--batch-size", "4", "--hard-negatives", *extra]) == 0
        logs[name] = [json.loads(line)["loss"] for line in (output / "log.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)]
    assert logs["cached"] == pytest.approx(logs["plain"], rel=1e-5)
    assert len(logs["small"]) == len(logs["plain"])
