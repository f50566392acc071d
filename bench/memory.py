"""Memory of a training step with and without gradient caching, and what caching costs in speed.

    python -m bench.memory               # ~10 min on 2 cores; writes its section of BENCHMARKS.md

Each configuration runs in a fresh child process: load the packaged all-MiniLM-L6-v2 and the NLI
entailment pairs, run two warm-up steps, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``),
run ``--steps`` timed steps of the real ``mnr.train.train_step``, and read the peak RSS of those steps
(``VmHWM``) and the process's peak over its whole life (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.common import NLI_FILES, ROOT, machine, write_section

CONFIGS = [
    ("plain MNR, batch 32", {"batch_size": 32}),
    ("cached MNR, batch 32, mini-batch 64 texts", {"batch_size": 32, "mini_batch_size": 64}),
    ("cached MNR, batch 1024, mini-batch 64 texts", {"batch_size": 1024, "mini_batch_size": 64}),
]


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(settings: dict, steps: int, data_dir: str) -> dict:
    import torch

    from mnr.config import TrainConfig
    from mnr.recipe import batches_of_epoch, prepare
    from mnr.train import make_optimizer, train_step

    # max length 128: what its tables were measured at (the default was 128 then)
    config = TrainConfig(data=NLI_FILES, data_dir=data_dir, output="unused", bf16=True,
                         **{"max_seq_length": 128, **settings})
    s = prepare(config)
    optimizer = make_optimizer(s, config)
    s.train_encoder.train()
    batches = batches_of_epoch(s.data, config, 0)
    for batch in batches[:2]:
        train_step(s, optimizer, batch, config)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = vm_hwm_mb()
    start = time.perf_counter()
    rows = 0
    for batch in batches[2 : 2 + steps]:
        train_step(s, optimizer, batch, config)
        rows += len(batch)
    seconds = time.perf_counter() - start
    return {"step_peak_mb": vm_hwm_mb(), "rss_before_mb": before, "process_peak_mb":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows_per_s": rows / seconds,
            "rows": rows, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("MNR_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args.steps, args.data_dir)))
        return
    command = "python -m bench.memory " + " ".join(sys.argv[1:])
    results = {}
    for name, settings in CONFIGS:
        # a batch of 1024 takes a step as long as 32 batches of 32: time fewer of them
        steps = args.steps if settings["batch_size"] > 32 else args.steps * 10
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--worker", json.dumps(settings), "--steps",
                              str(steps),
                              "--data-dir", args.data_dir], check=True, capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name}: step peak {r['step_peak_mb']:.0f} MB, process peak {r['process_peak_mb']:.0f} MB, "
              f"{r['rows_per_s']:.1f} pairs/s", flush=True)
    base = results[CONFIGS[0][0]]
    lines = ["| configuration | peak RSS of the training steps (MB) | vs plain batch 32 | process peak (MB) "
             "| pairs/s | vs plain batch 32 |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        memory, speed = r["step_peak_mb"] / base["step_peak_mb"], r["rows_per_s"] / base["rows_per_s"]
        lines.append(f"| {name} | {r['step_peak_mb']:.0f} | {memory:.2f}x | {r['process_peak_mb']:.0f} "
                     f"| {r['rows_per_s']:.1f} | {speed:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    write_section(ROOT / "BENCHMARKS.md", "bench/memory.py", f"""## Huge batches in fixed memory (gradient caching)

Command: `{command}` (run {started}). Machine: {machine()}.
The packaged all-MiniLM-L6-v2 on the NLI entailment pairs, bf16, each configuration in its own
process; "peak RSS of the training steps" is the kernel's high-water mark over the timed steps only
(reset after two warm-up steps), so it holds the model, the AdamW state and one step's activations.

{table}

A batch of 1024 pairs (2048 texts, 1024 x 2048 similarity scores) trains within 1.5 times the memory
of a plain batch of 32, because only one mini-batch of 64 texts holds activations at a time; what
grows with the batch is its token ids, embeddings and their gradients. The price is the second
forward pass: compare the two cached rows with the plain one.
""")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
