"""Where a model runs and in which precision: the GPU when there is one, bf16 where it is faster.

bf16 autocast halves the cost of the encoder's matrix products on hardware that computes bf16
fast (NVIDIA GPUs of compute capability 8.0 and later; CPUs with AMX), and costs more than fp32
elsewhere: several times where it must be emulated (a MiniLM training step 4x slower on an Intel Xeon
without AVX-512 BF16), and even with the AVX-512 BF16 instructions but no AMX a bf16 matrix product ran
at half fp32's speed (an Intel Xeon VM: 165 against 310 GFLOP/s; MiniLM trained 1.5x and encoded 1.7x
slower in bf16). So on a CPU with bf16 instructions "auto" measures: a bf16 matrix product against an
fp32 one, once per process (``cpu_bf16_speedup``), and turns bf16 on only where it is clearly faster.

``MNR_CPU_BF16=1`` (or ``0``) makes the CPU check answer yes (or no) whatever the CPU: the test suite
then runs on any machine as it runs on one with (or without) native bf16 (emulated where the CPU lacks
it, so slower). --bf16 / --no-bf16 still win over it.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from mnr.errors import ConfigError


def check_device_name(name: str) -> None:
    """auto, cpu, cuda or cuda:N (whether this machine has it is ``resolve_device``'s to say)."""
    if not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_device(name: str = "auto") -> torch.device:
    """auto (the GPU when there is one), cpu, cuda or cuda:N."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and torch.version.cuda is None:
        version = torch.__version__.split("+")[0]
        raise ConfigError(f"--device {name}: the installed torch ({torch.__version__}) is a CPU-only build; install a "
                          f"CUDA build: pip install --force-reinstall torch=={version} --index-url "
                          f"https://download.pytorch.org/whl/cu128 (or make clean, then make test TORCH=\"torch=="
                          f"{version} --index-url https://download.pytorch.org/whl/cu128\")")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__} is a "
                          "CUDA build, but no GPU or driver was found)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is faster than fp32 on ``device``: a GPU that computes bf16 natively, or a CPU
    with bf16 instructions whose bf16 matrix products measured clearly faster than fp32's."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        forced = os.environ.get("MNR_CPU_BF16", "")
        if forced:
            if forced not in ("0", "1"):
                raise ConfigError(f"MNR_CPU_BF16 must be 0 or 1 (or unset), got {forced!r}")
            return forced == "1"
        return cpu_bf16_instructions() and cpu_bf16_speedup() >= BF16_SPEEDUP
    return False


BF16_SPEEDUP = 1.2  # bf16 must be this much faster than fp32 to be chosen (AMX: several times; a margin for noise)


def cpu_bf16_instructions() -> bool:
    """AVX-512 BF16 or AMX: without either, bf16 is emulated."""
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                    "_is_amx_tile_supported"))


@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster a bf16 matrix product of a small encoder's shape (1024 tokens x 384 -> 1536) runs
    than an fp32 one on this CPU, best of 5 each (about 0.1 s, once per process)."""
    a, b = torch.randn(1024, 384), torch.randn(384, 1536)

    def best(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: the kernel is chosen and its buffers made
        times = []
        for _ in range(5):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def choose_bf16(setting: bool | None, device: torch.device) -> tuple[bool, str]:
    """The precision to run in: ``setting`` when given (--bf16 / --no-bf16), else native bf16 or not;
    and why, in words."""
    if setting is not None:
        return setting, "as asked (--bf16)" if setting else "as asked (--no-bf16)"
    on = native_bf16(device)
    if device.type == "cpu" and os.environ.get("MNR_CPU_BF16"):
        return on, f"auto: MNR_CPU_BF16={int(on)} says this CPU {'computes' if on else 'lacks'} bf16 natively"
    if device.type == "cpu" and cpu_bf16_instructions():  # native_bf16 measured it (once per process)
        return on, (f"auto: this CPU's bf16 matrix products measured {cpu_bf16_speedup():.2f}x as fast as fp32's"
                    + ("" if on else f", not the {BF16_SPEEDUP}x that pays for bf16's rounding"))
    if on:
        return True, f"auto: this {device.type.upper()} computes bf16 natively"
    what = "GPU (compute capability < 8.0)" if device.type == "cuda" else "CPU (no AVX-512 BF16 or AMX)"
    return False, f"auto: this {what} would emulate bf16, slower than fp32"
