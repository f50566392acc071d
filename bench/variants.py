"""A shipped recipe and its variants, scored at each embedding size (its first d values, renormalised): Matryoshka
(equal weights, or the full size weighted up), query/passage prompts, a guide against false negatives (--guide, the
base model), more directions in the loss (GTE's) or hardness weighting, more mined negatives (SciFact), and
sentence-transformers' MatryoshkaLoss(MultipleNegativesRankingLoss) or GISTEmbedLoss trained on the rows of the
matching mnr run with the recipe's settings.

    python -m bench.variants --task scifact --variants recipe prompts --seeds 0 1 2          # dev: choose
    python -m bench.variants --task scifact --variants recipe matryoshka st --seeds 0 1 2 --test   # report once
    python -m bench.variants --task nli --variants recipe matryoshka st --seeds 0 1 2 --test
    python -m bench.variants --task scifact --variants recipe matryoshka-full st-full --seeds 1 2 --test
    python -m bench.variants --task nli --variants recipe guide st-gist --seeds 0 1 2 --test

Tasks: scifact (configs/scifact.toml; NDCG@10 on SciFact train[:100] as dev, its test queries as test) and nli
(configs/best-nli.toml; Spearman on STSb dev and test). Each (task, variant, seed) is kept in
bench/results/variants.json as it finishes (the scores of its best/ on dev, and with --test on test too; the
machine; the precision), so a stopped run resumes. Each run trains once: its dev scores choose, its test scores
are reported only for the choice. A SciFact run takes 25 minutes on 2 CPU cores in fp32 (mining, 75 steps, two
dev evaluations); an NLI run a few. bench/results/matryoshka.json holds the first, fp32 SciFact measurement (an
Intel CPU without AMX; BENCHMARKS.md, "Matryoshka").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS, ROOT, add_seed_flags, chosen_bf16, machine

DIMS = [384, 256, 128, 64, 32]
FILE = RESULTS / "variants.json"
PROMPTS = {"query": "query: ", "passage": "passage: "}
# variant -> (its title in the table, the settings it adds to the recipe); "st" is sentence-transformers
VARIANTS = {
    "recipe": ("the recipe, embeddings cut", {}),
    "matryoshka": ("the recipe + --matryoshka-dims " + " ".join(map(str, DIMS)), {"matryoshka_dims": DIMS}),
    "matryoshka-full": ("the same, weights 4 2 1 1 1 (the full size first)",
                        {"matryoshka_dims": DIMS, "matryoshka_weights": [4.0, 2.0, 1.0, 1.0, 1.0]}),
    "prompts": ("the recipe + --prompts query='query: ' passage='passage: '", {"prompts": PROMPTS}),
    "st": ("sentence-transformers MatryoshkaLoss(MNR), the Matryoshka run's rows", {"matryoshka_dims": DIMS}),
    "st-full": ("sentence-transformers MatryoshkaLoss(MNR), weights 4 2 1 1 1, that run's rows",
                {"matryoshka_dims": DIMS, "matryoshka_weights": [4.0, 2.0, 1.0, 1.0, 1.0]}),
    "guide": ("the recipe + --guide (the base model)", {"guide": "BASE"}),
    "gte": ("the recipe + --directions query_to_doc query_to_query doc_to_query doc_to_doc (GTE's loss)",
            {"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]}),
    "hardness": ("the recipe + --hardness-mode all_negatives --hardness-strength 5",
                 {"hardness_mode": "all_negatives", "hardness_strength": 5.0}),
    "negatives-3": ("the recipe + --mine-negatives 3 (SciFact: three mined negatives a row)", {"mine_negatives": 3}),
    "st-gist": ("sentence-transformers GISTEmbedLoss, the same guide, that run's rows",
                {"guide": "BASE"}),
}
# a sentence-transformers variant -> the mnr run whose rows it trains on (run in the same call, same seed)
ST_ROWS = {"st": "matryoshka", "st-full": "matryoshka-full", "st-gist": "guide"}


@dataclass
class Task:
    config: str  # the recipe, under configs/
    metric: str  # what is scored: "ndcg@10" (retrieval) or "spearman" (STS)
    splits: dict[str, str]  # split -> the set scored (a retrieval spec or an STS file, under the data dir)


TASKS = {"scifact": Task("scifact.toml", "ndcg@10", {"dev": "retrieval/scifact:train[:100]",
                                                      "test": "retrieval/scifact:test"}),
         "nli": Task("best-nli.toml", "spearman", {"dev": "sts/stsb_dev.jsonl.gz", "test": "sts/stsb_test.jsonl.gz"})}


def scores(task: Task, model_dir: str, splits: list[str], data_dir: str) -> dict[str, dict]:
    """{split: the task's metric (x100) at every size of DIMS}, each side with the prompt the model saved for it
    (if any); retrieval splits share SciFact's corpus, embedded once."""
    from mnr.evaluate import STSEvaluator, load_sts
    from mnr.model import SentenceEncoder
    from mnr.retrieval import RetrievalEvaluator, at_dim, encode_for_search, load_retrieval, resolve_retrieval_spec

    encoder, root = SentenceEncoder.load(model_dir), Path(data_dir)
    out, passages = {}, None
    for split in splits:
        if task.metric == "spearman":
            evaluator = STSEvaluator(load_sts(str(root / task.splits[split])), dims=DIMS)
        else:
            evaluator = RetrievalEvaluator(load_retrieval(resolve_retrieval_spec(task.splits[split], root)), dims=DIMS)
            if passages is None:
                passages = encode_for_search(encoder, evaluator.data.passages, 64, False,
                                             prompt=encoder.prompt(role="document"))
            evaluator.reuse(passages)
        measured = evaluator(encoder)
        out[split] = {str(d): measured[at_dim(task.metric, d)] for d in DIMS}
    return out


def config_of(task: Task, variant: str, seed: int, data_dir: str, bf16: bool, **values):
    from mnr.config import TrainConfig

    recipe = TrainConfig.from_sources(str(ROOT / "configs" / task.config))
    settings = {k: recipe.model.model if v == "BASE" else v for k, v in VARIANTS[variant][1].items()}
    return TrainConfig.from_sources(str(ROOT / "configs" / task.config), data_dir=data_dir, seed=seed, bf16=bf16,
                                    **settings, **values)


def train_mnr(config) -> tuple[dict, Path]:
    from mnr.train import train

    result = train(config, progress=False)
    model = result.best or result.final
    return {"model": model.name, "train_seconds": result.train_seconds, "rows": result.rows,
            "rows_per_s": result.rows / result.train_seconds, "bf16": config.training.bf16,
            **({"guide_left_out": result.summary["guide_left_out"]} if "guide_left_out" in result.summary else {})
            }, model


def train_st(config, run: Path, workdir: Path) -> tuple[dict, Path]:
    """sentence-transformers on the rows mnr's run trained on (its mined.jsonl where it mined, else its data), with
    the same settings and precision; its final model (mnr's is best/ by the dev set)."""
    from bench.st import train_st as train_with_st
    from mnr.data import load_training_set

    if (run / "mined.jsonl").exists():
        rows = load_training_set([str(run / "mined.jsonl")])
    else:
        rows = load_training_set(config.data.data, root=Path(config.data.data_dir),
                                 hard_negatives=config.data.hard_negatives)
    model, measured = train_with_st(config, rows, workdir, bf16=config.training.bf16, wrap=st_loss(config))
    model.save(str(workdir / "st-final"))
    return {"model": "final", "train_seconds": measured["seconds"], "rows": measured["rows"],
            "rows_per_s": measured["rows"] / measured["seconds"], "bf16": config.training.bf16}, workdir / "st-final"


def st_loss(config):
    """sentence-transformers' loss for the mnr settings of ``config``: GISTEmbedLoss with its guide (ranking each
    anchor against the same candidates as mnr: positives and negatives, not the other anchors or positives as
    extra columns; the same temperature), or MatryoshkaLoss around MNR."""
    from sentence_transformers import SentenceTransformer, losses

    from mnr.model import resolve_model_path

    if config.guide.guide:
        guide = SentenceTransformer(str(resolve_model_path(config.guide.guide)), device="cpu")
        return lambda st, loss: losses.GISTEmbedLoss(
            st, guide, temperature=1 / config.loss.scale, margin_strategy=config.guide.guide_margin_strategy,
            margin=config.guide.guide_margin, contrast_anchors=False, contrast_positives=False)
    weights = config.matryoshka.matryoshka_weights or None
    return lambda st, loss: losses.MatryoshkaLoss(st, loss, matryoshka_dims=DIMS, matryoshka_weights=weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(TASKS), default="scifact")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["recipe", "matryoshka"],
                        help="st, st-full and st-gist train on the rows of this seed's matryoshka, "
                             "matryoshka-full and guide run, run in the same call")
    add_seed_flags(parser)
    args = parser.parse_args()
    task = TASKS[args.task]
    results = json.loads(FILE.read_text()) if FILE.exists() else {}
    splits, where = ["dev", "test"] if args.test else ["dev"], machine()
    bf16 = chosen_bf16(args)  # decided once: every run in the same precision
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="mnr-variants-") as tmp:
            for variant in args.variants:
                key = f"{args.task}/{variant}@{seed}"
                if key in results and all(split in results[key]["scores"] for split in splits):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
                workdir = Path(tmp) / variant
                if variant in ST_ROWS:
                    entry, model = train_st(config_of(task, variant, seed, args.data_dir, bf16),
                                            Path(tmp) / ST_ROWS[variant] / "run", workdir)
                else:
                    entry, model = train_mnr(config_of(task, variant, seed, args.data_dir, bf16,
                                                       output=str(workdir / "run")))
                entry |= {"scores": scores(task, str(model), splits, args.data_dir), "machine": where}
                results[key] = entry
                FILE.parent.mkdir(parents=True, exist_ok=True)
                FILE.write_text(json.dumps(results, indent=1))
                for split, values in entry["scores"].items():
                    print(f"    {key} {split}: " + ", ".join(f"{d}: {v:.2f}" for d, v in values.items())
                          + f"; {entry['rows_per_s']:.1f} rows/s, {'bf16' if entry['bf16'] else 'fp32'}", flush=True)
    for split in splits:
        print(table(results, args.task, split, args.variants))
    print(f"machine: {where}")


def table(results: dict, task: str, split: str, variants: list[str]) -> str:
    lines = [f"| {split} {TASKS[task].metric} | " + " | ".join(f"{d}" for d in DIMS) + " | seeds | rows/s |",
             "|---|" + "---:|" * (len(DIMS) + 2)]
    for variant in variants:
        runs = [r for key, r in results.items() if key.split("@")[0] == f"{task}/{variant}" and split in r["scores"]]
        if runs:
            cells = [f"{statistics.mean(r['scores'][split][str(d)] for r in runs):.2f}" for d in DIMS]
            speed = statistics.mean(r["rows_per_s"] for r in runs)
            lines.append(f"| {VARIANTS[variant][0]} | " + " | ".join(cells) + f" | {len(runs)} | {speed:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
