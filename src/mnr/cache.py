"""Gradient caching: a batch of thousands in the memory of a mini-batch (Gao et al. 2021, GradCache).

MNR's loss couples every text of a batch, but its gradient with respect to the *embeddings* is
small: (texts, D). So a cached step is:

1. ``embed_without_graph``: embed the batch in mini-batches without autograd (no activations
   kept), remembering the RNG state before each, so dropout can be replayed;
2. the caller computes the full-batch loss on those embeddings and back-propagates it to the
   embeddings only (and to the loss's own parameters, if any), exactly as an uncached step does;
3. ``replay_with_gradients``: re-embed each mini-batch with autograd under the same RNG state
   (the same dropout masks) and back-propagate its slice of the embedding gradient into the
   encoder.

Loss and parameter gradients equal those of embedding the same mini-batches in one graph; peak
memory is that of one mini-batch. The price is a second forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Autocast = Callable[[], contextlib.AbstractContextManager]


def rng_state(device: torch.device) -> tuple:
    """The RNG state dropout draws from on ``device`` (and the CPU's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@dataclass
class Replay:
    """What ``replay_with_gradients`` needs: the mini-batches and the RNG state before and after each pass."""

    chunks: list[Sequence[Sequence[int]]]
    skips: list[Sequence[int] | None]  # each chunk's prompt tokens left out of pooling (None: none)
    states: list[tuple]  # the RNG state before each chunk's forward
    after: tuple  # the RNG state after the last one
    device: torch.device


def embed_without_graph(model: torch.nn.Module, ids: Sequence[Sequence[int]], mini_batch_size: int,
                        autocast: Autocast, device: torch.device,
                        skip: Sequence[int] | None = None) -> tuple[torch.Tensor, Replay]:
    """(N, D) fp32 embeddings of the token id lists ``ids``, ``mini_batch_size`` texts at a time, with
    no activations kept; they require grad, so a loss on them back-propagates to them only. ``skip``: the
    model's pooling argument (tokens of each text left out), if any."""
    starts = range(0, len(ids), mini_batch_size)
    chunks = [ids[i : i + mini_batch_size] for i in starts]
    skips = [skip[i : i + mini_batch_size] if skip is not None else None for i in starts]
    states, pieces = [], []
    with torch.no_grad():
        for chunk, chunk_skip in zip(chunks, skips, strict=True):
            states.append(rng_state(device))
            with autocast():
                pieces.append(model(chunk, chunk_skip))
    replay = Replay(chunks, skips, states, rng_state(device), device)
    return torch.cat(pieces).float().requires_grad_(), replay


def replay_with_gradients(model: torch.nn.Module, replay: Replay, grad: torch.Tensor, autocast: Autocast) -> None:
    """Back-propagate ``grad`` (N, D), the loss's gradient with respect to the embeddings, into
    ``model``'s parameters by re-running each mini-batch with autograd under its saved RNG state.

    ``model`` may be wrapped in DistributedDataParallel: gradients are then synchronised once, on
    the last mini-batch. The RNG ends where one pass of the batch leaves it.
    """
    grads = grad.split([len(chunk) for chunk in replay.chunks])
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    last = len(replay.chunks) - 1
    for i, (chunk, chunk_grad) in enumerate(zip(replay.chunks, grads, strict=True)):
        set_rng_state(replay.states[i], replay.device)
        with no_sync() if i < last else contextlib.nullcontext():
            with autocast():
                out = model(chunk, replay.skips[i])
            out.float().backward(chunk_grad)
    set_rng_state(replay.after, replay.device)
