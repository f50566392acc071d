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
