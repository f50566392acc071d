"""Side-by-side benchmark: mnr against sentence-transformers' own trainer, same recipe, same run.

    python -m bench.compare                                   # all recipes, all data (about 1.5 h on 2 cores)
    python -m bench.compare --recipes mnr-pairs --max-pairs 2000 --no-write   # a quick check

Every (recipe, implementation) trains in a fresh child process with the same thread count, base
model (the packaged all-MiniLM-L6-v2), data rows, batch size, learning rate, warm-up, weight
decay, clipping, epochs, seed and maximum sequence length; MNR recipes use duplicate-free batches
on both sides. The two implementations alternate which goes first from one recipe to the next.

Measured per run: training throughput (examples/s over the training loop only: evaluation time is
subtracted), peak RSS of the process, STSb dev and test Spearman after training (each
implementation scored by its own evaluator; the zero-shot row shows the two agree), and encoding
throughput on the STSb test sentences. Writes bench/results/compare.json, PNG plots beside it, and
its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import BASE_MODEL, DEFAULT_DATA_DIR, NLI_FILES, RESULTS, ROOT, machine, peak_rss_mb, write_section

RECIPES = {
    "zero-shot": None,  # the base model as it is
    "softmax": {"loss": "softmax"},  # SBERT's classifier on every labelled NLI pair
    "mnr-pairs": {"loss": "mnr"},  # (premise, entailment)
    "mnr-triplets": {"loss": "mnr", "hard_negatives": True},  # (premise, entailment, contradiction)
    # each side's best NLI recipe: mnr's recipe file; for sentence-transformers, MNR on triplets
    "best": "configs/best-nli.toml",
}
ST_RECIPES = {**RECIPES, "best": RECIPES["mnr-triplets"]}
# The recipe both sides share (mnr's defaults; sentence-transformers is set to the same values).
SHARED = {"batch_size": 32, "lr": 2e-5, "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0,
          "epochs": 1, "seed": 0, "max_seq_length": 128, "scale": 20.0}


# ---------------------------------------------------------------- workers (child processes)


def sts_sentences(examples) -> list[str]:
    return list(dict.fromkeys(s for e in examples for s in (e.sentence1, e.sentence2)))


def time_encoding(encode, sentences: list[str]) -> float:
    encode(sentences[:64])  # warm-up
    start = time.perf_counter()
    encode(sentences)
    return len(sentences) / (time.perf_counter() - start)


def training_set(recipe: dict, data_dir: str, max_pairs: int):
    from mnr.data import load_training_set
    from mnr.losses import LOSSES

    data = load_training_set(NLI_FILES, root=Path(data_dir), wants=LOSSES[recipe["loss"]].input,
                             hard_negatives=recipe.get("hard_negatives", False))
    return data.sample(max_pairs, SHARED["seed"])


def eval_steps_for(rows: int, batch_size: int) -> int:
    """About ten evaluations per run, for the dev-vs-step curve."""
    return max(1, rows // batch_size // 10)


def mnr_config(recipe_name: str, data_dir: str, max_pairs: int, output: Path, mnr_flags: dict):
    """The TrainConfig of a recipe: the shared settings, or a recipe file's (which override them)."""
    from mnr.config import TrainConfig

    recipe = RECIPES[recipe_name]
    common = {"model": BASE_MODEL, "data": NLI_FILES, "data_dir": data_dir, "output": str(output),
              "max_examples": max_pairs, "sts_dev": "sts/stsb_dev.jsonl.gz", **mnr_flags}
    if isinstance(recipe, str):
        config = TrainConfig.from_sources(str(ROOT / recipe), **common)
    else:
        config = TrainConfig(**common, **SHARED, **recipe)
    rows = len(training_set({"loss": config.training.loss, "hard_negatives": config.data.hard_negatives}, data_dir,
                            max_pairs))
    return config.replace(eval_steps=eval_steps_for(rows * config.training.epochs, config.training.batch_size))


