"""One place decides how a forward is laid out: a forced --layout wins, auto measures where it measures
(CUDA; here the CPU is added to test it), every candidate is checked against padded, resume reuses the choice."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from mnr import layout as layouts
from mnr.cli import main
from mnr.errors import ModelError
from mnr.model import SentenceEncoder

from .conftest import SENTENCES

# on the CPU, SDPA's reference path unbinds the jagged batch through torch's older nested layout, which warns
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")


def batches(encoder: SentenceEncoder) -> list[list[list[int]]]:
    ids = encoder.tokenize(SENTENCES + ["word " * 40])
    return [ids[:9], ids[9:18], ids[18:]]


def fake_times(times: dict[str, float]):
    return lambda layout, batch: times[layout]


@pytest.mark.parametrize("backward", [False, True], ids=["encode", "train"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_every_layout_agrees_with_padded_and_the_fastest_is_kept(tiny_encoder, backward, bf16):
    """On the CPU every layout runs (jagged through SDPA's reference path) and agrees with padded within the
    tolerance for its precision; given measured times, the fastest is kept."""
    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    run = layouts.encoder_runner(tiny_encoder, autocast)
    for fastest in layouts.LAYOUTS:
        times = {name: 1.0 if name == fastest else 2.0 for name in layouts.LAYOUTS}
        choice = layouts.measure(run, batches(tiny_encoder), layouts.LAYOUTS, backward, bf16, fake_times(times))
        assert choice.rejected == {} and choice.layout == fastest and choice.times == times
    assert tiny_encoder.layout_in_use == "buckets" and tiny_encoder.layout == "auto"  # left as it was


def test_a_layout_that_disagrees_with_padded_is_rejected_however_fast(tiny_encoder):
    real = layouts.encoder_runner(tiny_encoder, lambda: torch.autocast("cpu", enabled=False))

    def broken_jagged(layout, batch, backward):
        embeddings, grads = real(layout, batch, backward)
        if layout == "jagged" and backward:  # right embeddings, one wrong gradient
            name = "transformer.encoder.layer.0.attention.self.value.weight"
            grads = {**grads, name: grads[name] * 1.1}
        elif layout == "jagged":
            embeddings = embeddings + 0.01 * embeddings.abs().max()
        return embeddings, grads

    times = fake_times({"padded": 3.0, "buckets": 2.0, "jagged": 1.0})
    for backward, problem in [(False, "embeddings differ from padded's"),
                              (True, "the gradient of transformer.encoder.layer.0.attention.self.value.weight")]:
        choice = layouts.measure(broken_jagged, batches(tiny_encoder), layouts.LAYOUTS, backward, False, times)
        assert choice.layout == "buckets" and set(choice.times) == {"padded", "buckets"}
        assert choice.rejected["jagged"].startswith(problem)
        assert "jagged rejected: " in choice.describe()


def test_the_layout_setting_is_checked(tiny_encoder):
    with pytest.raises(ModelError, match="--layout must be one of auto, padded, buckets, jagged, got 'flat'"):
        tiny_encoder.set_layout("flat")
    import transformers

    config = transformers.DistilBertConfig(vocab_size=tiny_encoder.tokenizer.vocab_size, dim=32, n_layers=1,
                                           n_heads=2, hidden_dim=64)
    other = SentenceEncoder(transformers.DistilBertModel(config), tiny_encoder.tokenizer)
    assert not other.enable_packing() and other.layout_in_use == "padded"
    with pytest.raises(ModelError, match="--layout jagged: this model \\(distilbert\\) cannot run packed"):
        other.set_layout("jagged")


def train_args(model, data, output, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
            "--max-seq-length", "32", "--epochs", "2", "--save-every", "0", *extra]


def read_log(output):
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def measuring_here(monkeypatch):
    """auto measures on this CPU too, with times that make ``fastest`` win."""
    monkeypatch.setattr(layouts, "MEASURED_DEVICES", ("cuda", "cpu"))
    fastest = {"layout": "jagged"}
    monkeypatch.setattr(layouts, "_timed", lambda run, layout, batch, backward: 1.0 if layout == fastest["layout"]
                        else 2.0)
    return fastest


def test_training_measures_records_and_names_the_layout(no_dropout_model, nli_file, tmp_path, caplog,
                                                        measuring_here):
    output = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(train_args(no_dropout_model, nli_file, output)) == 0
    assert "layout for train: jagged, auto: the fastest forward and backward on this device (jagged 1000.0 ms" \
        in caplog.text
    assert 'layout = "jagged"' in (output / "config.toml").read_text()
    card = (output / "final" / "README.md").read_text()
    assert "| layout | jagged, auto: the fastest forward and backward on this device (" in card
    # the forcing setting wins: nothing is measured
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(train_args(no_dropout_model, nli_file, tmp_path / "forced", "--layout", "padded")) == 0
    assert "layout: padded, as asked (--layout padded)" in caplog.text and "layout for train" not in caplog.text


def test_a_resumed_run_reuses_the_layout_it_measured(no_dropout_model, nli_file, tmp_path, monkeypatch,
                                                     measuring_here):
    import os
    import signal

    import mnr.train as t

    reference = tmp_path / "reference"
    assert main(train_args(no_dropout_model, nli_file, reference, "--layout", "jagged")) == 0
    output = tmp_path / "run"
    real, calls = t.train_step, []

    def stop_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(t, "train_step", stop_at_step_2)
    assert main(train_args(no_dropout_model, nli_file, output)) == 143  # measured: jagged
    monkeypatch.setattr(t, "train_step", real)
    measuring_here["layout"] = "buckets"  # measuring again would now choose buckets
    assert main(train_args(no_dropout_model, nli_file, output, "--resume")) == 0
    assert 'layout = "jagged"' in (output / "config.toml").read_text()
    a, b = (load_file(d / "final" / "model.safetensors") for d in (reference, output))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_old_config_files_with_packing_still_load(tmp_path):
    from mnr.config import TrainConfig

    path = tmp_path / "old.toml"
    path.write_text("packing = false\n")
    assert TrainConfig.from_sources(str(path)).model.layout == "padded"
    path.write_text("packing = true\n")
    assert TrainConfig.from_sources(str(path)).model.layout == "auto"


def test_with_gradient_caching_the_measured_batches_are_chunks(no_dropout_model, nli_file, tmp_path, monkeypatch,
                                                               measuring_here):
    """A cached run never holds a whole batch's activations: measuring must not either."""
    sizes = []
    real = SentenceEncoder.choose_layout

    def recording(self, work, batches, bf16):
        sizes.extend(len(batch) for batch in batches)
        return real(self, work, batches, bf16)

    monkeypatch.setattr(SentenceEncoder, "choose_layout", recording)
    assert main(train_args(no_dropout_model, nli_file, tmp_path / "run", "--mini-batch-size", "3")) == 0
    assert sizes == [3, 3, 2]  # the first batch's 8 texts (4 pairs), 3 at a time
