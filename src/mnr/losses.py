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
    finds (``mnr.guide``). Laid out as ``MultipleNegativesRankingLoss`` lays out its scores, one block per direction
    (a direction the loss does not rank may be None)."""

    candidates: torch.Tensor  # query_to_doc (B, W·B·(1+N)): anchor i against [positives of every process, negatives]
    anchors: torch.Tensor | None  # doc_to_query (B, W·B): positive i against the anchors of every process
    queries: torch.Tensor | None = None  # query_to_query (B, W·B): anchor i against the anchors of every process
    documents: torch.Tensor | None = None  # doc_to_doc (B, W·B·(1+N)): positive i against every document


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) cosine similarities."""
    return F.normalize(a, p=2, dim=-1) @ F.normalize(b, p=2, dim=-1).T


@dataclass
class NoSettings:
    """The settings of a loss that has none."""


DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITIONS = ("joint", "per_direction")
HARDNESS = ("none", "in_batch_negatives", "hard_negatives", "all_negatives")


@dataclass
class MNRSettings:
    scale: float = setting(20.0, "mnr: cosine similarities are multiplied by this (1 / temperature)", weights=True)
    symmetric: bool = setting(False, "mnr: also rank anchors given each positive, and average both directions (the "
                                     "same as --directions query_to_doc doc_to_query --partition-mode per_direction)",
                              weights=True)
    directions: list[str] = setting(["query_to_doc"], "mnr: which scores compete with each anchor's positive: "
                                    "query_to_doc (the anchor against every document of the batch: positives and "
                                    "negatives; always on), query_to_query (against the other anchors), doc_to_query "
                                    "(the positive against every anchor), doc_to_doc (the positive against the other "
                                    "rows' documents): GTE's improved contrastive loss is all four, joint; as "
                                    "sentence-transformers' directions", weights=True, metavar="DIRECTION")
    partition_mode: str = setting("joint", "mnr: joint (one softmax over every direction's scores) or per_direction "
                                           "(a softmax per direction, averaged; query_to_doc and doc_to_query only)",
                                  weights=True)
    hardness_mode: str = setting("none", "mnr: add --hardness-strength x cosine (no gradient) to the scores of "
                                         "in_batch_negatives (other rows' documents), hard_negatives (the row's own "
                                         "negatives) or all_negatives, so harder negatives weigh more (Lan et al. "
                                         "2025; EmbeddingGemma), as sentence-transformers' hardness_mode (none: off)",
                                 weights=True)
    hardness_strength: float = setting(0.0, "mnr: the alpha of --hardness-mode (Lan et al. 9, EmbeddingGemma 5)",
                                       weights=True)

    def __post_init__(self):
        check_types(self)
        require(self, "scale", math.isfinite(self.scale) and self.scale > 0, "must be a positive number")
        directions = self.directions
        require(self, "directions", set(directions) <= set(DIRECTIONS), f"must be among {', '.join(DIRECTIONS)}")
        require(self, "directions", "query_to_doc" in directions and len(set(directions)) == len(directions),
                "must include query_to_doc (it holds the positive pair), each once")
        require(self, "partition_mode", self.partition_mode in PARTITIONS, f"must be {' or '.join(PARTITIONS)}")
        require(self, "partition_mode", self.partition_mode == "joint" or
                not {"query_to_query", "doc_to_doc"} & set(directions),
                "per_direction takes query_to_doc and doc_to_query only: query_to_query and doc_to_doc hold no "
                "positive of their own (use joint)")
        require(self, "symmetric", not self.symmetric or (directions == ["query_to_doc"] and
                                                           self.partition_mode == "joint"),
                "is --directions query_to_doc doc_to_query --partition-mode per_direction: give one or the other")
        require(self, "hardness_mode", self.hardness_mode in HARDNESS, f"must be one of {', '.join(HARDNESS)}")
        require(self, "hardness_strength", math.isfinite(self.hardness_strength) and self.hardness_strength >= 0,
                "must be a number >= 0")
        require(self, "hardness_strength", (self.hardness_mode == "none") == (self.hardness_strength == 0),
                "and --hardness-mode go together: a mode without a strength (or a strength without a mode) does "
                "nothing")


