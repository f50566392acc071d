"""Semantic search on BEIR SciFact: mnr against sentence-transformers, same base model, data and run.

    python -m bench.retrieval --search         # recipe search on a dev split carved from the training queries
    python -m bench.retrieval                  # the benchmark on the test queries, 3 seeds; writes BENCHMARKS.md
    python -m bench.retrieval --quick          # seed 0, no --mined rows, no cross-check (about 2.5 hours on 2 cores)
    python -m bench.retrieval --seeds 0 --recipe-seeds 0 --mined rel0.05 --cached-only   # the table kept so far

The full run trains 24 models and encodes the corpus after each: about 13 hours on 2 CPU cores.

Data (retrieval/scifact under --data-dir): 5,183 abstracts; 809 training queries, of which a fixed
pseudo-random 100 (``train[:100]``) are the dev set the recipe is chosen on and the other 709
(``train[100:]``, 800 judged pairs) are trained on; the 300 test queries are only reported. The base
model is the packaged all-MiniLM-L6-v2 (64.51 NDCG@10 zero-shot on test, MTEB).

Every training, evaluation and mining runs in a child process with the same thread count, one at
a time. Quality: mnr's retrieval evaluator (trec_eval definitions, checked against pytrec_eval in
the tests) scores every model, sentence-transformers' too; the zero-shot row also shows
sentence-transformers' own InformationRetrievalEvaluator. Results are kept in
bench/results/retrieval.json, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import BASE_MODEL, DEFAULT_DATA_DIR, ROOT, machine, write_section

RESULTS = ROOT / "bench" / "results" / "retrieval.json"
SCIFACT = "retrieval/scifact"
TRAIN, DEV, TEST = f"{SCIFACT}:train[100:]", f"{SCIFACT}:train[:100]", f"{SCIFACT}:test"
COMMON = {"max_seq_length": 256, "eval_steps": 100_000, "save_every": 0}  # the base model's own max length

# Mining settings: NV-Retriever's relative margin (Moreira et al. 2024, sentence-transformers' recommendation), an
# absolute margin, and none (the plain top of the ranking).
MINING = {
    "rel0.05": {"num_negatives": 3, "range_max": 50, "relative_margin": 0.05},
    "abs0.1": {"num_negatives": 3, "range_max": 50, "absolute_margin": 0.1},
    "top": {"num_negatives": 3, "range_max": 50},
    "rel0.05x1": {"num_negatives": 1, "range_max": 50, "relative_margin": 0.05},
    # a row whose top 50 all pass within the margin (its positive ranks low: the rows it most needs) still gets one
    "rel0.05x1-range1000": {"num_negatives": 1, "range_max": 1000, "relative_margin": 0.05},
}
# name -> (what changes, training settings, mining setting or None). Chosen on dev (train[:100]).
SEARCH = {
    "pairs": ("(query, relevant abstract) pairs, batch 32, lr 2e-5, 1 epoch", {}, None),
    "pairs-3ep": ("pairs, 3 epochs", {"epochs": 3}, None),
    "pairs-lr5e-5-3ep": ("pairs, lr 5e-5, 3 epochs", {"lr": 5e-5, "epochs": 3}, None),
    "mined1-lr5e-5-3ep": ("pairs + 1 mined negative (relative margin 0.05, range 50), lr 5e-5, 3 epochs",
                          {"lr": 5e-5, "epochs": 3}, "rel0.05x1"),
    "mined1-range1000-lr5e-5-3ep": ("pairs + 1 mined negative (relative margin 0.05, range 1000: fewer rows left out), "
                                    "lr 5e-5, 3 epochs", {"lr": 5e-5, "epochs": 3}, "rel0.05x1-range1000"),
    "mined1-range1000-symmetric": ("the above, symmetric loss (also rank queries given each relevant abstract)",
                                   {"lr": 5e-5, "epochs": 3, "symmetric": True}, "rel0.05x1-range1000"),
}


# ---------------------------------------------------------------- workers (child processes)


def mine_rows(setting: str, data_dir: str, out: Path) -> dict:
    """mnr's mining of the training pairs against the whole corpus with the base model, timed."""
    from mnr.data import load_training_set
    from mnr.fileio import write_rows
    from mnr.mine import MiningSettings, columns, mine
    from mnr.model import SentenceEncoder
    from mnr.retrieval import load_corpus

    root = Path(data_dir)
    rows = [tuple(r) for r in load_training_set([TRAIN], root=root).rows]
    corpus = load_corpus(root / SCIFACT)[1]
    encoder = SentenceEncoder.load(BASE_MODEL, max_seq_length=COMMON["max_seq_length"])
    start = time.perf_counter()
    # a setting without a relative margin has none (mnr's default margin is 0.05; sentence-transformers' none)
    mined = mine(encoder, rows, corpus, MiningSettings(**{"relative_margin": 0, **MINING[setting]}), progress=False)
    seconds = time.perf_counter() - start
    k = MINING[setting]["num_negatives"]
    write_rows(out, columns(k), mined.rows)
    return {"seconds": seconds, "rows": len(mined.rows), "short": mined.short}


