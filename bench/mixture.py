"""Several datasets in one run: NLI triplets and SciFact's training pairs together, against each alone with the same
settings, scored on STSb (Spearman) and SciFact (NDCG@10).

    python -m bench.mixture --seeds 0                 # dev
    python -m bench.mixture --seeds 0 1 2 --test      # report once

The settings are the shipped recipes' where they agree (lr 5e-5, max length 256) and each dataset's own where they
differ: NLI as configs/best-nli.toml trains it ((premise, entailment, contradiction) triplets in batches of 128),
SciFact as configs/scifact.toml (train[100:] pairs, each with the negative the base model mines, range 1000,
relative margin 0.05; batches of 32); 3 epochs (configs/scifact.toml's), proportional sampling. SciFact's rows are
mined once per call (as `mnr mine` would, before training) and every run trains on the same file. Each run's final
model is scored (the runs have different dev sets, so none keeps a best/): STSb dev and test, SciFact train[:100]
(dev) and test, in fp32. Results: bench/results/mixture.json, kept as each run finishes. `--keep DIR` keeps each
final model as DIR/RUN-SEED (the scifact run is configs/scifact.toml's first round: bench/second_round.sh FIRST).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import BASE_MODEL, NLI_FILES, RESULTS, add_seed_flags, chosen_bf16, machine

FILE = RESULTS / "mixture.json"
RUNS = {"nli": ["nli"], "scifact": ["scifact"], "mix": ["nli", "scifact"]}  # run -> its datasets
SETTINGS = {"lr": 5e-5, "max_seq_length": 256, "epochs": 3, "save_every": 0, "eval_steps": 100_000}
SCIFACT_TRAIN = "retrieval/scifact:train[100:]"


def mine_scifact(data_dir: str, out: Path, bf16: bool) -> Path:
    """configs/scifact.toml's mining, by the base model, written as (anchor, positive, negative) rows."""
    from mnr.data import load_training_set
    from mnr.fileio import write_rows
    from mnr.mine import MiningSettings, columns, mine, mining_corpus
    from mnr.model import SentenceEncoder

    root = Path(data_dir)
    pairs = load_training_set([SCIFACT_TRAIN], root=root)
    corpus = mining_corpus("", root, pairs, [SCIFACT_TRAIN])
    encoder = SentenceEncoder.load(BASE_MODEL, max_seq_length=SETTINGS["max_seq_length"])
    mined = mine(encoder, [tuple(r) for r in pairs.rows], corpus, MiningSettings(num_negatives=1, range_max=1000),
                 bf16=bf16, progress=False)
    write_rows(out, columns(1), mined.rows)
    return out


def train(run: str, seed: int, mined: Path, data_dir: str, bf16: bool, output: Path) -> tuple[dict, Path]:
    from mnr.config import TrainConfig
    from mnr.train import train as train_mnr

    tables = {"nli": {"data": NLI_FILES, "hard_negatives": True, "batch_size": 128},
              "scifact": {"data": [str(mined)], "batch_size": 32}}
    config = TrainConfig(model=BASE_MODEL, data_dir=data_dir, output=str(output), seed=seed, bf16=bf16,
                         datasets={name: tables[name] for name in RUNS[run]}, **SETTINGS)
    result = train_mnr(config, progress=False)
    return {"train_seconds": result.train_seconds, "rows": result.rows, "steps": result.steps,
            "rows_per_s": result.rows / result.train_seconds, "bf16": bf16}, result.final


def scores(model: Path, splits: list[str], data_dir: str) -> dict:
    """{"stsb": {split: Spearman}, "scifact": {split: NDCG@10}} of ``model`` (x100, the whole embedding)."""
    from bench.variants import TASKS
    from bench.variants import scores as at_each_dim

    return {name: {split: values["384"] for split, values in at_each_dim(TASKS[task], str(model), splits,
                                                                          data_dir).items()}
            for name, task in (("stsb", "nli"), ("scifact", "scifact"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--keep", type=Path, help="keep each run's final model as KEEP/RUN-SEED")
    add_seed_flags(parser)
    args = parser.parse_args()
    results = json.loads(FILE.read_text()) if FILE.exists() else {}
    splits, where = ["dev", "test"] if args.test else ["dev"], machine()
    bf16 = chosen_bf16(args)
    with tempfile.TemporaryDirectory(prefix="mnr-mixture-") as tmp:
        mined = None
        for seed in args.seeds:
            for run in args.runs:
                key = f"{run}@{seed}"
                if key in results and all(split in results[key]["stsb"] for split in splits):
                    continue
                if mined is None and "scifact" in RUNS[run]:
                    print(f"[{time.strftime('%H:%M:%S')}] mining SciFact's training pairs ...", flush=True)
                    mined = mine_scifact(args.data_dir, Path(tmp) / "scifact-mined.jsonl", bf16)
                print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                entry, model = train(run, seed, mined or Path(tmp) / "unused", args.data_dir, bf16,
                                     Path(tmp) / f"{run}-{seed}")
                entry |= scores(model, splits, args.data_dir) | {"machine": where}
                if args.keep:
                    shutil.copytree(model, args.keep / f"{run}-{seed}", dirs_exist_ok=True)
                # Re-read before writing: another call (another seed) may have added its runs since this one began.
                results = (json.loads(FILE.read_text()) if FILE.exists() else {}) | results | {key: entry}
                FILE.parent.mkdir(parents=True, exist_ok=True)
                FILE.write_text(json.dumps(results, indent=1))
                print(f"    {key}: STSb {entry['stsb']}, SciFact {entry['scifact']}; {entry['rows_per_s']:.1f} "
                      f"rows/s, {'bf16' if bf16 else 'fp32'}", flush=True)
    print(table(results, splits))
    print(f"machine: {where}")


def table(results: dict, splits: list[str]) -> str:
    """Mean over the seeds run of each run's scores (x100)."""
    head = [f"{name} {split}" for name in ("STSb", "SciFact") for split in splits]
    lines = ["| run | " + " | ".join(head) + " | seeds | rows/s |", "|---|" + "---:|" * (len(head) + 2)]
    for run in RUNS:
        runs = [r for key, r in results.items() if key.split("@")[0] == run]
        if runs:
            cells = [f"{statistics.mean(r[name][split] for r in runs):.2f}" if all(split in r[name] for r in runs)
                     else "-" for name in ("stsb", "scifact") for split in splits]
            lines.append(f"| {run} ({' + '.join(RUNS[run])}) | " + " | ".join(cells) +
                         f" | {len(runs)} | {statistics.mean(r['rows_per_s'] for r in runs):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
