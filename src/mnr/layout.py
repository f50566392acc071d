"""How an encoder's forward is laid out, decided in one place.

Three layouts compute the same embeddings and gradients (the tests compare them in value and gradient):

* ``padded``: every text padded to the longest of the batch (transformers' own SDPA path); any model.
* ``buckets``: the real tokens packed into one sequence, attention in blocks of texts of similar length
  (``mnr.packing``): no FLOP on padding outside attention. BERT and RoBERTa families.
* ``jagged``: packed, attention one variable-length (nested tensor) SDPA call per layer: no Python loop,
  no filler; fused kernels on CUDA, a slow reference path elsewhere.

``--layout`` forces one. ``auto`` (the default) chooses:

* on a CPU, ``buckets`` (padded where the architecture cannot pack), without measuring: it was the fastest
  at every batch shape ``bench/speed.py`` tried, and a fixed choice keeps two runs bitwise equal;
* on CUDA, by measurement, as ``torch.backends.cudnn.benchmark`` does: each candidate runs the first
  batches of the work at hand (forward and backward for training, forward for ``encode``), is checked
  against ``padded`` (same embeddings, and gradients, within a tolerance for the precision), and the
  fastest that agrees is kept. Its cost (a few batches per candidate) is reported with the choice; a
  resumed run reuses the recorded choice instead of measuring again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

LAYOUTS = ("padded", "buckets", "jagged")
SETTINGS = ("auto", *LAYOUTS)
MEASURED_BATCHES = 3  # first batches timed per candidate (after one warm-up run each)
MEASURED_DEVICES = ("cuda",)  # where auto measures (a CPU keeps buckets: see above)
# Agreement with padded: the largest difference, relative to the largest value (embeddings, each gradient).
# It catches a layout that computes something else, not rounding: fp32 differs by summation order (~1e-6);
# bf16 rounds to 8 bits, and jagged's bf16 gradients on an H200 were within 10% of padded's (tests/test_packing.py).
TOLERANCE = {False: 1e-3, True: 1e-1}  # bf16 off / on


@dataclass
class Choice:
    """The layout a forward uses, and how it was chosen."""

    layout: str
    how: str  # in words, for the log and the model card
    times: dict[str, float] = field(default_factory=dict)  # seconds per batch of each candidate that agreed
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why it was left out
    seconds: float = 0.0  # what choosing cost

    def describe(self) -> str:
        timed = ", ".join(f"{name} {1000 * t:.1f} ms" for name, t in sorted(self.times.items(), key=lambda x: x[1]))
        rejected = "".join(f"; {name} rejected: {why}" for name, why in self.rejected.items())
        measured = f" ({timed} per batch{rejected}; choosing took {self.seconds:.1f} s)" if self.times else ""
        return f"{self.layout}, {self.how}{measured}"


def candidates(packable: bool) -> tuple[str, ...]:
    return LAYOUTS if packable else ("padded",)


def default(device: torch.device, packable: bool) -> str:
    """The layout ``auto`` starts from before (or without) measuring."""
    if not packable:
        return "padded"
    return "jagged" if device.type == "cuda" else "buckets"


def measures(device: torch.device, packable: bool) -> bool:
    """Whether ``auto`` measures on ``device`` (and has more than one layout to measure)."""
    return packable and device.type in MEASURED_DEVICES


def measure(run: Callable[[str, Sequence, bool], tuple[torch.Tensor, dict]], batches: Sequence, names: Sequence[str],
            backward: bool, bf16: bool, timer: Callable[[str, Sequence], float] | None = None) -> Choice:
    """Choose among the layouts ``names`` on ``batches`` (lists of token id lists).

    ``run(layout, batch, backward)`` returns the embeddings (and the gradients by parameter name when
    ``backward``) of one batch in that layout, with dropout off; ``timer(layout, batch)`` the seconds one
    batch takes in it (default: ``run`` timed after one warm-up, the device synchronised). Each candidate
    is compared with ``padded`` first: one that disagrees is rejected, whatever its speed.
    """
    start = time.perf_counter()
    timer = timer or (lambda layout, batch: _timed(run, layout, batch, backward))
    reference = [run("padded", batch, backward) for batch in batches]
    times, rejected = {}, {}
    for name in names:
        if name != "padded":
            problem = _disagreement([run(name, batch, backward) for batch in batches], reference, bf16)
            if problem:
                rejected[name] = problem
                continue
        times[name] = sum(timer(name, batch) for batch in batches) / len(batches)
    best = min(times, key=times.get)
    what = "forward and backward" if backward else "forward"
    return Choice(best, f"auto: the fastest {what} on this device", times, rejected, time.perf_counter() - start)


def _timed(run, layout: str, batch, backward: bool) -> float:
    run(layout, batch, backward)  # warm-up: kernel selection, allocations
    _synchronize()
    start = time.perf_counter()
    run(layout, batch, backward)
    _synchronize()
    return time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _disagreement(outputs, reference, bf16: bool) -> str:
    """Why ``outputs`` are not ``reference``'s (embeddings, gradients) within the tolerance; "" when they agree."""
    tolerance = TOLERANCE[bf16]
    for (embeddings, grads), (want, want_grads) in zip(outputs, reference, strict=True):
        error = (embeddings.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        if not error <= tolerance * scale:  # NaN fails too
            return f"embeddings differ from padded's by {error:.3g} (scale {scale:.3g})"
        # each gradient against its own size, but never below 1% of the model's largest: a gradient that is
        # zero in exact arithmetic (a key bias) is rounding noise in every layout
        grad_scale = max((g.abs().max().item() for g in want_grads.values()), default=0.0)
        for name, want_grad in want_grads.items():
            error = (grads[name] - want_grad).abs().max().item()
            scale = max(want_grad.abs().max().item(), 0.01 * grad_scale)
            if not error <= tolerance * scale:
                return f"the gradient of {name} differs from padded's by {error:.3g} (scale {scale:.3g})"
    return ""


def encoder_runner(encoder, autocast: Callable[[], contextlib.AbstractContextManager]):
    """``run`` for ``measure``: one batch through ``encoder`` in a layout (dropout off, RNG untouched), and the
    gradients of a fixed function of the embeddings when ``backward``."""
    def run(layout: str, batch, backward: bool) -> tuple[torch.Tensor, dict]:
        was_training, previous = encoder.training, encoder.override
        encoder.eval()
        encoder.use_layout(layout)
        try:
            with torch.set_grad_enabled(backward), autocast():
                embeddings = encoder(batch)
            grads = {}
            if backward:
                # a fixed, uneven weighting of every value, so each gradient entry depends on the layout's output
                weights = torch.linspace(-1, 1, embeddings.numel(), device=embeddings.device).view_as(embeddings)
                (embeddings.float() * weights).sum().backward()
                grads = {name: p.grad.detach().clone() for name, p in encoder.named_parameters() if p.grad is not None}
                encoder.zero_grad(set_to_none=True)
            return embeddings.detach(), grads
        finally:
            encoder.use_layout(previous)
            encoder.train(was_training)
    return run