def run_mnr(recipe_name: str, data_dir: str, max_pairs: int, workdir: Path, mnr_flags: dict) -> dict:
    from mnr.evaluate import evaluate_sts, load_sts
    from mnr.fileio import resolve_path
    from mnr.model import SentenceEncoder
    from mnr.train import train

    root = Path(data_dir)
    dev = load_sts(resolve_path("sts/stsb_dev.jsonl.gz", root))
    test = load_sts(resolve_path("sts/stsb_test.jsonl.gz", root))
    out: dict = {"impl": "mnr", "recipe": recipe_name, "settings": mnr_flags}
    if RECIPES[recipe_name] is None:
        encoder = SentenceEncoder.load(BASE_MODEL)
    else:
        config = mnr_config(recipe_name, data_dir, max_pairs, workdir / "mnr", mnr_flags)
        out["config"] = config.to_toml()
        result = train(config, progress=False)
        log = [json.loads(line) for line in (workdir / "mnr" / "log.jsonl").read_text().splitlines()]
        out |= {
            "rows": result.rows, "steps": result.steps, "train_seconds": result.train_seconds,
            "losses": [[e["step"], e["loss"]] for e in log if "loss" in e],
            "dev_curve": [[e["step"], e["sts_dev"]["spearman"]] for e in log if "sts_dev" in e],
        }
        encoder = SentenceEncoder.load(str(result.final))
    out["dev"], out["test"] = evaluate_sts(encoder, dev), evaluate_sts(encoder, test)
    sentences = sts_sentences(test)
    out["encode_per_s"] = time_encoding(lambda s: encoder.encode(s, batch_size=64), sentences)
    out["encode_bf16_per_s"] = time_encoding(lambda s: encoder.encode(s, batch_size=64, bf16=True), sentences)
    if RECIPES[recipe_name] is None:  # for the equality check against sentence-transformers' embeddings
        np.save(workdir.parent / "zero-shot-mnr.npy", encoder.encode(sentences, batch_size=64, normalize=True))
        np.save(workdir.parent / "zero-shot-mnr-bf16.npy",
                encoder.encode(sentences, batch_size=64, normalize=True, bf16=True))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_sentence_transformers(recipe_name: str, data_dir: str, max_pairs: int, workdir: Path) -> dict:
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from bench.st import train_st
    from mnr.config import TrainConfig
    from mnr.evaluate import load_sts
    from mnr.fileio import resolve_path

    root = Path(data_dir)
    dev = load_sts(resolve_path("sts/stsb_dev.jsonl.gz", root))
    test = load_sts(resolve_path("sts/stsb_test.jsonl.gz", root))

    def evaluator(examples, name):
        return EmbeddingSimilarityEvaluator([e.sentence1 for e in examples], [e.sentence2 for e in examples],
                                            [e.score for e in examples], batch_size=64, name=name,
                                            write_csv=False)

    def score(model, examples, name) -> dict:
        metrics = evaluator(examples, name)(model)
        return {"spearman": 100 * metrics[f"{name}_spearman_cosine"],
                "pearson": 100 * metrics[f"{name}_pearson_cosine"]}

    recipe = ST_RECIPES[recipe_name]
    out: dict = {"impl": "sentence-transformers", "recipe": recipe_name}
    if recipe is None:
        from sentence_transformers import SentenceTransformer

        from mnr.model import resolve_model_path

        model = SentenceTransformer(str(resolve_model_path(BASE_MODEL)), device="cpu")
        model.max_seq_length = SHARED["max_seq_length"]
    else:
        data = training_set(recipe, data_dir, max_pairs)
        config = TrainConfig(model=BASE_MODEL, **SHARED, **recipe)
        model, run = train_st(config, data, workdir, evaluator=evaluator(dev, "sts-dev"), logging_steps=1,
                              eval_steps=eval_steps_for(len(data), SHARED["batch_size"]))
        out |= {
            "rows": len(data), "steps": run["steps"], "train_seconds": run["seconds"],
            "losses": [[e["step"], e["loss"]] for e in run["history"] if "loss" in e],
            "dev_curve": [[e["step"], 100 * e["eval_sts-dev_spearman_cosine"]] for e in run["history"]
                          if "eval_sts-dev_spearman_cosine" in e],
        }
    model.eval()
    out["dev"], out["test"] = score(model, dev, "dev"), score(model, test, "test")
    sentences = sts_sentences(test)
    out["encode_per_s"] = time_encoding(lambda s: model.encode(s, batch_size=64), sentences)
    if recipe is None:
        np.save(workdir.parent / "zero-shot-st.npy", model.encode(sentences, batch_size=64, normalize_embeddings=True))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(SHARED["seed"])
    with tempfile.TemporaryDirectory(prefix="mnr-bench-", dir=Path(args.json).parent) as tmp:
        if args.worker == "mnr":
            result = run_mnr(args.recipe, args.data_dir, args.max_pairs, Path(tmp), json.loads(args.mnr_flags))
        else:
            result = run_sentence_transformers(args.recipe, args.data_dir, args.max_pairs, Path(tmp))
    result["threads"] = args.threads
    Path(args.json).write_text(json.dumps(result))


