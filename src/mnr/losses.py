"""Losses over sentence embeddings, and what each one needs from the rest of the pipeline.

Every loss has the same call shape, ``loss(columns, labels) -> scalar``, where ``columns`` is a
list of (B, D) embedding tensors, one per data column (anchor, positive, negatives... or
premise, hypothesis), so the training loop never needs to know which loss it runs. What differs
between losses (the rows they train on, whether a batch may repeat a text, the settings they
read) each loss says itself, in the attributes of the ``Loss`` protocol; the trainer asks.

Adding a loss is one class with those attributes, its settings (a dataclass of ``mnr.settings.setting``
fields and their checks: each becomes a ``--flag`` and a TOML key) and an entry in ``LOSSES`` (which is what
``--loss NAME`` looks up); nothing in the configuration or the training loop changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mnr import distributed
from mnr.data import LABELLED, RANKING
from mnr.settings import check_types, require, setting


class Loss(Protocol):
    """What a training objective tells the trainer about itself."""

    input: ClassVar[str]  # the rows it trains on: data.RANKING (anchor, positive[, negatives]) or data.LABELLED
    in_batch_negatives: ClassVar[bool]  # other rows' texts are its negatives: no text may repeat in a batch
    cacheable: ClassVar[bool]  # its value depends on the embeddings only, so --mini-batch-size can cache them
    Settings: ClassVar[type]  # its own settings: a dataclass of mnr.settings.setting fields, checked on creation

    @classmethod
    def from_settings(cls, settings, dim: int, processes: int) -> Loss:
        """The loss with ``settings`` (a ``Settings``), for embeddings of size ``dim``, trained by ``processes``
        processes."""
        ...

    def __call__(self, columns: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor: ...

    # A ranking loss can also take ``exclude=Excluded(...)``: candidates left out of each anchor's softmax (--guide).
    # It says so with ``excludes = True``; the trainer passes ``exclude`` only to such a loss, and only with --guide.


@dataclass
class Excluded:
    """Candidates left out of a ranking loss's softmax (True: left out), e.g. the likely false negatives a guide model
    finds (``mnr.guide``). Laid out as ``MultipleNegativesRankingLoss`` lays out its scores."""

    candidates: torch.Tensor  # (B, W·B·(1+N)): anchor i against [positives of every process, negatives_1, ...]
    anchors: torch.Tensor  # (B, W·B): positive i against the anchors of every process (--symmetric's direction)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, p=2, dim=-1) @ F.normalize(b, p=2, dim=-1).T


@dataclass
class NoSettings:
    """The settings of a loss that has none."""


@dataclass
class MNRSettings:
    scale: float = setting(20.0, "mnr: cosine similarities are multiplied by this (1 / temperature)", weights=True)
    symmetric: bool = setting(False, "mnr: also rank anchors given each positive, and average both directions",
                              weights=True)

    def __post_init__(self):
        check_types(self)
        require(self, "scale", math.isfinite(self.scale) and self.scale > 0, "must be a positive number")


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
        gather: rank each anchor against the global batch of all processes (torch.distributed):
            candidates and anchors are all-gathered with gradient; anchor i of process r targets
            column r·B + i. The trainer sets it when it runs several processes.

    Inputs:
        columns: [anchors (B, D), positives (B, D), negatives (B, D) ...]; labels: ignored.
        exclude: an ``Excluded`` (or None): candidates left out of an anchor's softmax (and anchors left out of a
            positive's, with ``symmetric``), as a guide model's likely false negatives; never the row's own pair.

    References:
        Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply"
        (arXiv:1705.00652); Reimers & Gurevych, sentence-transformers MultipleNegativesRankingLoss.
    """

    input = RANKING
    in_batch_negatives = True
    cacheable = True
    excludes = True  # takes exclude=Excluded(...): candidates left out of each anchor's softmax
    Settings = MNRSettings

    def __init__(self, scale: float = 20.0, symmetric: bool = False, gather: bool = False):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale
        self.symmetric = symmetric
        self.gather = gather

    @classmethod
    def from_settings(cls, settings: MNRSettings, dim: int, processes: int) -> MultipleNegativesRankingLoss:
        return cls(scale=settings.scale, symmetric=settings.symmetric, gather=processes > 1)

    def forward(self, columns: list[torch.Tensor], labels: torch.Tensor | None = None,
                exclude: Excluded | None = None) -> torch.Tensor:
        if len(columns) < 2:
            raise ValueError(f"MNR needs anchors and positives (at least 2 columns), got {len(columns)}")
        anchors, positives = columns[0], columns[1]
        rank = distributed.world()[0] if self.gather else 0
        if self.gather:  # rank against the global batch: every process's positives and negatives
            candidate_columns = [distributed.gather_with_grad(c) for c in columns[1:]]
            all_anchors = distributed.gather_with_grad(anchors)
        else:
            candidate_columns, all_anchors = columns[1:], anchors
        candidates = torch.cat(candidate_columns)  # (W·B·(1+N), D): positives of every process, then negatives
        scores = cosine_matrix(anchors, candidates) * self.scale  # (B, W·B·(1+N))
        if exclude is not None:
            scores = scores.masked_fill(exclude.candidates, -math.inf)
        # anchor i of process r <-> its positive, row r·B + i of the gathered positives
        target = rank * len(anchors) + torch.arange(len(anchors), device=anchors.device)
        loss = F.cross_entropy(scores, target)
        if self.symmetric:  # (B, W·B): each positive against every anchor of the global batch
            backward = cosine_matrix(positives, all_anchors) * self.scale
            if exclude is not None:
                backward = backward.masked_fill(exclude.anchors, -math.inf)
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

    input = LABELLED
    in_batch_negatives = False  # each pair is classified on its own: a repeated premise is harmless
    cacheable = True
    Settings = NoSettings

    def __init__(self, dim: int, num_labels: int = 3):
        super().__init__()
        self.classifier = nn.Linear(3 * dim, num_labels)

    @classmethod
    def from_settings(cls, settings: NoSettings, dim: int, processes: int) -> SoftmaxLoss:
        return cls(dim, num_labels=3)

    def forward(self, columns: list[torch.Tensor], labels: torch.Tensor | None = None) -> torch.Tensor:
        if len(columns) != 2 or labels is None:
            raise ValueError("the softmax loss needs two columns (premise, hypothesis) and labels")
        u, v = columns
        features = torch.cat([u, v, (u - v).abs()], dim=-1)  # (B, 3D)
        logits = self.classifier(features.to(self.classifier.weight.dtype))  # (B, num_labels)
        return F.cross_entropy(logits, labels)


