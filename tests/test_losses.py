from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnr.losses import MultipleNegativesRankingLoss, SoftmaxLoss, cosine_matrix

st_losses = pytest.importorskip("sentence_transformers.losses")


@pytest.fixture(scope="module")
def st_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(tiny_model_dir), device="cpu")


def embeddings(columns: int, batch: int = 8, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(columns)]


def grads_of(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("columns", [2, 3, 4], ids=["pairs", "one-hard-negative", "two-hard-negatives"])
@pytest.mark.parametrize("scale", [20.0, 7.5])
def test_mnr_equals_sentence_transformers(st_model, columns, scale):
    x = embeddings(columns)
    ours = MultipleNegativesRankingLoss(scale=scale)(x)
    theirs = st_losses.MultipleNegativesRankingLoss(st_model, scale=scale).compute_loss_from_embeddings(x, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(ours, x), grads_of(theirs, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("columns", [2, 3])
def test_symmetric_mnr_equals_sentence_transformers(st_model, columns):
    x = embeddings(columns, seed=1)
    ours = MultipleNegativesRankingLoss(symmetric=True)(x)
    theirs = st_losses.MultipleNegativesRankingLoss(
        st_model, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
    ).compute_loss_from_embeddings(x, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("directions, partition", [
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "doc_to_doc"), "joint"),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint"),  # GTE's improved contrastive loss
    (("query_to_doc", "doc_to_query"), "per_direction"),
], ids=["q2q", "d2q-joint", "d2d", "gte", "symmetric"])
@pytest.mark.parametrize("columns", [2, 4], ids=["pairs", "two-hard-negatives"])
def test_mnr_directions_equal_sentence_transformers(st_model, directions, partition, columns):
    """Loss and gradients equal sentence-transformers' MultipleNegativesRankingLoss with the same directions and
    partition_mode (float64)."""
    x = embeddings(columns, seed=2)
    ours = MultipleNegativesRankingLoss(directions=directions, partition_mode=partition)(x)
    theirs = st_losses.MultipleNegativesRankingLoss(st_model, directions=directions, partition_mode=partition
                                                    ).compute_loss_from_embeddings(x, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(ours, x), grads_of(theirs, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["in_batch_negatives", "hard_negatives", "all_negatives"])
@pytest.mark.parametrize("columns", [2, 3])
def test_mnr_hardness_weighting_equals_sentence_transformers(st_model, mode, columns):
    x = embeddings(columns, seed=3)
    ours = MultipleNegativesRankingLoss(hardness_mode=mode, hardness_strength=5.0)(x)
    theirs = st_losses.MultipleNegativesRankingLoss(st_model, hardness_mode=mode, hardness_strength=5.0
                                                    ).compute_loss_from_embeddings(x, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_of(ours, x), grads_of(theirs, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if mode == "hard_negatives" and columns == 2:  # no negatives of its own: plain MNR exactly
        assert torch.equal(ours, MultipleNegativesRankingLoss()(x))
    else:  # the weighting changes the loss
        assert not torch.allclose(ours, MultipleNegativesRankingLoss()(x))


def test_the_symmetric_setting_is_the_two_directions_per_direction_bitwise():
    x = embeddings(3, seed=4)
    symmetric = MultipleNegativesRankingLoss(symmetric=True)(x)
    assert torch.equal(symmetric, MultipleNegativesRankingLoss(directions=("query_to_doc", "doc_to_query"),
                                                               partition_mode="per_direction")(x))
    a, p, n = x  # and what it always was: the mean of the two cross-entropies
    target = torch.arange(len(a))
    by_hand = (F.cross_entropy(cosine_matrix(a, torch.cat([p, n])) * 20, target)
               + F.cross_entropy(cosine_matrix(p, a) * 20, target)) / 2
    assert torch.equal(symmetric, by_hand)


@pytest.mark.parametrize("values, message", [
    ({"directions": ["query_to_query"]}, "--directions must include query_to_doc"),
    ({"directions": ["query_to_doc", "doc_to_doc", "doc_to_doc"]},
     "--directions must include query_to_doc .* each once"),
    ({"directions": ["query_to_doc", "docs"]}, "--directions must be among query_to_doc, query_to_query"),
    ({"directions": ["query_to_doc", "query_to_query"], "partition_mode": "per_direction"},
     "--partition-mode per_direction takes query_to_doc and doc_to_query only"),
    ({"partition_mode": "both"}, "--partition-mode must be joint or per_direction"),
    ({"symmetric": True, "directions": ["query_to_doc", "doc_to_doc"]},
     "--symmetric is --directions query_to_doc doc_to_query --partition-mode per_direction"),
    ({"hardness_mode": "hard"}, "--hardness-mode must be one of none, in_batch_negatives"),
    ({"hardness_mode": "hard_negatives"}, "--hardness-strength and --hardness-mode go together"),
    ({"hardness_strength": 5.0}, "--hardness-strength and --hardness-mode go together"),
    ({"hardness_mode": "all_negatives", "hardness_strength": -1.0}, "--hardness-strength must be a number >= 0"),
], ids=["no-q2d", "repeated", "unknown", "per-direction-q2q", "partition", "symmetric-and-directions",
        "hardness-mode", "mode-without-strength", "strength-without-mode", "negative-strength"])
def test_bad_mnr_settings_are_refused(values, message):
    from mnr.config import TrainConfig
    from mnr.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        TrainConfig(**values)


def test_mnr_by_hand():
    """Anchor i's target is candidate i: the loss is the mean of -log softmax at the diagonal."""
    a, p, n = embeddings(3, batch=4)
    scores = 20 * torch.stack([torch.stack([F.cosine_similarity(a[i], c, dim=0) for c in torch.cat([p, n])])
                               for i in range(4)])
    expected = -torch.stack([torch.log_softmax(scores[i], 0)[i] for i in range(4)]).mean()
    torch.testing.assert_close(MultipleNegativesRankingLoss()([a, p, n]), expected)


def test_mnr_is_low_when_positives_match_and_high_when_shuffled():
    a = embeddings(1, batch=16)[0].detach()
    loss = MultipleNegativesRankingLoss()
    assert loss([a, a]) < 0.01
    assert loss([a, a.roll(1, 0)]) > 5.0


def test_softmax_loss_equals_sentence_transformers(st_model):
    u, v = embeddings(2, dim=32)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    ours = SoftmaxLoss(32, 3).double()
    theirs = st_losses.SoftmaxLoss(st_model, 32, 3).double()
    ours.classifier.load_state_dict(theirs.classifier.state_dict())
    expected = theirs.loss_fct(theirs.classifier(torch.cat([u, v, (u - v).abs()], 1)), labels)
    torch.testing.assert_close(ours([u, v], labels), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale must be positive"):
        MultipleNegativesRankingLoss(scale=0)
    with pytest.raises(ValueError, match="at least 2 columns"):
        MultipleNegativesRankingLoss()(embeddings(1))


def test_cosine_matrix():
    a, b = embeddings(2, batch=3)
    torch.testing.assert_close(cosine_matrix(a, b)[1, 2], F.cosine_similarity(a[1], b[2], dim=0))