def st_mine_rows(setting: str, data_dir: str, out: Path) -> dict:
    """sentence-transformers' mine_hard_negatives on the same pairs, corpus, model and setting, timed."""
    import datasets
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from mnr.data import load_training_set
    from mnr.fileio import write_rows
    from mnr.model import resolve_model_path
    from mnr.retrieval import load_corpus

    root = Path(data_dir)
    rows = load_training_set([TRAIN], root=root).rows
    corpus = load_corpus(root / SCIFACT)[1]
    model = SentenceTransformer(str(resolve_model_path(BASE_MODEL)), device="cpu")
    model.max_seq_length = COMMON["max_seq_length"]
    dataset = datasets.Dataset.from_dict({"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows]})
    setting_ = dict(MINING[setting])
    start = time.perf_counter()
    mined = mine_hard_negatives(dataset, model, corpus=corpus, output_format="n-tuple", batch_size=64,
                                verbose=False, **setting_)
    seconds = time.perf_counter() - start
    columns = mined.column_names
    write_rows(out, columns, [tuple(row[c] for c in columns) for row in mined])
    return {"seconds": seconds, "rows": len(mined), "short": len(rows) - len(mined)}


def evaluate(model, data_dir: str, spec: str) -> dict:
    from mnr.retrieval import RetrievalEvaluator, load_retrieval, resolve_retrieval_spec

    data = load_retrieval(resolve_retrieval_spec(spec, Path(data_dir)))
    return RetrievalEvaluator(data, name=spec)(model)


def train_mnr(settings: dict, data: list[str], seed: int, data_dir: str, eval_on: str, workdir: Path,
              ir_dev: str = "") -> dict:
    from mnr.config import TrainConfig
    from mnr.model import SentenceEncoder
    from mnr.train import train

    config = TrainConfig(model=BASE_MODEL, data=data, data_dir=data_dir, output=str(workdir / "run"), seed=seed,
                         ir_dev=ir_dev, **{**COMMON, **settings})
    result = train(config, progress=False)
    model = SentenceEncoder.load(str(result.best or result.final))
    return {"train_seconds": result.train_seconds, "rows": result.rows, "steps": result.steps,
            "model": "best" if result.best else "final", "dev": {result.best_metric: result.best_score},
            "scores": evaluate(model, data_dir, eval_on)}


def train_st(settings: dict, data: str, seed: int, data_dir: str, eval_on: str, workdir: Path) -> dict:
    """sentence-transformers' trainer: MNR, no-duplicates batches, the same settings as mnr's run."""
    from bench.st import train_st as train_with_st
    from mnr.config import TrainConfig
    from mnr.data import load_training_set
    from mnr.model import SentenceEncoder

    config = TrainConfig(model=BASE_MODEL, data=[data], seed=seed, **{**COMMON, **settings})
    rows = load_training_set([data], root=Path(data_dir))
    model, run = train_with_st(config, rows, workdir)
    model.save(str(workdir / "st-final"))
    encoder = SentenceEncoder.load(str(workdir / "st-final"))
    return {"train_seconds": run["seconds"], "rows": run["rows"], "steps": run["steps"], "model": "final",
            "scores": evaluate(encoder, data_dir, eval_on)}


def st_zero_shot(data_dir: str) -> dict:
    """sentence-transformers' own InformationRetrievalEvaluator on the base model (a cross-check)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from mnr.model import resolve_model_path
    from mnr.retrieval import load_retrieval, resolve_retrieval_spec

    data = load_retrieval(resolve_retrieval_spec(TEST, Path(data_dir)))
    model = SentenceTransformer(str(resolve_model_path(BASE_MODEL)), device="cpu")
    evaluator = InformationRetrievalEvaluator(
        data.queries, dict(zip(data.passage_ids, data.passages, strict=True)),
        {q: set(r) for q, r in data.qrels.items()}, name="scifact", batch_size=64, write_csv=False,
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[10, 100], map_at_k=[100])
    metrics = evaluator(model)
    return {"ndcg@10": 100 * metrics["scifact_cosine_ndcg@10"], "mrr@10": 100 * metrics["scifact_cosine_mrr@10"],
            "recall@100": 100 * metrics["scifact_cosine_recall@100"]}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    job = json.loads(args.worker)
    with tempfile.TemporaryDirectory(prefix="mnr-retrieval-") as tmp:
        workdir = Path(tmp)
        kind = job["kind"]
        if kind == "zero-shot":
            from mnr.model import SentenceEncoder

            encoder = SentenceEncoder.load(BASE_MODEL)
            result = {"scores": evaluate(encoder, args.data_dir, job["eval_on"])}
        elif kind == "st-zero-shot":
            result = {"scores": st_zero_shot(args.data_dir)}
        elif kind == "mine":
            result = mine_rows(job["setting"], args.data_dir, Path(job["out"]))
        elif kind == "st-mine":
            result = st_mine_rows(job["setting"], args.data_dir, Path(job["out"]))
        elif kind == "mnr":
            result = train_mnr(job["settings"], job["data"], job["seed"], args.data_dir, job["eval_on"], workdir,
                               job.get("ir_dev", ""))
        else:
            result = train_st(job["settings"], job["data"], job["seed"], args.data_dir, job["eval_on"], workdir)
    Path(args.json).write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def same_job(a: dict, b: dict) -> bool:
    """Whether two jobs train and score the same way: every setting equal, data files compared by name (a kept
    result may come from another checkout of the repository)."""
    def names(data) -> list[str]:
        return [Path(d).name for d in ([data] if isinstance(data, str) else data or [])]

    def rest(job: dict) -> dict:
        return {k: v for k, v in job.items() if k not in ("data", "out")}

    return rest(a) == rest(b) and names(a.get("data")) == names(b.get("data"))


def run_job(key: str, job: dict, args, results: dict) -> dict | None:
    """Run ``job`` in a child unless ``results`` holds ``key`` for the same job (a result kept for other settings,
    e.g. after configs/scifact.toml changed, is run anew); keep and save its result. ``--cached-only``: None for
    a job not run yet."""
    kept = results.get(key)
    if kept is not None and not same_job(kept["job"], job):
        action = "left out" if args.cached_only else "run anew"
        print(f"[{time.strftime('%H:%M:%S')}] {key}: kept for other settings, {action}", flush=True)
        kept = None
    if kept is not None or args.cached_only:
        return kept
    print(f"[{time.strftime('%H:%M:%S')}] {key} ...", flush=True)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "bench.retrieval", "--worker", json.dumps(job), "--json", out.name,
                   "--data-dir", args.data_dir, "--threads", str(args.threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run(command, check=True, env=env, cwd=ROOT)
        result = json.loads(Path(out.name).read_text())
    result["job"] = job
    results[key] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    scores = result.get("scores", {})
    print(f"    {', '.join(f'{k} {v:.2f}' for k, v in scores.items())} {result.get('seconds', '')}", flush=True)
    return result


def mined_file(setting: str, impl: str, args, results: dict) -> str:
    """The training pairs with negatives mined by ``impl`` (mnr or sentence-transformers), cached on disk."""
    out = ROOT / "bench" / "out" / f"scifact-train-{impl}-{setting}.jsonl"
    key = f"mine:{impl}:{setting}"
    if not out.exists():
        results.pop(key, None)
    run_job(key, {"kind": "mine" if impl == "mnr" else "st-mine", "setting": setting, "out": str(out)}, args,
            results)
    return str(out)


def first_negatives(path: str, k: int) -> str:
    """``path``'s rows with their first (best-ranked) ``k`` negatives only: a row of a query and 4 abstracts costs
    4 times a pair to train on, more than 2 CPU cores allow for 3 seeds."""
    from mnr.data import load_training_set
    from mnr.fileio import write_rows
    from mnr.mine import columns

    out = Path(path).with_name(Path(path).stem + f"-first{k}.jsonl")
    write_rows(out, columns(k), [row[: 2 + k] for row in load_training_set([path]).rows])  # anew: path may be re-mined
    return str(out)


def search(args, results: dict) -> None:
    run_job("search:zero-shot", {"kind": "zero-shot", "eval_on": DEV}, args, results)
    for name, (_, settings, mining) in SEARCH.items():
        data = [mined_file(mining, "mnr", args, results)] if mining else [TRAIN]
        run_job(f"search:{name}", {"kind": "mnr", "settings": settings, "data": data, "seed": 0, "eval_on": DEV},
                args, results)
    print(search_table(results))


def search_table(results: dict) -> str:
    """The dev scores of the candidates searched so far (seed 0)."""
    lines = ["| candidate | what | dev NDCG@10 | dev MRR@10 | dev Recall@100 | training time (s) |",
             "|---|---|---:|---:|---:|---:|"]
    zero = results["search:zero-shot"]["scores"]
    lines.append(f"| zero-shot | the base model | {zero['ndcg@10']:.2f} | {zero['mrr@10']:.2f} "
                 f"| {zero['recall@100']:.2f} | |")
    for name, (what, _, _) in SEARCH.items():
        if f"search:{name}" in results:
            r = results[f"search:{name}"]
            lines.append(f"| {name} | {what} | {r['scores']['ndcg@10']:.2f} | {r['scores']['mrr@10']:.2f} "
                         f"| {r['scores']['recall@100']:.2f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def recipe_mining_setting(mining: dict) -> str:
    """The MINING entry the recipe's mine_* settings are (mnr train's defaults filled in)."""
    from mnr.config import TrainConfig

    settings = TrainConfig(**mining).mining
    wanted = {"num_negatives": settings.num_negatives, "range_max": settings.range_max}
    if settings.relative_margin:
        wanted["relative_margin"] = settings.relative_margin
    for name, setting in MINING.items():
        if setting == wanted:
            return name
    raise SystemExit(f"configs/scifact.toml mines with {wanted}: add that to MINING in {__file__}")


def describe(setting: str) -> str:
    m = MINING[setting]
    margin = (f"relative margin {m['relative_margin']}" if "relative_margin" in m else
              f"absolute margin {m['absolute_margin']}" if "absolute_margin" in m else "no margin")
    return f"{m['num_negatives']} negative{'s' if m['num_negatives'] > 1 else ''} ({margin}, range {m['range_max']})"


def mean(runs: list[dict], metric: str) -> float:
    return statistics.mean(r["scores"][metric] for r in runs)


def benchmark(args, results: dict) -> str:
    """Test-query rows, each the mean of its seeds: zero-shot; mnr's recipe (best/ by dev; when it mines, also the
    pairs without mining, and sentence-transformers on its own mining with the recipe's setting); mnr and
    sentence-transformers trained on the negatives each mined (first ``--negatives`` of 3 per row, each
    ``--mined`` setting); sentence-transformers on the pairs. Every training uses the recipe's settings."""
    from mnr.config import load_toml

    recipe = load_toml(ROOT / "configs" / "scifact.toml")
    training = {k: v for k, v in recipe.items() if k not in ("data", "ir_dev", "best_metric")
                and not k.startswith("mine_")}  # every row's settings; the recipe row mines as well
    mining = {k: v for k, v in recipe.items() if k.startswith("mine_")}
    recipe_mining = recipe_mining_setting(mining) if mining else None

    def runs(name: str, kind: str, data, seeds, settings=training, **extra) -> list[dict]:
        done = [run_job(f"bench:{name}@{seed}", {"kind": kind, "settings": settings, "data": data,
                                                  "seed": seed, "eval_on": TEST, **extra}, args, results)
                for seed in seeds]
        return [r for r in done if r]  # --cached-only: the seeds run so far

    zero = run_job("bench:zero-shot", {"kind": "zero-shot", "eval_on": TEST}, args, results)
    st_zero = run_job("bench:st-zero-shot", {"kind": "st-zero-shot"}, args, results) if args.cross_check else None
    what = f"pairs + {describe(recipe_mining)} mined by `mnr train`" if recipe_mining else "the pairs"
    rows = {f"mnr: recipe (configs/scifact.toml: {what}; best/ by dev)":
            runs(f"recipe-{recipe_mining}" if recipe_mining else "recipe", "mnr", recipe["data"], args.recipe_seeds,
                 {**training, **mining}, ir_dev=recipe["ir_dev"])}
    if recipe_mining:
        rows["mnr: the pairs (the recipe without mining; best/ by dev)"] = runs(
            "recipe", "mnr", [TRAIN], args.recipe_seeds, ir_dev=recipe["ir_dev"])
    # mining is timed even where it is not trained on
    timed = list(dict.fromkeys(([recipe_mining] if recipe_mining else []) + args.mined)) or ["rel0.05"]
    mined = {(impl, s): mined_file(s, impl, args, results) for s in timed for impl in ("mnr", "st")}
    if recipe_mining:
        rows[f"sentence-transformers: pairs + {describe(recipe_mining)} by its `mine_hard_negatives` (the recipe's "
             "data)"] = runs(f"st-mined-{recipe_mining}", "st", mined["st", recipe_mining], args.seeds)
    k = args.negatives
    for setting in args.mined:
        path = first_negatives(mined["mnr", setting], k)
        rows[f"mnr: pairs + {k} mined negative(s) ({setting}, `mnr mine`)"] = runs(
            f"mnr-mined-{setting}-first{k}", "mnr", [path], args.seeds)
    rows["sentence-transformers: pairs"] = runs("st-pairs", "st", TRAIN, args.seeds)
    for setting in args.mined:
        path = first_negatives(mined["st", setting], k)
        rows[f"sentence-transformers: pairs + {k} mined negative(s) ({setting}, its `mine_hard_negatives`)"] = runs(
            f"st-mined-{setting}-first{k}", "st", path, args.seeds)
    lines = ["| run | test NDCG@10 (mean) | test MRR@10 | test Recall@100 | per seed NDCG@10 | training time (s) |",
             "|---|---:|---:|---:|---|---:|",
             f"| zero-shot (mnr's evaluator) | {zero['scores']['ndcg@10']:.2f} | {zero['scores']['mrr@10']:.2f} "
             f"| {zero['scores']['recall@100']:.2f} | | |"]
    if st_zero:
        lines.append(f"| zero-shot (sentence-transformers' InformationRetrievalEvaluator) "
                     f"| {st_zero['scores']['ndcg@10']:.2f} | {st_zero['scores']['mrr@10']:.2f} "
                     f"| {st_zero['scores']['recall@100']:.2f} | | |")
    for name, done in rows.items():
        if not done:
            lines.append(f"| {name} | not run yet | | | | |")
            continue
        per_seed = ", ".join(f"{r['scores']['ndcg@10']:.2f} (seed {r['job']['seed']})" for r in done)
        seconds = statistics.mean(r["train_seconds"] for r in done)
        lines.append(f"| {name} | {mean(done, 'ndcg@10'):.2f} | {mean(done, 'mrr@10'):.2f} "
                     f"| {mean(done, 'recall@100'):.2f} | {per_seed} | {seconds:.0f} |")
    lines += ["", "| mining the 800 training pairs against the 5,183 abstracts | seconds | rows written "
                  "| rows left out |", "|---|---:|---:|---:|"]
    for setting in timed:
        mnr_mine, st_mine = results.get(f"mine:mnr:{setting}"), results.get(f"mine:st:{setting}")
        if not (mnr_mine and st_mine):
            lines.append(f"| {setting} ({describe(setting)}) | not timed yet on both sides | | |")
            continue
        lines += [f"| {setting} ({describe(setting)}): mnr (`mnr mine`) | {mnr_mine['seconds']:.1f} "
                  f"| {mnr_mine['rows']} | {mnr_mine['short']} |",
                  f"| {setting}: sentence-transformers (`mine_hard_negatives`) | {st_mine['seconds']:.1f} "
                  f"| {st_mine['rows']} | {st_mine['short']} |",
                  f"| {setting}: ratio (sentence-transformers ÷ mnr) | {st_mine['seconds'] / mnr_mine['seconds']:.2f}x "
                  "| | |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", action="store_true", help="the recipe search on the dev split")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every trained row")
    parser.add_argument("--recipe-seeds", type=int, nargs="+", help="seeds of mnr's recipe row (default: --seeds)")
    parser.add_argument("--mined", nargs="*", default=["rel0.05", "abs0.1"], choices=sorted(MINING),
                        help="mining settings to train on, each side on its own mined negatives")
    parser.add_argument("--negatives", type=int, default=1, choices=(1, 2, 3),
                        help="negatives per row to train on: the first (best-ranked) of the 3 mined")
    parser.add_argument("--no-cross-check", dest="cross_check", action="store_false",
                        help="skip sentence-transformers' InformationRetrievalEvaluator on the base model")
    parser.add_argument("--quick", action="store_true",
                        help="seed 0, no --mined rows (the recipe's own mining only), no cross-check")
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave BENCHMARKS.md")
    parser.add_argument("--cached-only", action="store_true",
                        help="run nothing: the table of the results kept so far (rows not run yet say so)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.search:
        search(args, results)
        return
    if args.quick:
        args.seeds, args.mined, args.cross_check = [0], [], False
    args.recipe_seeds = args.recipe_seeds or args.seeds
    command = "python -m bench.retrieval " + " ".join(sys.argv[1:])
    table = benchmark(args, results)
    print(table)
    if args.no_write:
        return
    started = datetime.datetime.now().strftime("%Y-%m-%d")
    seeds = "each row the mean of the seeds it lists" + (" (`--quick`: seed 0)" if args.quick else "")
    write_section(ROOT / "BENCHMARKS.md", "bench/retrieval.py", f"""## Retrieval (semantic search): BEIR SciFact

Command: `{command}` ({"the table of the results kept by the runs below, written" if args.cached_only else "finished"}
{started}; results in `bench/results/retrieval.json`). Machine: {machine()};
{args.threads} torch threads, one job at a time, each in its own process.
Base model: the packaged all-MiniLM-L6-v2, max length 256. Training data: the 800 judged (query, abstract)
pairs of 709 SciFact training queries (`train[100:]`); the other 100 training queries (`train[:100]`) are the
dev set the recipe was chosen on; the 300 test queries are reported only. Every row of a side uses the
recipe's settings (`configs/scifact.toml`: batch, learning rate, epochs, max length); the rows that say so
keep `best/` by dev NDCG@10 (the dev set scored before and after training), every other row its final
model. Mining is always with the base model; a row that mines trains on the rows its mining kept, and its
training time leaves the mining out (timed below). A `--mined` row trains on its first {args.negatives} negative(s)
(the best-ranked) of the 3 mined per row. All scores by mnr's evaluator (exact search over the whole corpus;
trec_eval definitions), x100, {seeds}.

{table}

How the recipe was chosen (`python -m bench.retrieval --search`; seed 0; dev = `train[:100]`, each
candidate's final model; batch 32, max length 256):

{search_table(results) if "search:zero-shot" in results else "(not run)"}
""")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
