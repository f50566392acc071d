"""Where mnr's training speed comes from: each optimisation switched on in turn, same run.

    python -m bench.speed                  # ~8 min on 2 cores; writes its section of BENCHMARKS.md
    python -m bench.speed --rounds 1 --steps 5 --no-write      # a quick look

Every configuration times the real ``mnr.train.train_step`` on the same batches of the MNR-pairs
recipe (NLI entailment pairs, batch 32, all-MiniLM-L6-v2). Each optimisation is switched by a setting
of the package, nothing patched: ``--layout`` (padded, buckets), ``make_optimizer(fused=...)`` and ``--bf16``.
(The oneDNN length rounding and the cheap CPU dropout masks have no switch: they are in every packed row.)
Configurations take turns (round-robin, ``--rounds`` times) so that drift in the machine's speed hits
them all alike; the median round is reported. A torch profile of the final configuration then shows
where the remaining time goes.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch

from bench.common import DEFAULT_DATA_DIR, NLI_FILES, ROOT, machine, write_section
from mnr.batching import epoch_batches
from mnr.config import TrainConfig
from mnr.recipe import prepare
from mnr.train import make_optimizer, train_step

# name -> TrainConfig settings, make_optimizer arguments. Cumulative: each row adds one optimisation to the one above.
LADDER = [
    ("padded batches (all columns in one forward)", {"layout": "padded", "bf16": False}, {"fused": False}),
    ("+ packed: real tokens only, attention in length buckets", {"layout": "buckets", "bf16": False},
     {"fused": False}),
    ("+ fused AdamW", {"layout": "buckets", "bf16": False}, {}),
    ("+ bf16 autocast", {"layout": "buckets", "bf16": True}, {}),
]


def build(name: str, overrides: dict, optimizer: dict, args) -> dict:
    # max length 128: what its tables were measured at (the default was 128 then)
    config = TrainConfig(data=NLI_FILES, data_dir=args.data_dir, output="unused", max_seq_length=128, **overrides)
    s = prepare(config)
    s.encoder.train()
    return {"name": name, "config": config, "setup": s, "optimizer": make_optimizer(s, config, **optimizer),
            "times": []}


def run_round(entry: dict, batches: list[list[int]]) -> None:
    start = time.perf_counter()
    for batch in batches:
        train_step(entry["setup"], entry["optimizer"], batch, entry["config"])
    entry["times"].append(time.perf_counter() - start)


def profile_summary(entry: dict, batches: list[list[int]]) -> str:
    """Self CPU time of the final configuration, grouped by what the operators do."""
    from torch.profiler import ProfilerActivity, profile

    groups = {
        "matrix products (mm, addmm, bmm)": ("aten::mm", "aten::addmm", "aten::bmm"),
        "dropout masks (random_, where)": ("aten::random_", "aten::where", "aten::bernoulli_", "aten::ge"),
        "optimizer (fused AdamW)": ("aten::_fused_adamw_",),
        "copies and casts (copy_, index_select, cat, scatter_add_)": ("aten::copy_", "aten::index_select",
                                                                       "aten::cat", "aten::scatter_add_",
                                                                       "aten::index_add_"),
        "zero fills (fill_, zero_)": ("aten::fill_", "aten::zero_"),
        "GELU, softmax, layer norm (forward and backward)": ("aten::gelu", "aten::gelu_backward",
                                                            "aten::_softmax", "aten::_softmax_backward_data",
                                                            "aten::native_layer_norm",
                                                            "aten::native_layer_norm_backward"),
        "other elementwise (add, mul, div, sum, ...)": ("aten::add", "aten::add_", "aten::mul", "aten::mul_",
                                                        "aten::div", "aten::div_", "aten::sum"),
    }
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            train_step(entry["setup"], entry["optimizer"], batch, entry["config"])
    totals = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    everything = sum(totals.values())
    lines = ["| where the time goes | share of CPU time |", "|---|---:|"]
    counted = 0.0
    for label, names in groups.items():
        part = sum(totals.get(n, 0.0) for n in names)
        counted += part
        lines.append(f"| {label} | {100 * part / everything:.1f}% |")
    rest = 100 * (1 - counted / everything)
    lines.append(f"| everything else (Python, autograd bookkeeping, small ops) | {rest:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="training steps per configuration per round")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    command = "python -m bench.speed " + " ".join(sys.argv[1:])

    entries = [build(name, overrides, optimizer, args) for name, overrides, optimizer in LADDER]
    data = entries[0]["setup"].data.parts[0].data  # one dataset: its row numbers are the run's
    batches = epoch_batches(data, 32, seed=0, epoch=0)
    warmup, timed = batches[:3], batches[3 : 3 + args.steps]
    for entry in entries:  # first calls build kernels and caches; keep them out of the timing
        run_round(entry, warmup)
        entry["times"].clear()
    for r in range(args.rounds):
        for entry in entries:
            run_round(entry, timed)
            print(f"round {r + 1}: {entry['name']}: {len(timed) * 32 / entry['times'][-1]:.1f} pairs/s", flush=True)
    rows = len(timed) * 32
    base = rows / statistics.median(entries[0]["times"])
    lines = ["| configuration | pairs/s | vs padded | vs the row above |", "|---|---:|---:|---:|"]
    previous = None
    for entry in entries:
        speed = rows / statistics.median(entry["times"])
        step_up = f"{speed / previous:.2f}x" if previous else ""
        lines.append(f"| {entry['name']} | {speed:.1f} | {speed / base:.2f}x | {step_up} |")
        previous = speed
    ladder = "\n".join(lines)
    print(ladder)
    summary = profile_summary(entries[-1], batches[3:8])
    print(summary)
    if args.no_write:
        return
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = f"""## Where the training speed comes from

Command: `{command}` (run {started}). Machine: {machine()}; {torch.get_num_threads()} threads.
MNR on the NLI entailment pairs, batch 32, all-MiniLM-L6-v2, max length 128; {len(timed)} steps
per configuration per round, {args.rounds} rounds taken in turn, median round reported. Each row adds
one optimisation to the row above; sentence-transformers' own figure, measured in the same run as
mnr's, is in the side-by-side table above.

{ladder}

Profile of the last row (self CPU time over 5 steps, grouped):

{summary}
"""
    write_section(ROOT / "BENCHMARKS.md", "bench/speed.py", body)
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
