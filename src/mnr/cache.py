"""Gradient caching: a batch of thousands in the memory of a mini-batch (Gao et al. 2021, GradCache).

MNR's loss couples every text of a batch, but its gradient with respect to the *embeddings* is
small: (texts, D). So:

1. embed the batch in mini-batches without autograd (no activations kept), saving the RNG state
   before each, so dropout can be replayed;
2. compute the full-batch loss on those embeddings and back-propagate it to the embeddings only;
3. re-embed each mini-batch with autograd, under the same RNG state (the same dropout masks),
   and back-propagate its slice of the embedding gradient into the encoder.

Loss and parameter gradients equal those of embedding the same mini-batches in one graph; peak
memory is that of one mini-batch. The price is a second forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch


def rng_state(device: torch.device) -> tuple:
    """The RNG state dropout draws from on ``device`` (and the CPU's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def cached_backward(
    model: torch.nn.Module,
    loss_fn: Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor],
    ids: Sequence[Sequence[int]],
    batch_size: int,
    labels: torch.Tensor | None,
    mini_batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
    device: torch.device,
    is_finite: Callable[[torch.Tensor], bool],
) -> torch.Tensor | None:
    """Forward and backward of one batch with gradient caching; returns the loss (None if not finite).

    ``ids``: the token ids of every text of the batch, column-major (C·B lists); the loss sees them
    as C columns of ``batch_size``. ``model`` may be wrapped in DistributedDataParallel: gradients
    are then synchronised once, on the last mini-batch.
    """
    chunks = [ids[i : i + mini_batch_size] for i in range(0, len(ids), mini_batch_size)]
    states, pieces = [], []
    with torch.no_grad():  # 1. embeddings, no activations kept
        for chunk in chunks:
            states.append(rng_state(device))
            with autocast():
                pieces.append(model(chunk))
    after = rng_state(device)
    embeddings = torch.cat(pieces).float().requires_grad_()  # (C·B, D)
    loss = loss_fn(list(embeddings.split(batch_size)), labels)  # 2. the full-batch loss
    if not is_finite(loss):
        return None
    loss.backward()  # -> embeddings.grad; and the loss's own parameters (softmax classifier), if any
    grads = embeddings.grad.split([len(chunk) for chunk in chunks])
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for i, (chunk, grad) in enumerate(zip(chunks, grads, strict=True)):  # 3. replay with autograd
        set_rng_state(states[i], device)
        with no_sync() if i < len(chunks) - 1 else contextlib.nullcontext():
            with autocast():
                out = model(chunk)
            out.float().backward(grad)
    set_rng_state(after, device)  # as if each mini-batch had run once
    return loss.detach()
