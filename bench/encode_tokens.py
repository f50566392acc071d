"""How many tokens a CPU batch of long texts should hold: mnr's encode() on SciFact abstracts, same run.

    python -m bench.encode_tokens              # ~5 min on 2 cores; writes its section of BENCHMARKS.md
    python -m bench.encode_tokens --texts 128 --rounds 1 --no-write      # a quick look

``SentenceEncoder.encode`` ends a batch at ``batch_size`` texts or, on a CPU, at ``CPU_BATCH_TOKENS``
tokens (texts x the longest). This times encode() of the same abstracts (all-MiniLM-L6-v2, max
length 256, batch_size 64) with each token limit in turn (round-robin, ``--rounds`` times, so that
drift in the machine's speed hits them all alike; the median round is reported), 0 being no limit:
64 abstracts of ~240 tokens, 16K tokens, a batch. Every limit gives the same embeddings to 1e-5
(checked here).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import ROOT, machine, write_section

LIMITS = (0, 8192, 4096, 2048, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("MNR_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--texts", type=int, default=512, help="abstracts encoded per timing (a fixed random sample)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table only; leave BENCHMARKS.md")
    args = parser.parse_args()

    import torch

    from mnr.model import CPU_BATCH_TOKENS, SentenceEncoder
    from mnr.retrieval import load_corpus

    corpus = load_corpus(Path(args.data_dir) / "retrieval" / "scifact")[1]
    texts = random.Random(0).sample(corpus, args.texts)
    encoder = SentenceEncoder.load("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256, device="cpu")
    tokens = sum(len(ids) for ids in encoder.tokenize(texts))
    reference = encoder.encode(texts, batch_size=64, max_tokens=0)  # also warms up
    seconds: dict[int, list[float]] = {limit: [] for limit in LIMITS}
    for _ in range(args.rounds):
        for limit in LIMITS:
            start = time.perf_counter()
            embeddings = encoder.encode(texts, batch_size=64, max_tokens=limit)
            seconds[limit].append(time.perf_counter() - start)
            np.testing.assert_allclose(embeddings, reference, atol=1e-5)
    base = statistics.median(seconds[0])
    lines = ["| tokens per batch at most | seconds (median) | abstracts / s | speed-up over no limit |",
             "|---|---:|---:|---:|"]
    for limit in LIMITS:
        median = statistics.median(seconds[limit])
        name = "no limit (64 abstracts)" if limit == 0 else str(limit)
        if limit == CPU_BATCH_TOKENS:
            name += " (the default)"
        lines.append(f"| {name} | {median:.2f} | {args.texts / median:.1f} | {base / median:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    command = "python -m bench.encode_tokens" + (f" --texts {args.texts}" if args.texts != 512 else "") + (
        f" --rounds {args.rounds}" if args.rounds != 3 else "")
    body = f"""## Encoding long texts on a CPU: tokens per batch

Command: `{command}` ({datetime.date.today().isoformat()}). Machine: {machine()}; {torch.get_num_threads()} torch
threads. {args.texts} SciFact abstracts ({tokens:,} tokens, {tokens / args.texts:.0f} each; max length 256), encoded
by all-MiniLM-L6-v2 with `batch_size=64` and each limit on the tokens of a batch, round-robin, {args.rounds} rounds
(median). Same embeddings at every limit (to 1e-5). This is why `encode()` (and so evaluation and mining) ends a CPU
batch at {CPU_BATCH_TOKENS} tokens; batches of short sentences stay under it (64 sentences of up to 32 tokens).

{table}
"""
    write_section(ROOT / "BENCHMARKS.md", "bench/encode_tokens.py", body)
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
