"""Matryoshka embeddings on SciFact: NDCG@10 at each size for configs/scifact.toml as it is (its embeddings cut),
the same recipe with --matryoshka-dims, and sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss)
trained on the rows mnr mined for it, with the recipe's settings.

    python -m bench.matryoshka --seeds 0 --split dev             # choose on dev (train[:100], never test)
    python -m bench.matryoshka --seeds 0 1 2 --split test --st   # report once, with sentence-transformers

Each (row, seed, split) is kept in bench/results/matryoshka.json as it finishes, so a stopped run resumes.
A SciFact run of the recipe takes about 25 minutes on 2 CPU cores (mining, 75 steps, two dev evaluations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_DATA_DIR, RESULTS, ROOT, machine

DIMS = [384, 256, 128, 64, 32]
SPLITS = {"dev": "retrieval/scifact:train[:100]", "test": "retrieval/scifact:test"}
FILE = RESULTS / "matryoshka.json"


def scores(model_dir: str, spec: str, data_dir: str) -> dict:
    """NDCG@10 (x100) at every size of DIMS."""
    from mnr.model import SentenceEncoder
    from mnr.retrieval import RetrievalEvaluator, at_dim, load_retrieval, resolve_retrieval_spec

    data = load_retrieval(resolve_retrieval_spec(spec, Path(data_dir)))
    out = RetrievalEvaluator(data, dims=DIMS)(SentenceEncoder.load(model_dir))
    return {str(d): out[at_dim("ndcg@10", d)] for d in DIMS}


def train_mnr(matryoshka: bool, seed: int, data_dir: str, workdir: Path) -> tuple[dict, Path]:
    from mnr.config import TrainConfig
    from mnr.train import train

    extra = {"matryoshka_dims": DIMS} if matryoshka else {}
    config = TrainConfig.from_sources(str(ROOT / "configs" / "scifact.toml"), data_dir=data_dir, seed=seed,
                                      output=str(workdir / "run"), **extra)
    result = train(config, progress=False)
    model = result.best or result.final
    return {"model": model.name, "train_seconds": result.train_seconds, "rows": result.rows,
            "rows_per_s": result.rows / result.train_seconds}, workdir / "run"


def train_st(seed: int, data_dir: str, run: Path, workdir: Path) -> tuple[dict, Path]:
    """sentence-transformers on the rows mnr's Matryoshka run mined (OUTPUT/mined.jsonl), same settings."""
    from sentence_transformers import losses

    from bench.st import train_st as train_with_st
    from mnr.config import TrainConfig
    from mnr.data import load_training_set

    config = TrainConfig.from_sources(str(ROOT / "configs" / "scifact.toml"), data_dir=data_dir, seed=seed,
                                      matryoshka_dims=DIMS)
    rows = load_training_set([str(run / "mined.jsonl")])
    model, measured = train_with_st(config, rows, workdir,
                                    wrap=lambda st, loss: losses.MatryoshkaLoss(st, loss, matryoshka_dims=DIMS))
    model.save(str(workdir / "st-final"))
    return {"model": "final", "train_seconds": measured["seconds"], "rows": measured["rows"],
            "rows_per_s": measured["rows"] / measured["seconds"]}, workdir / "st-final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="dev")
    parser.add_argument("--st", action="store_true", help="also sentence-transformers' MatryoshkaLoss")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    results = json.loads(FILE.read_text()) if FILE.exists() else {}
    spec = SPLITS[args.split]
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="mnr-matryoshka-") as tmp:
            for name in ("recipe", "matryoshka", *(["st"] if args.st else [])):
                key = f"{name}@{seed}:{args.split}"
                if key in results:
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                workdir = Path(tmp) / name
                if name == "st":
                    entry, model = train_st(seed, args.data_dir, Path(tmp) / "matryoshka" / "run", workdir)
                else:
                    entry, run = train_mnr(name == "matryoshka", seed, args.data_dir, workdir)
                    model = run / entry["model"]
                entry["ndcg@10"] = scores(str(model), spec, args.data_dir)
                results[key] = entry
                FILE.parent.mkdir(parents=True, exist_ok=True)
                FILE.write_text(json.dumps(results, indent=1))
                print(f"    {key}: " + ", ".join(f"{d}: {v:.2f}" for d, v in entry["ndcg@10"].items())
                      + f"; {entry['rows_per_s']:.1f} rows/s", flush=True)
    print(table(results, args.split))
    print(f"machine: {machine()}")


def table(results: dict, split: str) -> str:
    names = {"recipe": "configs/scifact.toml, embeddings cut", "matryoshka": "the recipe + --matryoshka-dims "
             + " ".join(map(str, DIMS)), "st": "sentence-transformers MatryoshkaLoss(MNR), the same rows"}
    lines = [f"| {split} NDCG@10 | " + " | ".join(f"{d}" for d in DIMS) + " | seeds | rows/s |",
             "|---|" + "---:|" * (len(DIMS) + 2)]
    for name, title in names.items():
        runs = [r for key, r in results.items() if key.startswith(f"{name}@") and key.endswith(f":{split}")]
        if runs:
            cells = [f"{statistics.mean(r['ndcg@10'][str(d)] for r in runs):.2f}" for d in DIMS]
            speed = statistics.mean(r["rows_per_s"] for r in runs)
            lines.append(f"| {title} | " + " | ".join(cells) + f" | {len(runs)} | {speed:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
