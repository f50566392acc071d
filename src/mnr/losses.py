"""Losses over sentence embeddings. Each takes the embeddings of a batch's columns.

Every loss has the same call shape, ``loss(columns, labels) -> scalar``, where ``columns`` is a
list of (B, D) embedding tensors, one per data column (anchor, positive, negatives... or
premise, hypothesis), so the training loop never needs to know which loss it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnr import distributed


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, p=2, dim=-1) @ F.normalize(b, p=2, dim=-1).T


class MultipleNegativesRankingLoss(nn.Module):
    """Multiple Negatives Ranking loss (in-batch negatives, InfoNCE).

    What it optimises:
        For anchor i, its own positive must be more similar than every other candidate in the
        batch: the other anchors' positives, and every hard negative (extra columns). The scores
        are cosine similarities times ``scale``; the loss is cross-entropy over the candidates.
        The candidates are laid out as [positives (B), negatives_1 (B), ...], so anchor i's true
        candidate is column i: the target of row i is i.

    Args:
        scale: 1 / temperature. 20 (temperature 0.05) is the value of Henderson et al. and
            sentence-transformers.
        symmetric: also rank anchors for each positive (the doc-to-query direction) and average
            the two cross-entropies. Hard negatives take part only in the anchor-to-candidate
            direction, since they have no anchor of their own.

    Distributed (several processes): candidates and anchors are all-gathered with gradient, so
    each anchor is ranked against the global batch; anchor i of process r targets column r·B + i.

    Inputs:
        columns: [anchors (B, D), positives (B, D), negatives (B, D) ...]; labels: ignored.

    References:
        Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply"
        (arXiv:1705.00652); Reimers & Gurevych, sentence-transformers MultipleNegativesRankingLoss.
    """

    def __init__(self, scale: float = 20.0, symmetric: bool = False):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale
        self.symmetric = symmetric

    def forward(self, columns: list[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        if len(columns) < 2:
            raise ValueError(f"MNR needs anchors and positives (at least 2 columns), got {len(columns)}")
        anchors, positives = columns[0], columns[1]
        rank, world_size = distributed.world()
        if world_size > 1:  # rank against the global batch: every process's positives and negatives
            candidate_columns = [distributed.gather_with_grad(c) for c in columns[1:]]
            all_anchors = distributed.gather_with_grad(anchors)
        else:
            candidate_columns, all_anchors = columns[1:], anchors
        candidates = torch.cat(candidate_columns)  # (W·B·(1+N), D): positives of every process, then negatives
        scores = cosine_matrix(anchors, candidates) * self.scale  # (B, W·B·(1+N))
        # anchor i of process r <-> its positive, row r·B + i of the gathered positives
        target = rank * len(anchors) + torch.arange(len(anchors), device=anchors.device)
        loss = F.cross_entropy(scores, target)
        if self.symmetric:  # (B, W·B): each positive against every anchor of the global batch
            backward = cosine_matrix(positives, all_anchors) * self.scale
            loss = (loss + F.cross_entropy(backward, target)) / 2
        return loss


class SoftmaxLoss(nn.Module):
    """The SBERT classification objective: a softmax classifier over (u, v, |u - v|).

    What it optimises:
        Cross-entropy of a linear classifier that predicts the NLI label of (premise, hypothesis)
        from the concatenation (u, v, |u - v|) of their embeddings. The classifier is thrown away
        after training; the embeddings keep what it taught them.

    Args:
        dim: embedding dimension D.
        num_labels: 3 for NLI (entailment, neutral, contradiction).

    Inputs:
        columns: [premises (B, D), hypotheses (B, D)]; labels: (B,) class indices.

    References:
        Reimers & Gurevych 2019, "Sentence-BERT" (arXiv:1908.10084), section 3.
    """

    def __init__(self, dim: int, num_labels: int = 3):
        super().__init__()
        self.classifier = nn.Linear(3 * dim, num_labels)

    def forward(self, columns: list[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        if len(columns) != 2 or labels is None:
            raise ValueError("the softmax loss needs two columns (premise, hypothesis) and labels")
        u, v = columns
        features = torch.cat([u, v, (u - v).abs()], dim=-1)  # (B, 3D)
        logits = self.classifier(features.to(self.classifier.weight.dtype))  # (B, num_labels)
        return F.cross_entropy(logits, labels)
