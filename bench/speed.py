"""Where mnr's training speed comes from: each optimisation switched on in turn, same run.

    python bench/speed.py                  # ~10 min on 2 cores; writes its section of BENCHMARKS.md
    python bench/speed.py --rounds 1 --steps 5 --no-write      # a quick look

Every configuration times the real ``mnr.train.train_step`` on the same batches of the MNR-pairs
recipe (NLI entailment pairs, batch 32, all-MiniLM-L6-v2). An optimisation that has no setting of
its own is switched off for the "before" rows by patching the module constant or function it
lives in. Configurations take turns (round-robin, ``--rounds`` times) so that drift in the
machine's speed hits them all alike; the median round is reported. A torch profile of the final
configuration then shows where the remaining time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import NLI_FILES, ROOT, machine, write_section  # noqa: E402

from mnr import dropout as mnr_dropout  # noqa: E402
from mnr import packing  # noqa: E402
from mnr.batching import epoch_batches  # noqa: E402
from mnr.config import TrainConfig  # noqa: E402
from mnr.train import make_optimizer, param_groups, prepare, train_step  # noqa: E402


def unfused_adamw(s, config):
    return torch.optim.AdamW(param_groups([s.encoder, s.objective], config.weight_decay), lr=config.lr)


def torch_dropout(x, p, training=True):
    return torch.nn.functional.dropout(x, p, training)


# name -> (TrainConfig overrides, patches that switch later optimisations off). Cumulative: each row
# adds one optimisation to the row above.
LADDER = [
    ("padded batches (all columns in one forward)", {"layout": "padded", "bf16": False},
     {"fused": False, "fast_dropout": False}),
    ("+ packed: no padding outside attention, one attention block", {"bf16": False},
     {"fused": False, "fast_dropout": False, "buckets": False, "multiple": 1}),
    ("+ attention in length buckets", {"bf16": False}, {"fused": False, "fast_dropout": False, "multiple": 1}),
    ("+ fused AdamW", {"bf16": False}, {"fast_dropout": False, "multiple": 1}),
    ("+ bf16 autocast", {"bf16": True}, {"fast_dropout": False, "multiple": 1}),
    ("+ packed length rounded to 64 (oneDNN kernel reuse)", {"bf16": True}, {"fast_dropout": False}),
    ("+ cheap CPU dropout masks", {"bf16": True}, {}),
]


@contextlib.contextmanager
def patched(switches: dict):
    with contextlib.ExitStack() as stack:
        if switches.get("fused") is False:
            stack.enter_context(mock.patch("mnr.train.make_optimizer", unfused_adamw))
        if switches.get("fast_dropout") is False:
            stack.enter_context(mock.patch.object(mnr_dropout, "dropout", torch_dropout))
            stack.enter_context(mock.patch.object(packing, "mnr_dropout", torch_dropout))
        if switches.get("buckets") is False:
            stack.enter_context(mock.patch.object(packing, "length_buckets", lambda lengths: [(0, len(lengths))]))
        if "multiple" in switches:
            stack.enter_context(mock.patch.object(packing, "LENGTH_MULTIPLE", switches["multiple"]))
        yield


def build(name: str, overrides: dict, switches: dict, args) -> dict:
    # max length 128: what its tables were measured at (the default was 128 then)
    config = TrainConfig(data=NLI_FILES, data_dir=args.data_dir, output="unused",
                         **{"max_seq_length": 128, **overrides})
    with patched(switches):
        s = prepare(config)
        if switches.get("fast_dropout") is False:  # modules were swapped at load: swap them back
            for module in list(s.encoder.modules()):
                for child_name, child in module.named_children():
                    if isinstance(child, mnr_dropout.FastDropout):
                        setattr(module, child_name, torch.nn.Dropout(child.p))
        optimizer = (unfused_adamw if switches.get("fused") is False else make_optimizer)(s, config)
    s.encoder.train()
    return {"name": name, "config": config, "setup": s, "optimizer": optimizer, "switches": switches, "times": []}


def run_round(entry: dict, batches: list[list[int]]) -> None:
    with patched(entry["switches"]):
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
    with patched(entry["switches"]), profile(activities=[ProfilerActivity.CPU]) as prof:
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
    parser.add_argument("--data-dir", default=os.environ.get("MNR_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="training steps per configuration per round")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python bench/speed.py " + " ".join(sys.argv[1:])

    entries = [build(name, overrides, switches, args) for name, overrides, switches in LADDER]
    data = entries[0]["setup"].data
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
