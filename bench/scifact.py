"""configs/scifact.toml and its variants on SciFact: NDCG@10 at each embedding size (its first 384, 256, 128, 64,
32 values) for the recipe as it is, the recipe with --matryoshka-dims (equal or other weights), with query/passage
prompts, and sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss) trained on the rows mnr mined for
the Matryoshka run, with the recipe's settings.

    python -m bench.scifact --variants recipe prompts --seeds 0 1 2            # dev (train[:100]): choose
    python -m bench.scifact --variants recipe matryoshka st --seeds 0 1 2 --test   # and test: report once

Each (variant, seed) is kept in bench/results/scifact.json as it finishes (NDCG@10 of its best/ on dev, and with
--test on SciFact's test queries too; the machine; the precision), so a stopped run resumes. Each run is trained
once: its dev scores choose, its test scores are reported only for the choice. A run of the recipe takes about
25 minutes on 2 CPU cores in fp32 (mining, 75 steps, two dev evaluations). bench/results/matryoshka.json holds the
first, fp32 measurement (an Intel CPU without AMX; BENCHMARKS.md, "Matryoshka").
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
FILE = RESULTS / "scifact.json"
PROMPTS = {"query": "query: ", "passage": "passage: "}
# variant -> (its title in the table, the settings it adds to configs/scifact.toml); "st" is sentence-transformers
VARIANTS = {
    "recipe": ("configs/scifact.toml, embeddings cut", {}),
    "matryoshka": ("the recipe + --matryoshka-dims " + " ".join(map(str, DIMS)), {"matryoshka_dims": DIMS}),
    "matryoshka-full": ("the same, weights 4 2 1 1 1 (the full size first)",
                        {"matryoshka_dims": DIMS, "matryoshka_weights": [4.0, 2.0, 1.0, 1.0, 1.0]}),
    "prompts": ("the recipe + --prompts query='query: ' passage='passage: '", {"prompts": PROMPTS}),
    "st": ("sentence-transformers MatryoshkaLoss(MNR), the Matryoshka run's rows", {"matryoshka_dims": DIMS}),
}


def scores(model_dir: str, splits: list[str], data_dir: str) -> dict[str, dict]:
    """{split: NDCG@10 (x100) at every size of DIMS}, each side with the prompt the model saved for it (if any); the
    splits share SciFact's corpus, embedded once."""
    from mnr.model import SentenceEncoder
    from mnr.retrieval import RetrievalEvaluator, at_dim, encode_for_search, load_retrieval, resolve_retrieval_spec

    encoder = SentenceEncoder.load(model_dir)
    out, passages = {}, None
    for split in splits:
        evaluator = RetrievalEvaluator(load_retrieval(resolve_retrieval_spec(SPLITS[split], Path(data_dir))), dims=DIMS)
        if passages is None:
            passages = encode_for_search(encoder, evaluator.data.passages, 64, False, prompt=encoder.prompt(
                role="document"))
        evaluator.reuse(passages)
        measured = evaluator(encoder)
        out[split] = {str(d): measured[at_dim("ndcg@10", d)] for d in DIMS}
    return out


def config_of(variant: str, seed: int, data_dir: str, bf16: bool, **values):
    from mnr.config import TrainConfig

    return TrainConfig.from_sources(str(ROOT / "configs" / "scifact.toml"), data_dir=data_dir, seed=seed, bf16=bf16,
                                    **VARIANTS[variant][1], **values)


def train_mnr(config) -> tuple[dict, Path]:
    from mnr.train import train

    result = train(config, progress=False)
    model = result.best or result.final
    return {"model": model.name, "train_seconds": result.train_seconds, "rows": result.rows,
            "rows_per_s": result.rows / result.train_seconds,
            "bf16": "bf16 = true" in (model / "mnr_config.toml").read_text()}, model


def train_st(config, run: Path, workdir: Path) -> tuple[dict, Path]:
    """sentence-transformers on the rows mnr's Matryoshka run mined (RUN/mined.jsonl), same settings and precision."""
    from sentence_transformers import losses

    from bench.st import train_st as train_with_st
    from mnr.data import load_training_set

    rows = load_training_set([str(run / "mined.jsonl")])
    model, measured = train_with_st(config, rows, workdir, bf16=config.training.bf16,
                                    wrap=lambda st, loss: losses.MatryoshkaLoss(st, loss, matryoshka_dims=DIMS))
    model.save(str(workdir / "st-final"))
    return {"model": "final", "train_seconds": measured["seconds"], "rows": measured["rows"],
            "rows_per_s": measured["rows"] / measured["seconds"], "bf16": config.training.bf16}, workdir / "st-final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["recipe", "matryoshka"],
                        help="st trains on the rows of this seed's matryoshka run (run in the same call)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test", action="store_true", help="also score each run's best/ on the test queries")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="the precision of every run (default: mnr's choice for this machine, made once)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    args = parser.parse_args()
    results = json.loads(FILE.read_text()) if FILE.exists() else {}
    splits, where = ["dev", "test"] if args.test else ["dev"], machine()
    bf16 = args.bf16 if args.bf16 is not None else _auto_bf16()  # decided once: every run in the same precision
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="mnr-scifact-") as tmp:
            for variant in args.variants:
                key = f"{variant}@{seed}"
                if key in results and all(split in results[key]["ndcg@10"] for split in splits):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                workdir = Path(tmp) / variant
                if variant == "st":
                    entry, model = train_st(config_of("st", seed, args.data_dir, bf16),
                                            Path(tmp) / "matryoshka" / "run", workdir)
                else:
                    entry, model = train_mnr(config_of(variant, seed, args.data_dir, bf16,
                                                       output=str(workdir / "run")))
                entry |= {"ndcg@10": scores(str(model), splits, args.data_dir), "machine": where}
                results[key] = entry
                FILE.parent.mkdir(parents=True, exist_ok=True)
                FILE.write_text(json.dumps(results, indent=1))
                for split, ndcg in entry["ndcg@10"].items():
                    print(f"    {key} {split}: " + ", ".join(f"{d}: {v:.2f}" for d, v in ndcg.items())
                          + f"; {entry['rows_per_s']:.1f} rows/s, {'bf16' if entry['bf16'] else 'fp32'}", flush=True)
    for split in splits:
        print(table(results, split, args.variants))
    print(f"machine: {where}")


def _auto_bf16() -> bool:
    """mnr's choice of precision on this machine's CPU (the s-t side runs in the same)."""
    import torch

    from mnr.device import native_bf16

    return native_bf16(torch.device("cpu"))


def table(results: dict, split: str, variants: list[str]) -> str:
    lines = [f"| {split} NDCG@10 | " + " | ".join(f"{d}" for d in DIMS) + " | seeds | rows/s |",
             "|---|" + "---:|" * (len(DIMS) + 2)]
    for variant in variants:
        runs = [r for key, r in results.items() if key.split("@")[0] == variant and split in r["ndcg@10"]]
        if runs:
            cells = [f"{statistics.mean(r['ndcg@10'][split][str(d)] for r in runs):.2f}" for d in DIMS]
            speed = statistics.mean(r["rows_per_s"] for r in runs)
            lines.append(f"| {VARIANTS[variant][0]} | " + " | ".join(cells) + f" | {len(runs)} | {speed:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
