"""Where a model runs and in which precision: the GPU when there is one, bf16 where it is native.

bf16 autocast halves the cost of the encoder's matrix products on hardware that computes bf16
natively (NVIDIA GPUs of compute capability 8.0 and later; CPUs with AVX-512 BF16 or AMX), and
costs several times fp32 where it must be emulated (measured: a MiniLM training step 4x slower
on an Intel Xeon with AVX-512 but without AVX-512 BF16). So "auto" turns it on only where it is
native.

``MNR_CPU_BF16=1`` (or ``0``) makes the CPU check answer yes (or no) whatever the CPU: the test suite
then runs on any machine as it runs on one with (or without) native bf16 (emulated where the CPU lacks
it, so slower). --bf16 / --no-bf16 still win over it.
"""

from __future__ import annotations

import os

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
    """Whether ``device`` computes bf16 natively (so bf16 autocast is faster there, not slower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        forced = os.environ.get("MNR_CPU_BF16", "")
        if forced:
            if forced not in ("0", "1"):
                raise ConfigError(f"MNR_CPU_BF16 must be 0 or 1 (or unset), got {forced!r}")
            return forced == "1"
        cpu = torch.cpu
        return any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))
    return False


def choose_bf16(setting: bool | None, device: torch.device) -> tuple[bool, str]:
    """The precision to run in: ``setting`` when given (--bf16 / --no-bf16), else native bf16 or not;
    and why, in words."""
    if setting is not None:
        return setting, "as asked (--bf16)" if setting else "as asked (--no-bf16)"
    if device.type == "cpu" and os.environ.get("MNR_CPU_BF16"):
        on = native_bf16(device)
        return on, f"auto: MNR_CPU_BF16={int(on)} says this CPU {'computes' if on else 'lacks'} bf16 natively"
    if native_bf16(device):
        return True, f"auto: this {device.type.upper()} computes bf16 natively"
    what = "GPU (compute capability < 8.0)" if device.type == "cuda" else "CPU (no AVX-512 BF16 or AMX)"
    return False, f"auto: this {what} would emulate bf16, slower than fp32"