class MultipleNegativesRankingLoss(nn.Module):
    """Multiple Negatives Ranking loss (in-batch negatives, InfoNCE), and its variants by direction.

    What it optimises:
        For anchor i, its own positive must be more similar than every other candidate in the
        batch: the other anchors' positives, and every hard negative (extra columns). The scores
        are cosine similarities times ``scale``; the loss is cross-entropy over the candidates.
        The candidates are laid out as [positives (B), negatives_1 (B), ...], so anchor i's true
        candidate is column i: the target of row i is i.

    Args:
        scale: 1 / temperature. 20 (temperature 0.05) is the value of Henderson et al. and
            sentence-transformers.
        directions: the blocks of scores that compete with the positive pair: ``query_to_doc`` (the
            above; always), ``query_to_query`` (anchor i against the other anchors), ``doc_to_query``
            (positive i against every anchor), ``doc_to_doc`` (positive i against every document
            but row i's own). All four in one softmax is GTE's improved contrastive loss (Li et al.
            2023); ``doc_to_query`` averaged with ``query_to_doc`` is the symmetric loss. Hard
            negatives take part as documents only, since they have no anchor of their own.
        partition_mode: ``joint``, one softmax over every direction's scores; ``per_direction``, one
            cross-entropy per direction, averaged (directions that hold the positive pair only).
        hardness_mode, hardness_strength: add ``strength x cosine`` (no gradient) to the
            ``query_to_doc`` scores of other rows' documents (``in_batch_negatives``, Lan et al.
            2025), of the row's own negatives (``hard_negatives``, EmbeddingGemma) or of both
            (``all_negatives``): a harder negative weighs more in the softmax.
        gather: rank each anchor against the global batch of all processes (torch.distributed):
            candidates and anchors are all-gathered with gradient; anchor i of process r targets
            column r·B + i. The trainer sets it when it runs several processes.

    The arguments are sentence-transformers' (``MultipleNegativesRankingLoss(directions=...,
    partition_mode=..., hardness_mode=..., hardness_strength=...)``); tests check the losses and
    gradients equal theirs.

    Inputs:
        columns: [anchors (B, D), positives (B, D), negatives (B, D) ...]; labels: ignored.
        exclude: an ``Excluded`` (or None): candidates left out of an anchor's softmax (in each direction ranked),
            as a guide model's likely false negatives; never the row's own pair.

    References:
        Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply"
        (arXiv:1705.00652); Reimers & Gurevych, sentence-transformers MultipleNegativesRankingLoss;
        Li et al. 2023, "Towards General Text Embeddings with Multi-stage Contrastive Learning"
        (arXiv:2308.03281); Lan et al. 2025, "LLaVE" (arXiv:2503.04812).
    """

    input = RANKING
    in_batch_negatives = True
    cacheable = True
    excludes = True  # takes exclude=Excluded(...): candidates left out of each anchor's softmax
    Settings = MNRSettings

    def __init__(self, scale: float = 20.0, symmetric: bool = False, gather: bool = False,
                 directions: tuple[str, ...] = ("query_to_doc",), partition_mode: str = "joint",
                 hardness_mode: str = "none", hardness_strength: float = 0.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale
        if symmetric:  # the two directions, a softmax each
            directions, partition_mode = ("query_to_doc", "doc_to_query"), "per_direction"
        self.directions, self.partition_mode = tuple(directions), partition_mode
        self.hardness_mode, self.hardness_strength = hardness_mode, hardness_strength
        self.gather = gather

    @property
    def symmetric(self) -> bool:
        return set(self.directions) == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction"

    @classmethod
    def from_settings(cls, settings: MNRSettings, dim: int, processes: int) -> MultipleNegativesRankingLoss:
        return cls(scale=settings.scale, symmetric=settings.symmetric, gather=processes > 1,
                   directions=tuple(settings.directions), partition_mode=settings.partition_mode,
                   hardness_mode=settings.hardness_mode, hardness_strength=settings.hardness_strength)

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
        # anchor i of process r <-> its positive, row r·B + i of the gathered positives
        target = rank * len(anchors) + torch.arange(len(anchors), device=anchors.device)
        own = None  # own[i, j]: candidate j is one of row i's documents (only where a block needs it)
        if self.hardness_mode != "none" or {"query_to_query", "doc_to_doc"} & set(self.directions):
            own = torch.arange(len(candidates), device=anchors.device) % len(all_anchors) == target.unsqueeze(1)
        cosine = cosine_matrix(anchors, candidates)  # (B, W·B·(1+N)): own[i, j], j is one of row i's documents
        scores = cosine * self.scale
        if self.hardness_mode != "none":  # a harder negative weighs more; no gradient through the weight
            scores = scores + self.hardness_strength * cosine.detach() * self._hard(own, len(all_anchors))
        blocks = [_left_out(scores, exclude and exclude.candidates)]  # query_to_doc
        if "query_to_query" in self.directions:  # (B, W·B): each anchor against the others
            block = cosine_matrix(anchors, all_anchors) * self.scale
            block = block.masked_fill(own[:, :len(all_anchors)], -math.inf)  # own's first W·B columns: itself
            blocks.append(_left_out(block, exclude and exclude.queries))
        if "doc_to_query" in self.directions:  # (B, W·B): each positive against every anchor
            blocks.append(_left_out(cosine_matrix(positives, all_anchors) * self.scale, exclude and exclude.anchors))
        if "doc_to_doc" in self.directions:  # each positive against every document but its row's own
            block = (cosine_matrix(positives, candidates) * self.scale).masked_fill(own, -math.inf)
            blocks.append(_left_out(block, exclude and exclude.documents))
        if self.partition_mode == "per_direction":  # every block's column target is the positive pair
            return sum(F.cross_entropy(block, target) for block in blocks) / len(blocks)
        return F.cross_entropy(blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1), target)

    def _hard(self, own: torch.Tensor, width: int) -> torch.Tensor:
        """Where --hardness-mode weighs the query_to_doc scores (1.0) and where not (0.0); ``own``: row i's documents,
        ``width``: W·B, the positives' columns."""
        if self.hardness_mode == "in_batch_negatives":  # the other rows' documents
            chosen = ~own
        elif self.hardness_mode == "hard_negatives":  # the row's own negatives
            chosen = own.clone()
            chosen[:, :width] = False
        else:  # all_negatives: everything but the positive
            chosen = own.clone()
            chosen[:, width:] = False
            chosen = ~chosen
        return chosen.float()


def _left_out(scores: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``scores`` with the candidates ``out`` (a guide's, or None) left out of the softmax."""
    return scores if out is None else scores.masked_fill(out, -math.inf)


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
