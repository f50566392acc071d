"""Two CPU processes (gloo) on a global batch of 2k must equal one process on the same 2k rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mnr.config import TrainConfig
from mnr.model import SentenceEncoder
from mnr.train import forward_backward, prepare

from .conftest import SENTENCES

WORKER = """
import json, sys, torch
from mnr import distributed
from mnr.config import TrainConfig
from mnr.train import forward_backward, prepare

distributed.init_from_environment()
config = TrainConfig(**json.loads(sys.argv[1]))
s = prepare(config)
rank, world_size = distributed.world()
assert world_size == 2
k = config.batch_size
loss = forward_backward(s, list(range(rank * k, (rank + 1) * k)), config)  # rank r holds rows r*k .. r*k+k-1
if rank == 0:
    torch.save({"loss": loss, "grads": {n: p.grad for n, p in s.encoder.named_parameters() if p.grad is not None}},
               sys.argv[2])
distributed.shutdown()
"""


def torchrun(args: list[str], tmp_path, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    if script is not None:
        path = tmp_path / "worker.py"
        path.write_text(script)
        command.append(str(path))
    return subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def no_dropout_model(tiny_model_dir, tmp_path_factory):
    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.transformer.config.hidden_dropout_prob = 0.0
    encoder.transformer.config.attention_probs_dropout_prob = 0.0
    return encoder.save(tmp_path_factory.mktemp("models") / "no-dropout")


@pytest.fixture
def triplets(tmp_path):
    from .conftest import write_jsonl

    rows = [{"anchor": SENTENCES[i], "positive": f"{SENTENCES[i + 12]} ({i})", "negative": f"not {SENTENCES[i]}"}
            for i in range(12)]
    return write_jsonl(tmp_path / "triplets.jsonl", rows)


@pytest.mark.parametrize("settings", [
    {},
    {"hard_negatives": True},
    {"hard_negatives": True, "symmetric": True},
    {"hard_negatives": True, "mini_batch_size": 3},
    {"loss": "softmax"},
], ids=["pairs", "hard-negatives", "symmetric", "cached", "softmax"])
def test_two_processes_equal_one(no_dropout_model, nli_file, triplets, tmp_path, settings):
    k = 4
    data = str(triplets) if settings.get("hard_negatives") else str(nli_file)
    settings = {k_: v for k_, v in settings.items() if k_ != "hard_negatives"}  # triplets come from the file
    common = {"model": str(no_dropout_model), "data": [data], "output": "unused", "max_seq_length": 32, **settings}

    result = torchrun([json.dumps({**common, "batch_size": k}), str(tmp_path / "rank0.pt")], tmp_path, WORKER)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "rank0.pt", weights_only=False)

    config = TrainConfig(**{**common, "batch_size": 2 * k})
    s = prepare(config)
    loss = forward_backward(s, list(range(2 * k)), config)
    single = {n: p.grad for n, p in s.encoder.named_parameters() if p.grad is not None}

    assert distributed["loss"] == pytest.approx(loss, rel=1e-5)
    assert distributed["grads"].keys() == single.keys()
    for name, grad in single.items():
        torch.testing.assert_close(distributed["grads"][name], grad, atol=1e-5, rtol=1e-3,  # summation order
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_mnr_train_nproc_2(tiny_model_dir, nli_file, tmp_path):
    """The CLI launches torchrun itself; rank 0 alone writes the output."""
    output = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mnr", "train", "--nproc", "2", "--model", str(tiny_model_dir),
                             "--data", str(nli_file), "--output", str(output), "--batch-size", "2",
                             "--max-seq-length", "32"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final model:") == 1
    steps = [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]  # 12 rows, global batch 2 x 2
    assert SentenceEncoder.load(str(output / "final")).encode(["a test"]).shape == (1, 32)
