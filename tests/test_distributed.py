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
from mnr.recipe import prepare
from mnr.train import forward_backward

from .conftest import SENTENCES

# Put before both workers. destroy_process_group joins gloo's threads, yet CI once listed a
# gloo_tcp_loop right after it (not seen here in 50 runs under load): a joined thread can stay in /proc
# for a moment while the kernel finishes its exit. So the check waits up to 5 s for them to go; a group
# that outlives shutdown() keeps its threads until interpreter exit, and still fails it.
LIVE_GLOO_THREADS = """
import os, time


def live_gloo_threads(wait=5.0):
    deadline = time.monotonic() + wait
    while True:
        names = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except OSError:  # ended between the listing and the read
                pass
        names = [name for name in names if "gloo" in name]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.01)
"""

WORKER = LIVE_GLOO_THREADS + """
import json, os, sys, torch
from mnr import distributed
from mnr.config import TrainConfig
from mnr.recipe import prepare
from mnr.train import forward_backward


def one_step(config):  # like train(): the setup, DistributedDataParallel wrapper included, is local
    s = prepare(config)
    rank, world_size = distributed.world()
    assert world_size == 2
    k = config.training.batch_size
    loss = forward_backward(s, list(range(rank * k, (rank + 1) * k)), config).item()  # rank r: rows r*k .. r*k+k-1
    return rank, loss, {n: p.grad for n, p in s.encoder.named_parameters() if p.grad is not None}


with distributed.process_group():
    rank, loss, grads = one_step(TrainConfig(**json.loads(sys.argv[1])))
# the group is gone, and with it gloo's threads: nothing of it is left to be torn down at interpreter exit
gloo_threads = live_gloo_threads()
if rank == 0:
    torch.save({"loss": loss, "grads": grads, "gloo_threads": gloo_threads}, sys.argv[2])
"""


