"""Dropout whose random mask is cheap on CPU.

torch draws a CPU dropout mask one element at a time (``bernoulli_`` on a Mersenne Twister, in
one thread): about 14 ns an element, a sixth of a MiniLM training step after packing. We draw
64-bit integers instead (one Mersenne Twister draw each) and cut each into three 16-bit uniforms,
so a mask costs a third of the draws and no float conversion. The drop probability is rounded
to a multiple of 1/65536 (0.1 becomes 0.100006) and the kept values are scaled by the exact
1 / (1 - p) of that rounded p, so the expectation is unchanged. The draws come from torch's
default generator: ``torch.manual_seed`` and ``torch.get_rng_state`` cover them as before. On
CUDA, torch's own dropout is fast and is used unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean CPU mask of ``shape``, False with probability ~p; and 1 / (1 - p_rounded)."""
    n = shape.numel()
    draws = torch.empty((n + 2) // 3, dtype=torch.int64).random_()  # 63 random bits: the top lane has 15
    lanes = draws.view(torch.int16).view(-1, 4)[:, :3]  # three uniform 16-bit lanes per draw, in [-2^15, 2^15)
    dropped = round(p * 65536)
    keep = lanes.reshape(-1)[:n] >= dropped - 32768
    return keep.view(shape), 65536 / (65536 - dropped)


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, keeping only the boolean mask for the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop-in for ``F.dropout`` (not in place)."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or p >= 1:
        return F.dropout(x, p, training)
    keep, scale = keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, scale)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the cheap CPU mask; a subclass, so ``.p`` and isinstance checks keep working."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module) -> None:
    """Replace every ``nn.Dropout`` inside ``module`` by ``FastDropout`` with the same p."""
    for name, child in module.named_children():
        if type(child) is nn.Dropout:
            setattr(module, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
