"""Never lose work: kills, signals, faults while writing, bad resumes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnr.cli import main
from mnr.rundir import RunDir

from .conftest import SENTENCES, write_jsonl

# Runs the real CLI with each training step slowed by 20 ms, so a test can stop it mid-run.
SLOW = """
import sys, time
import mnr.train as t
step = t.train_step
t.train_step = lambda *a, **k: (time.sleep(0.02), step(*a, **k))[1]
from mnr.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Dies (SIGKILL) half-way through writing its second checkpoint file.
DIE_WHILE_WRITING = """
import os, signal, sys, torch
real_save, calls = torch.save, []
def save(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:
        with open(path, "wb") as f:
            f.write(b"the first bytes of a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)
torch.save = save
from mnr.cli import main
sys.exit(main(sys.argv[1:]))
"""


def make_pairs(folder: Path) -> Path:
    """40 distinct pairs: 10 steps an epoch at batch 4."""
    rows = [{"anchor": f"{SENTENCES[i % 24]} ({i})", "positive": f"{SENTENCES[(i + 5) % 24]} [{i}]"} for i in range(40)]
    return write_jsonl(folder / "pairs.jsonl", rows)


@pytest.fixture
def pairs(tmp_path) -> Path:
    return make_pairs(tmp_path)


def args(model, data, output, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
            "--epochs", "3", "--save-every", "3", "--max-seq-length", "32", "--lr", "1e-3", *extra]


def spawn(script: str, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_to_end(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    process = spawn(script, argv)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def wait_for_step(output: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline:
        log = output / "log.jsonl"
        if log.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in json.loads(line)
                                for line in log.read_text().splitlines() if line.endswith("}")):
            return
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[1][-2000:]}"
        time.sleep(0.005)
    raise TimeoutError(f"step {step} not reached")


def stop_at(step: int, argv: list[str]) -> None:
    """Run ``argv`` (slowed) until it logs ``step``, then stop it with SIGTERM: it leaves a checkpoint."""
    process = spawn(SLOW, argv)
    wait_for_step(Path(argv[argv.index("--output") + 1]), step, process)
    process.send_signal(signal.SIGTERM)
    assert process.communicate(timeout=120) and process.returncode == 143


def weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "final" / "model.safetensors")


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the run the other tests interrupt, trained without interruption."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_to_end(SLOW, args(tiny_model_dir, make_pairs(tmp), tmp / "run"))
    assert result.returncode == 0, result.stderr[-2000:]
    return weights(tmp / "run")


