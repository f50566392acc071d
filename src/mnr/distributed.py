"""Several processes, one global batch: torchrun launches, torch.distributed connects.

Processes are started by torchrun (``mnr train --nproc N`` execs it); each one runs the same
training loop on its slice of every global batch. The MNR loss all-gathers the candidates of all
processes, with gradient, so every anchor is ranked against the global batch; gradients are
averaged by DistributedDataParallel. Rank 0 alone evaluates, logs and saves.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment() -> torch.device | None:
    """Join the process group torchrun describes in the environment; return this process's device.

    Returns None outside torchrun. gloo on CPU, nccl on CUDA (one GPU per process).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, D) on each of W processes -> (W·B, D), rank order, differentiable.

    The backward pass sums every process's gradient for this process's rows, so a candidate gets
    the gradient of every anchor it was ranked against, wherever that anchor lives.
    """
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor))


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """(B, D) on each of W processes -> (W·B, D), rank order, no gradient."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over all processes (itself when not distributed)."""
    _, size = world()
    if size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / size


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