# ---------------------------------------------------------------- driver


def run_child(impl: str, recipe: str, args, json_path: Path) -> dict:
    command = [sys.executable, "-m", "bench.compare", "--worker", impl, "--recipe", recipe, "--json", str(json_path),
               "--data-dir", args.data_dir, "--max-pairs", str(args.max_pairs), "--threads", str(args.threads),
               "--mnr-flags", args.mnr_flags]
    print(f"[{time.strftime('%H:%M:%S')}] {recipe}: {impl} ...", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    result = json.loads(json_path.read_text())
    pace = f", {result['rows'] / result['train_seconds']:.1f} examples/s" if "rows" in result else ""
    print(f"    test Spearman {result['test']['spearman']:.2f}{pace}, encode {result['encode_per_s']:.0f}/s, "
          f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else ""


def table(results: dict) -> str:
    lines = [
        "| recipe | examples | mnr ex/s | s-t ex/s | speed ratio | mnr test | s-t test | Δ test | mnr dev | s-t dev "
        "| mnr enc/s | mnr bf16 enc/s | s-t enc/s | enc ratio (fp32, bf16) | mnr RSS MB | s-t RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for recipe, pair in results.items():
        m, s = pair["mnr"], pair["sentence-transformers"]
        m_speed = m["rows"] / m["train_seconds"] if "rows" in m else None
        s_speed = s["rows"] / s["train_seconds"] if "rows" in s else None
        lines.append(
            f"| {recipe} | {m.get('rows', '')} | {m_speed or 0:.1f} | {s_speed or 0:.1f} | {ratio(m_speed, s_speed)} "
            f"| {m['test']['spearman']:.2f} | {s['test']['spearman']:.2f} "
            f"| {m['test']['spearman'] - s['test']['spearman']:+.2f} "
            f"| {m['dev']['spearman']:.2f} | {s['dev']['spearman']:.2f} "
            f"| {m['encode_per_s']:.0f} | {m['encode_bf16_per_s']:.0f} | {s['encode_per_s']:.0f} "
            f"| {ratio(m['encode_per_s'], s['encode_per_s'])}, {ratio(m['encode_bf16_per_s'], s['encode_per_s'])} "
            f"| {m['peak_rss_mb']:.0f} | {s['peak_rss_mb']:.0f} |".replace("| 0.0 |", "| |")
        )
    return "\n".join(lines)


def embedding_equality(folder: Path) -> str:
    """How close mnr's embeddings of the zero-shot model are to sentence-transformers' (cosine)."""
    theirs = np.load(folder / "zero-shot-st.npy")
    lines = []
    for name, label in (("zero-shot-mnr.npy", "fp32"), ("zero-shot-mnr-bf16.npy", "bf16")):
        ours = np.load(folder / name)
        cosine = (ours * theirs).sum(axis=1)
        lines.append(f"mnr {label}: min cosine {cosine.min():.6f}, mean {cosine.mean():.6f}")
    return (f"Embedding equality on the {len(theirs)} STSb test sentences, zero-shot model, against "
            f"`SentenceTransformer.encode` (fp32): " + "; ".join(lines) + ".")


def plots(results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"mnr": "tab:blue", "sentence-transformers": "tab:orange"}
    trained = [r for r in results if RECIPES[r] is not None]
    written = []

    def smooth(values, window=20):
        values = np.asarray(values, dtype=float)
        if len(values) < window:
            return values
        return np.convolve(values, np.ones(window) / window, mode="valid")

    for key, ylabel, name in (("losses", "training loss (moving average of 20 steps)", "loss_vs_step.png"),
                              ("dev_curve", "STSb dev Spearman", "dev_vs_step.png")):
        if not trained:
            break
        fig, axes = plt.subplots(1, len(trained), figsize=(5 * len(trained), 4), squeeze=False)
        for ax, recipe in zip(axes[0], trained, strict=True):
            for impl, run in results[recipe].items():
                points = run.get(key, [])
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                if key == "losses":
                    ax.plot(steps, values, color=colors[impl], alpha=0.15, linewidth=0.8)
                    window = min(20, len(values))
                    ax.plot(steps[window - 1:], smooth(values, window), color=colors[impl], label=impl)
                else:
                    ax.plot(steps, values, "o-", color=colors[impl], label=impl)
            ax.set_title(recipe)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / name, dpi=110)
        plt.close(fig)
        written.append(name)

    recipes = list(results)
    x = np.arange(len(recipes))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for offset, impl in ((-0.2, "mnr"), (0.2, "sentence-transformers")):
        test = [results[r][impl]["test"]["spearman"] for r in recipes]
        bars = left.bar(x + offset, test, 0.4, label=impl, color=colors[impl])
        left.bar_label(bars, fmt="%.2f", fontsize=8)
        speed = [results[r][impl]["rows"] / results[r][impl]["train_seconds"] if "rows" in results[r][impl] else 0
                 for r in recipes]
        bars = right.bar(x + offset, speed, 0.4, label=impl, color=colors[impl])
        right.bar_label(bars, fmt="%.1f", fontsize=8)
    low = min(results[r][i]["test"]["spearman"] for r in recipes for i in results[r])
    left.set_ylim(low - 2, None)
    left.set_title("STSb test Spearman (higher is better)")
    right.set_title("training throughput, examples/s (higher is better)")
    for ax in (left, right):
        ax.set_xticks(x, recipes)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "summary.png", dpi=110)
    plt.close(fig)
    return written + ["summary.png"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--max-pairs", type=int, default=0, help="train on a seeded sample of this many (0: all)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every run")
    parser.add_argument("--mnr-flags", default="{}",
                        help='extra TrainConfig values for mnr, as JSON, e.g. {"bf16": true}')
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave results and BENCHMARKS.md")
    parser.add_argument("--worker", choices=["mnr", "sentence-transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    command = "python bench/compare.py " + " ".join(sys.argv[1:])
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="mnr-bench-") as tmp:
        for i, recipe in enumerate(args.recipes):
            order = ["mnr", "sentence-transformers"] if i % 2 == 0 else ["sentence-transformers", "mnr"]
            runs = {}
            for impl in order:
                # sentence-transformers' "best" is its MNR-triplets recipe: reuse that run, don't repeat it
                same = [r for r in results if impl == "sentence-transformers" and ST_RECIPES[r] == ST_RECIPES[recipe]]
                if same:
                    runs[impl] = {**results[same[0]][impl], "recipe": recipe, "same_run_as": same[0]}
                else:
                    runs[impl] = run_child(impl, recipe, args, Path(tmp) / f"{recipe}-{impl}.json")
            results[recipe] = {"mnr": runs["mnr"], "sentence-transformers": runs["sentence-transformers"]}
        equality = embedding_equality(Path(tmp)) if "zero-shot" in results else ""
    summary = table(results)
    print(summary)
    print(equality)
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    about = {"command": command, "date": started, "machine": machine(), "shared": SHARED,
             "max_pairs": args.max_pairs, "threads": args.threads, "mnr_flags": json.loads(args.mnr_flags)}
    (RESULTS / "compare.json").write_text(json.dumps({"about": about, "results": results}, indent=1))
    images = plots(results)
    body = f"""## mnr vs sentence-transformers, side by side

Command: `{command}` (run {started}; regenerates this section, `bench/results/compare.json` and the plots).
Machine: {about['machine']}; {args.threads} torch threads in every run.
Shared recipe: base model {BASE_MODEL} (the packaged copy), batch {SHARED['batch_size']}, lr {SHARED['lr']},
warm-up {SHARED['warmup_ratio']:.0%} then linear decay, weight decay {SHARED['weight_decay']}, gradient clipping
{SHARED['max_grad_norm']}, {SHARED['epochs']} epoch, seed {SHARED['seed']}, max length {SHARED['max_seq_length']},
MNR scale {SHARED['scale']}; duplicate-free batches for MNR on both sides. Data: SNLI dev+test and MultiNLI
dev-matched{f', a seeded sample of {args.max_pairs} examples' if args.max_pairs else ''}. mnr settings beyond
its defaults: `{args.mnr_flags}`. s-t = sentence-transformers' `SentenceTransformerTrainer`.
Throughput is examples per second of the training loop (dev evaluation subtracted); the speed ratio is
mnr ÷ sentence-transformers. The best row sets each side's best NLI recipe against the other: mnr's
`configs/best-nli.toml` (its own batch size and learning rate, so its speed ratio is not like for like), and
sentence-transformers' MNR on triplets (the same run as its mnr-triplets row).
Encoding: the {'{'}STSb test{'}'} sentences, batch 64. RSS: the process's peak.

{summary}

{equality}

{chr(10).join(f'![{name}](bench/results/{name})' for name in images)}
""".replace("{STSb test}", "STSb test")
    write_section(ROOT / "BENCHMARKS.md", "bench/compare.py", body)
    print(f"wrote {RESULTS / 'compare.json'}, {', '.join(images)} and BENCHMARKS.md")


if __name__ == "__main__":
    main()