@dataclass
class MatryoshkaSettings:
    """Matryoshka training (Kusupati et al. 2022): the loss of every prefix of the embedding as well, so its first d
    values make an embedding of their own (an index of 64 dimensions costs a sixth of one of 384)."""

    matryoshka_dims: list[int] = setting([], "also train the embedding's first d values for each d, e.g. 384 256 128 "
                                             "64 32 (decreasing; each prefix renormalised by the loss's cosine): the "
                                             "loss is the weighted sum of the loss at every d (default: none, the "
                                             "whole embedding only)", weights=True, metavar="DIM")
    matryoshka_weights: list[float] = setting([], "the weight of each --matryoshka-dims loss (default: 1 each)",
                                              weights=True, metavar="WEIGHT")

    def __post_init__(self):
        check_types(self)
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        require(self, "matryoshka_dims", all(d >= 1 for d in dims), "must be positive")
        require(self, "matryoshka_dims", all(a > b for a, b in zip(dims, dims[1:], strict=False)),
                "must be decreasing, each once (e.g. 384 256 128 64 32)")
        require(self, "matryoshka_weights", not weights or len(weights) == len(dims),
                f"must give one weight per --matryoshka-dims value ({len(dims)})")
        require(self, "matryoshka_weights", all(math.isfinite(w) and w > 0 for w in weights),
                "must be positive numbers")


class Matryoshka(nn.Module):
    """Any loss over embeddings, computed on the first d values of every column for each d of ``dims`` and summed
    with ``weights`` (sentence-transformers' MatryoshkaLoss). One forward and one backward of the encoder serve
    every d (the columns are sliced, not re-embedded), so it composes with gradient caching, the packed layouts
    and gathered negatives across processes: the wrapped loss sees narrower embeddings, nothing else.

    With one d, the model's full dimension, it is the wrapped loss exactly.
    """

    def __init__(self, loss: nn.Module, dims: list[int], weights: list[float] | None = None):
        super().__init__()
        self.loss = loss
        self.dims = list(dims)
        self.weights = list(weights) if weights else [1.0] * len(self.dims)

    def forward(self, columns: list[torch.Tensor], labels: torch.Tensor | None = None, **given) -> torch.Tensor:
        """``given``: what the wrapped loss takes besides (e.g. ``exclude``), the same at every d."""
        return sum(weight * self.loss([c[:, :d] for c in columns], labels, **given)
                   for d, weight in zip(self.dims, self.weights, strict=True))


# --loss NAME -> the class. A new loss is a class with the attributes of ``Loss`` and an entry here.
LOSSES: dict[str, type[Loss]] = {"mnr": MultipleNegativesRankingLoss, "softmax": SoftmaxLoss}
