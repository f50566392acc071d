"""The guide on BEIR SciFact's second mining round, against the recipe's second round, gathered from the runs:

    python -m bench.mixture --runs scifact --seeds S --test --bf16 --keep RUNS/mixture        # the first round
    bash bench/second_round.sh S RUNS/plain-S RUNS/mixture/scifact-S                          # configs/scifact.toml
    bash bench/second_round.sh S RUNS/guide-S RUNS/mixture/scifact-S RUNS/mixture/scifact-S   # + --guide FIRST
    python -m bench.guide_scifact RUNS --seeds 0 1 2                                          # this table

Per seed: the first round's dev/test NDCG@10 (bench/results/mixture.json's scifact@S), each second round's best/
dev NDCG@10 and test metrics (OUT/second-test.md), what mining kept and the share of candidates the guide left out
(OUT/second/log.jsonl); then the means over the seeds. Written to bench/results/guide_scifact.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.common import RESULTS

FILE = RESULTS / "guide_scifact.json"
METRICS = ["ndcg@10", "mrr@10", "map@100", "recall@10", "recall@100"]
RUNS = {"plain": "configs/scifact.toml, two rounds", "guided": "the same + `--guide FIRST` (margin 0)"}


def second_round(out: Path) -> dict:
    """One second round's record: its best/ on dev, its test scores, mining and the guide's share."""
    lines = [json.loads(line) for line in (out / "second" / "log.jsonl").read_text().splitlines()]
    summary = next(e["summary"] for e in reversed(lines) if "summary" in e)
    mining = next(e["mining"] for e in lines if "mining" in e)
    row = [cell.strip() for cell in (out / "second-test.md").read_text().splitlines()[-1].strip("|").split("|")]
    entry = {"dev_ndcg@10": summary["best_score"], "test": dict(zip(METRICS, map(float, row[2:]), strict=True)),
             "mining": {"rows": mining["rows"], "kept": mining["kept"],
                        "candidates_removed": mining.get("candidates_removed", {})},
             "train_seconds": summary["train_seconds"]}
    if "guide_left_out" in summary:
        entry["guide_left_out"] = summary["guide_left_out"]
    return entry


def table(seeds: dict) -> str:
    """Means over the seeds of each run's scores (x100)."""
    columns = [("first_round", "dev_ndcg@10"), ("first_round", "test_ndcg@10"), ("RUN", "dev_ndcg@10"),
               ("RUN", "test", "ndcg@10"), ("RUN", "test", "mrr@10"), ("RUN", "test", "recall@10")]
    lines = ["| run | seeds | first round dev | first round test | second round dev | second round test | "
             "test MRR@10 | test Recall@10 |", "|---|" + "---:|" * 7]
    for run, title in RUNS.items():
        done = [s for s in seeds.values() if run in s["second_round"]]
        if done:
            means = [statistics.mean(value(s, [run if k == "RUN" else k for k in path]) for s in done)
                     for path in columns]
            cells = [f"{m:.2f}" for m in means]
            cells[3] = f"**{cells[3]}**"
            lines.append(f"| {title} | {len(done)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def value(seed: dict, path: list[str]) -> float:
    """seed["first_round"][...] or seed["second_round"][run][...]"""
    out = seed if path[0] == "first_round" else seed["second_round"]
    for key in path:
        out = out[key]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the folder holding mixture/, plain-S/ and guide-S/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    first_rounds = json.loads((RESULTS / "mixture.json").read_text())
    results = json.loads(FILE.read_text()) if FILE.exists() else {}
    seeds = results.setdefault("seeds", {})
    for seed in args.seeds:
        first = first_rounds[f"scifact@{seed}"]["scifact"]
        entry = {"first_round": {"dev_ndcg@10": round(first["dev"], 2), "test_ndcg@10": round(first["test"], 2)},
                 "second_round": {}}
        for run, folder in (("plain", f"plain-{seed}"), ("guided", f"guide-{seed}")):
            if (args.runs / folder / "second-test.md").exists():
                entry["second_round"][run] = second_round(args.runs / folder)
        seeds[str(seed)] = entry
    FILE.write_text(json.dumps(results, indent=1) + "\n")
    print(table(seeds))


if __name__ == "__main__":
    main()
