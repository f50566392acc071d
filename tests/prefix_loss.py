"""A loss added in one file, nothing else touched: MNR averaged over prefixes of the embedding (the first d
values of each, renormalised, for each d of its own setting ``dims``, a list of integers). Importing this file
registers it: ``--loss prefix --dims 16 8`` on the command line, ``dims = [16, 8]`` in a config file, and its
check (``dims`` decreasing and positive) before any model loads. tests/test_extending.py uses it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnr.data import RANKING
from mnr.losses import LOSSES, MultipleNegativesRankingLoss
from mnr.settings import check_types, require, setting


@dataclass
class PrefixSettings:
    dims: list[int] = setting([16, 8], "prefix: the prefix lengths of the embedding each trained with MNR, "
                                       "decreasing", weights=True)

    def __post_init__(self):
        check_types(self)
        require(self, "dims", bool(self.dims) and all(d > 0 for d in self.dims), "must be positive integers")
        require(self, "dims", all(a > b for a, b in zip(self.dims, self.dims[1:], strict=False)), "must be decreasing")


class PrefixLoss(torch.nn.Module):
    """The mean of MNR over the embeddings' first d values, for each d of ``dims``."""

    input = RANKING
    in_batch_negatives = True
    cacheable = True
    Settings = PrefixSettings

    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims
        self.mnr = MultipleNegativesRankingLoss()

    @classmethod
    def from_settings(cls, settings: PrefixSettings, dim: int, processes: int) -> PrefixLoss:
        if settings.dims[0] > dim:
            raise ValueError(f"dims: {settings.dims[0]} is above the model's {dim}")
        return cls(settings.dims)

    def forward(self, columns, labels=None):
        return sum(self.mnr([c[:, :d] for c in columns]) for d in self.dims) / len(self.dims)


LOSSES["prefix"] = PrefixLoss
