"""Where each command runs and in which precision, decided on this machine's CPU."""

from __future__ import annotations

import pytest
import torch

from mnr import device as mnr_device
from mnr.device import choose_bf16, native_bf16, resolve_device
from mnr.errors import ConfigError


def test_auto_is_the_gpu_when_there_is_one():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        resolve_device("gpu")


@pytest.mark.parametrize("build, gpu, message", [
    (None, False, r"--device cuda:0: the installed torch \(.*\) is a CPU-only build; install a CUDA build: pip "
                  r"install --force-reinstall torch==[\d.]+ --index-url .*/cu128 \(or make clean, then make test "
                  r"TORCH="),
    ("12.8", False, r"--device cuda:0: CUDA is not available on this machine \(torch .* is a CUDA build, but no "
                    r"GPU or driver was found\)"),
], ids=["cpu-build", "cuda-build-no-gpu"])
def test_cuda_without_cuda_says_why(monkeypatch, build, gpu, message):
    monkeypatch.setattr(torch.version, "cuda", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    with pytest.raises(ConfigError, match=message):
        resolve_device("cuda:0")


@pytest.mark.parametrize("avx512_bf16, amx, speedup, expected", [
    (True, True, 4.0, True),  # AMX: several times fp32's speed
    (True, False, 0.53, False),  # AVX-512 BF16 alone, as measured on an Intel Xeon VM: half fp32's speed
    (True, False, 1.6, True),  # instructions that pay, wherever they are
    (False, True, 1.3, True),
    (False, False, 9.9, False),  # no bf16 instructions: emulated, never measured
])
def test_bf16_is_on_where_the_cpu_computes_it_faster(monkeypatch, avx512_bf16, amx, speedup, expected):
    monkeypatch.delenv("MNR_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(mnr_device, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert native_bf16(cpu) is expected
    chosen, why = choose_bf16(None, cpu)
    assert chosen is expected and why.startswith("auto: ")
    if avx512_bf16 or amx:
        assert f"measured {speedup:.2f}x as fast as fp32's" in why
    assert choose_bf16(True, cpu) == (True, "as asked (--bf16)")  # a flag always wins
    assert choose_bf16(False, cpu) == (False, "as asked (--no-bf16)")


@pytest.mark.parametrize("capability, expected", [((8, 0), True), ((9, 0), True), ((7, 5), False)])
def test_bf16_is_on_for_gpus_from_ampere(monkeypatch, capability, expected):
    monkeypatch.setattr(mnr_device.torch.cuda, "get_device_capability", lambda device=None: capability)
    assert native_bf16(torch.device("cuda", 0)) is expected


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
@pytest.mark.parametrize("probes", [True, False], ids=["cpu-with-bf16", "cpu-without"])
def test_mnr_cpu_bf16_overrides_the_cpu_check(monkeypatch, value, expected, probes):
    """MNR_CPU_BF16 runs the suite on any CPU as it runs on one with (1) or without (0) native bf16."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probes)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: probes)
    monkeypatch.setenv("MNR_CPU_BF16", value)
    assert native_bf16(torch.device("cpu")) is expected
    chosen, why = choose_bf16(None, torch.device("cpu"))
    assert chosen is expected and why.startswith(f"auto: MNR_CPU_BF16={value} says")
    assert choose_bf16(not expected, torch.device("cpu"))[0] is (not expected)  # a flag still wins
    monkeypatch.setenv("MNR_CPU_BF16", "yes")
    with pytest.raises(ConfigError, match="MNR_CPU_BF16 must be 0 or 1 \\(or unset\\), got 'yes'"):
        native_bf16(torch.device("cpu"))


@pytest.mark.parametrize("native", [False, True], ids=["fp32", "bf16"])
def test_training_records_the_precision_it_chose(tiny_model_dir, nli_file, tmp_path, monkeypatch, caplog, native):
    import logging

    import tomllib

    from mnr.cli import main

    monkeypatch.delenv("MNR_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(mnr_device, "cpu_bf16_speedup", lambda: 3.0)
    output = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(nli_file), "--output", str(output),
                     "--batch-size", "4", "--max-seq-length", "32"]) == 0
    card = (output / "final" / "README.md").read_text()
    if native:
        assert "device: cpu; bf16 autocast (auto: this CPU's bf16 matrix products measured 3.00x as fast" in caplog.text
        assert "| precision | bf16 autocast (fp32 weights and loss) |" in card
    else:
        assert "device: cpu; fp32 (auto: this CPU (no AVX-512 BF16 or AMX) would emulate bf16" in caplog.text
        assert "| precision | fp32 |" in card
    assert tomllib.loads((output / "config.toml").read_text())["bf16"] is native


def test_commands_load_models_where_they_run(tiny_model_dir, tmp_path):
    from mnr.model import SentenceEncoder

    assert SentenceEncoder.load(str(tiny_model_dir), device="cpu").device == torch.device("cpu")
    assert SentenceEncoder.load(str(tiny_model_dir), device=torch.device("cpu")).device == torch.device("cpu")


def test_the_cpu_bf16_speedup_is_measured_once():
    first = mnr_device.cpu_bf16_speedup()
    assert first > 0 and mnr_device.cpu_bf16_speedup() is first  # one measurement per process


def test_a_resumed_run_keeps_the_precision_and_layout_it_began_with(tmp_path):
    """auto measures bf16 (CPU) and the layout (CUDA) when a run begins; measured again on resume they could
    come out otherwise, so the run's config.toml decides."""
    from mnr.config import TrainConfig
    from mnr.recipe import decided_when_it_began
    from mnr.rundir import RunDir

    (tmp_path / "config.toml").write_text('bf16 = true\nlayout = "jagged"\n')
    run = RunDir(tmp_path)
    resumed = decided_when_it_began(TrainConfig(output=str(tmp_path), resume=True), run)
    assert (resumed.training.bf16, resumed.model.layout) == (True, "jagged")
    asked = decided_when_it_began(TrainConfig(output=str(tmp_path), resume=True, bf16=False, layout="padded"), run)
    assert (asked.training.bf16, asked.model.layout) == (False, "padded")  # a flag given on resume still wins

