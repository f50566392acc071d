"""Several processes, one global batch: torchrun launches, torch.distributed connects.

Processes are started by torchrun (``mnr train --nproc N`` execs it); each one runs the same
training loop on its slice of every global batch. The MNR loss all-gathers the candidates of all
processes, with gradient, so every anchor is ranked against the global batch; gradients are
averaged by DistributedDataParallel. Rank 0 alone evaluates, logs and saves.
"""

from __future__ import annotations

import gc
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """This process's device under torchrun: the GPU of its local rank, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_environment() -> torch.device | None:
    """Join the process group torchrun describes in the environment; return this process's device.

    Returns None outside torchrun. gloo on CPU, nccl on CUDA (one GPU per process).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    # DistributedDataParallel imports torch._dynamo. Imported *after* the group exists, dynamo keeps
    # references to it that destroy_process_group cannot drop, so the group's C++ object and its
    # gloo threads outlive shutdown() and are torn down during interpreter exit, where a worker
    # could die of SIGABRT ("terminate called without an active exception") after its work was
    # done. Imported first, it holds nothing, and shutdown() really ends the group.
    import torch._dynamo  # noqa: F401

    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group once every process has finished.

    The barrier makes each process wait until all have reached the end: none closes its
    connections while another still runs a collective (a last all-reduce, the checkpoint's
    gather), and no queued work is left on gloo's threads. Then the group is destroyed, which
    joins those threads while the interpreter is fully alive; for that, nothing may still hold the
    group, and a DistributedDataParallel wrapper does (its reducer): the caller drops its
    wrappers first, and a collection frees those held only by reference cycles.

    Call it on a normal end or a coordinated stop only: after an error on one process the others
    may be inside a collective that the barrier would pair with; there, exit without it and let
    torchrun stop the rest.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def process_group(clean_exits: tuple[type[BaseException], ...] = ()) -> Iterator[torch.device | None]:
    """``init_from_environment()`` ... ``shutdown()`` around a block (no-op outside torchrun).

    The group is shut down when the block ends normally or raises one of ``clean_exits``
    (exceptions every process raises at the same step, such as a stop on SIGTERM; the frames the
    exception passed through are cleared first, so the wrappers they held are freed); any other
    exception leaves it as it is (see ``shutdown``).
    """
    device = init_from_environment()
    try:
        yield device
    except clean_exits as e:
        traceback.clear_frames(e.__traceback__)
        shutdown()
        raise
    shutdown()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, D) on each of W processes -> (W·B, D), rank order, differentiable.

    The backward pass sums every process's gradient for this process's rows, so a candidate gets
    the gradient of every anchor it was ranked against, wherever that anchor lives.
    """
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor))


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W processes (the same shape) -> (W·B, ...), rank order, without gradient."""
    _, size = world()
    if size == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all processes (itself when not distributed)."""
    _, size = world()
    if size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / size


def gather_objects(obj) -> list:
    """``obj`` of every process, in rank order (``[obj]`` when not distributed); picklable objects."""
    _, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def any_process(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any process, so all of them take the same branch."""
    _, size = world()
    if size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return bool(value.item())


def launch(nproc: int, argv: list[str]) -> None:
    """Replace this process by ``torchrun --nproc-per-node nproc -m mnr <argv without --nproc>``.

    Never returns. The children find WORLD_SIZE in their environment and do not launch again;
    ``--nproc`` is taken out of their arguments because torchrun would read it as its own.
    """
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "mnr", *args]
    os.execv(sys.executable, command)