def test_sigkill_at_a_random_step_then_resume_gives_the_same_weights(tiny_model_dir, pairs, tmp_path, uninterrupted):
    output = tmp_path / "killed"
    kill_at = random.Random().randint(2, 27)  # anywhere, including while a checkpoint is being written
    process = spawn(SLOW, args(tiny_model_dir, pairs, output))
    wait_for_step(output, kill_at, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / "final").exists()
    resumed = run_to_end(SLOW, args(tiny_model_dir, pairs, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bitwise_equal(weights(output), uninterrupted)
    steps = [json.loads(line)["step"] for line in (output / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 31)), "the log should hold each step once"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signals_stop_after_the_step_with_a_checkpoint(tiny_model_dir, pairs, tmp_path, uninterrupted, sig, code):
    output = tmp_path / "stopped"
    process = spawn(SLOW, args(tiny_model_dir, pairs, output))
    wait_for_step(output, 4, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err[-2000:]
    stopped_at = int(err.split("at step ")[1].split()[0])
    assert f"stopped by {sig.name} at step {stopped_at} of 30; checkpoint" in err and "--resume" in err
    path = RunDir(output).checkpoints / f"step-{stopped_at:08d}"
    assert torch.load(path / "checkpoint.pt", weights_only=False)["state"]["step"] == stopped_at
    resumed = run_to_end(SLOW, args(tiny_model_dir, pairs, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bitwise_equal(weights(output), uninterrupted)


def test_a_run_that_mines_its_negatives_resumes_to_the_same_weights(tiny_model_dir, pairs, tmp_path):
    """--mine-negatives: the resumed run mines again (the checkpoint checks it got the same rows) and ends with
    the weights of a run never stopped."""
    mining = ("--mine-negatives", "1", "--mine-relative-margin", "0")  # a random model: no margin, no row left out
    whole = run_to_end(SLOW, args(tiny_model_dir, pairs, tmp_path / "whole", *mining))
    assert whole.returncode == 0, whole.stderr[-2000:]
    output = tmp_path / "stopped"
    stop_at(4, args(tiny_model_dir, pairs, output, *mining))
    resumed = run_to_end(SLOW, args(tiny_model_dir, pairs, output, *mining, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert (output / "mined.jsonl").read_text() == (tmp_path / "whole" / "mined.jsonl").read_text()
    assert len((output / "mined.jsonl").read_text().splitlines()) == 40
    assert_bitwise_equal(weights(output), weights(tmp_path / "whole"))


def test_a_half_written_checkpoint_is_ignored_on_resume(tiny_model_dir, pairs, tmp_path, uninterrupted):
    output = tmp_path / "torn"
    died = run_to_end(DIE_WHILE_WRITING, args(tiny_model_dir, pairs, output))
    assert died.returncode == -signal.SIGKILL
    assert [p.name for p in RunDir(output).checkpoints.iterdir() if p.name.startswith(".")], "no torn write left"
    assert RunDir(output).latest_checkpoint(quiet=True).name == "step-00000003"  # the first one
    resumed = run_to_end(SLOW, args(tiny_model_dir, pairs, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "ignoring a half-written checkpoint .step-00000006.tmp-" in resumed.stderr
    assert "resuming from" in resumed.stderr and "step-00000003 (step 3)" in resumed.stderr
    assert_bitwise_equal(weights(output), uninterrupted)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tiny_model_dir, pairs, tmp_path, capsys,
                                                                      monkeypatch):
    import mnr.losses

    real, calls = mnr.losses.MultipleNegativesRankingLoss.forward, []

    def poisoned(self, columns, labels=None):
        calls.append(1)
        loss = real(self, columns, labels)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(mnr.losses.MultipleNegativesRankingLoss, "forward", poisoned)
    output = tmp_path / "nan"
    assert main(args(tiny_model_dir, pairs, output)) == 2
    err = capsys.readouterr().err
    assert "step 5: the loss is not finite" in err and "step-00000003" in err
    saved = torch.load(RunDir(output).checkpoints / "step-00000003" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] == 3 and all(torch.isfinite(t).all() for t in saved["encoder"].values())


def test_disk_full_while_checkpointing_keeps_the_previous_one(tiny_model_dir, pairs, tmp_path, capsys, monkeypatch):
    real, calls = torch.save, []

    def full_disk(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    output = tmp_path / "full"
    assert main(args(tiny_model_dir, pairs, output)) == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoint" in err and "step-00000006: No space left on device" in err
    assert "the previous checkpoint" in err and "step-00000003 is intact" in err
    assert [p.name for p in RunDir(output).checkpoints.iterdir()] == ["step-00000003"]
    assert torch.load(RunDir(output).checkpoints / "step-00000003" / "checkpoint.pt",
                      weights_only=False)["state"]["step"] == 3


def test_unwritable_output_fails_before_training(tiny_model_dir, pairs, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(args(tiny_model_dir, pairs, blocker / "run")) == 2
    assert f"--output: cannot write to {blocker / 'run'}" in capsys.readouterr().err


def test_resume_is_refused_for_other_data_or_settings(tiny_model_dir, pairs, tmp_path, capsys):
    output = tmp_path / "run"
    process = spawn(SLOW, args(tiny_model_dir, pairs, output))
    wait_for_step(output, 4, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    other = write_jsonl(tmp_path / "other.jsonl", [{"anchor": f"q{i}", "positive": f"d{i}"} for i in range(40)])
    assert main(args(tiny_model_dir, other, output, "--resume")) == 2
    assert "the training data differ from the checkpoint's" in capsys.readouterr().err
    assert main(args(tiny_model_dir, pairs, output, "--resume", "--lr", "5e-4")) == 2
    assert "--lr was 0.001, now 0.0005" in capsys.readouterr().err
    assert main(args(tiny_model_dir, pairs, output)) == 2
    assert "holds checkpoints of an unfinished run; add --resume" in capsys.readouterr().err


def test_resume_needs_a_run_and_restarts_one_killed_before_its_first_checkpoint(tiny_model_dir, pairs, tmp_path,
                                                                               capsys, uninterrupted):
    assert main(args(tiny_model_dir, pairs, tmp_path / "nothing", "--resume")) == 2
    assert "--resume: no run to continue in" in capsys.readouterr().err
    output = tmp_path / "early"
    process = spawn(SLOW, args(tiny_model_dir, pairs, output))
    wait_for_step(output, 1, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert RunDir(output).latest_checkpoint(quiet=True) is None
    resumed = run_to_end(SLOW, args(tiny_model_dir, pairs, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "has no complete checkpoint yet; starting from the beginning" in resumed.stderr
    assert_bitwise_equal(weights(output), uninterrupted)


def test_only_the_latest_checkpoints_are_kept(tiny_model_dir, pairs, tmp_path):
    output = tmp_path / "run"
    assert main(args(tiny_model_dir, pairs, output, "--keep-checkpoints", "2")) == 0
    assert sorted(p.name for p in RunDir(output).checkpoints.iterdir()) == ["step-00000027", "step-00000030"]