def torchrun(args: list[str], tmp_path, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    if script is not None:
        path = tmp_path / "worker.py"
        path.write_text(script)
        command.append(str(path))
    return subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def triplets(tmp_path):
    from .conftest import write_jsonl

    rows = [{"anchor": SENTENCES[i], "positive": f"{SENTENCES[i + 12]} ({i})", "negative": f"not {SENTENCES[i]}"}
            for i in range(12)]
    return write_jsonl(tmp_path / "triplets.jsonl", rows)


SETTINGS = {
    "pairs": {},
    "hard-negatives": {"hard_negatives": True},
    "symmetric": {"hard_negatives": True, "symmetric": True},
    "cached": {"hard_negatives": True, "mini_batch_size": 3},
    "softmax": {"loss": "softmax"},
    "matryoshka": {"hard_negatives": True, "matryoshka_dims": [32, 16, 8], "matryoshka_weights": [1.0, 0.5, 2.0]},
    "prompts": {"hard_negatives": True, "prompts": {"query": "query: ", "passage": "passage: "},
                "include_prompt": False},
    # the guide: the trained model's own weights; masks over the gathered candidates, both directions
    "guide": {"hard_negatives": True, "symmetric": True, "guide": "the model", "guide_margin": 0.02},
    # every direction in one softmax (GTE), hardness weighting, and the guide's masks over all four blocks
    "directions": {"hard_negatives": True, "directions": ["query_to_doc", "query_to_query", "doc_to_query",
                                                          "doc_to_doc"], "hardness_mode": "all_negatives",
                   "hardness_strength": 5.0, "guide": "the model", "guide_margin": 0.02},
    # two datasets: the step is on the first one's rows (NLI, the softmax classifier wrapped on its own)
    "datasets": {"datasets": {"nli": {"data": ["NLI"], "loss": "softmax"}, "pairs": {"data": ["TRIPLETS"]}}},
}
# fp32: equal up to summation order. bf16 autocast (as a CPU with native bf16 or a GPU trains): the two
# sides multiply different blocks of rows, each rounded to bf16's 8 bits of mantissa, so gradients are
# compared against the size of the whole model's gradient (a relative error of bf16's precision, 2^-8,
# a few times over; measured: at most 1e-3), and the loss to 1%.
PRECISIONS = {"fp32": False, "bf16": True}
CASES = [(name, "fp32") for name in SETTINGS] + [("pairs", "bf16"), ("cached", "bf16")]


@pytest.mark.parametrize("case, precision", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_two_processes_equal_one(no_dropout_model, nli_file, triplets, tmp_path, case, precision):
    k = 4
    settings = SETTINGS[case]
    data = str(triplets) if settings.get("hard_negatives") else str(nli_file)
    settings = {k_: v for k_, v in settings.items() if k_ != "hard_negatives"}  # triplets come from the file
    settings |= {"guide": str(no_dropout_model)} if "guide" in settings else {}
    if "datasets" in settings:  # the files, where the tables name them
        files = {"NLI": str(nli_file), "TRIPLETS": str(triplets)}
        settings = {"datasets": {name: t | {"data": [files[t["data"][0]]]} for name, t in settings["datasets"].items()}}
    common = {"model": str(no_dropout_model), "data": [] if "datasets" in settings else [data], "output": "unused",
              "max_seq_length": 32, "bf16": PRECISIONS[precision], **settings}

    result = torchrun([json.dumps({**common, "batch_size": k}), str(tmp_path / "rank0.pt")], tmp_path, WORKER)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate" not in result.stderr, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert distributed["gloo_threads"] == [], "the process group outlived shutdown()"

    config = TrainConfig(**{**common, "batch_size": 2 * k})
    s = prepare(config)
    loss = forward_backward(s, list(range(2 * k)), config).item()
    single = {n: p.grad for n, p in s.encoder.named_parameters() if p.grad is not None}

    assert distributed["grads"].keys() == single.keys()
    if precision == "fp32":
        assert distributed["loss"] == pytest.approx(loss, rel=1e-5)
        for name, grad in single.items():
            torch.testing.assert_close(distributed["grads"][name], grad, atol=1e-5, rtol=1e-3,  # summation order
                                       msg=lambda m, n=name: f"{n}: {m}")
    else:
        assert distributed["loss"] == pytest.approx(loss, rel=1e-2)
        scale = max(grad.abs().max().item() for grad in single.values())
        for name, grad in single.items():
            error = (distributed["grads"][name] - grad).abs().max().item()
            assert error <= 0.01 * scale, f"{name}: {error:.3g} against a gradient scale of {scale:.3g}"


def test_mnr_train_nproc_2(tiny_model_dir, nli_file, tmp_path):
    """The CLI launches torchrun itself; rank 0 alone writes the output."""
    output = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mnr", "train", "--nproc", "2", "--model", str(tiny_model_dir),
                             "--data", str(nli_file), "--output", str(output), "--batch-size", "2",
                             "--max-seq-length", "32"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate" not in result.stderr and "SIGABRT" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("final model:") == 1
    steps = [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]  # 12 rows, global batch 2 x 2
    assert SentenceEncoder.load(str(output / "final")).encode(["a test"]).shape == (1, 32)


CLI_WORKER = LIVE_GLOO_THREADS + """
import os, signal, sys, json
import mnr.train as t
from mnr.cli import main

if os.environ.get("STOP_AT_STEP"):  # rank 0 gets SIGTERM during that step: every process must stop after it
    step, calls = int(os.environ["STOP_AT_STEP"]), []
    real = t.train_step
    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step and os.environ["RANK"] == "0":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    t.train_step = train_step
code = main(sys.argv[2:])
with open(f"{sys.argv[1]}.{os.environ['RANK']}", "w") as f:
    json.dump({"code": code, "gloo_threads": live_gloo_threads()}, f)
sys.exit(code)
"""


@pytest.mark.parametrize("stop", [False, True], ids=["to-the-end", "stopped-by-SIGTERM"])
def test_the_cli_leaves_the_process_group_cleanly(tiny_model_dir, nli_file, tmp_path, stop, monkeypatch):
    """What `mnr train --nproc 2` runs in each process: after training, or after a coordinated stop,
    the group is destroyed and gloo's threads have ended before the interpreter exits."""
    output = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(nli_file), "--output", str(output),
            "--batch-size", "2", "--max-seq-length", "32"]
    if stop:
        monkeypatch.setenv("STOP_AT_STEP", "2")
    result = torchrun([str(tmp_path / "state"), *args], tmp_path, CLI_WORKER)
    assert "terminate" not in result.stderr, result.stderr[-3000:]
    states = [json.loads((tmp_path / f"state.{rank}").read_text()) for rank in (0, 1)]
    assert [s["code"] for s in states] == ([143, 143] if stop else [0, 0]), result.stderr[-3000:]
    assert [s["gloo_threads"] for s in states] == [[], []], "the process group outlived shutdown()"
    if stop:
        assert "stopped by SIGTERM at step 2 of 3" in result.stderr
        assert (output / "checkpoints" / "step-00000002").is_dir()
