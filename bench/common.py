"""What every benchmark script shares: paths, the NLI files, the machine line, BENCHMARKS.md sections."""

from __future__ import annotations

import argparse
import os
import platform
import resource
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NLI_FILES = ["nli/snli_dev.jsonl.gz", "nli/snli_test.jsonl.gz", "nli/mnli_dev_matched.jsonl.gz"]
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_DATA_DIR = os.environ.get("MNR_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> str:
    """The CPU (its bf16 instructions and how fast bf16 runs there) and the versions, for every table's caption."""
    import sentence_transformers
    import torch
    import transformers

    from mnr.card import hardware
    from mnr.device import cpu_bf16_instructions, cpu_bf16_speedup
    from mnr.version import __version__

    cpu = hardware(torch.device("cpu")).removesuffix(" (CPU)")
    bf16 = (f"bf16 instructions, bf16 products {cpu_bf16_speedup():.2f}x fp32's speed" if cpu_bf16_instructions()
            else "no bf16 instructions")
    return (f"{cpu} ({bf16}); Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, sentence-transformers {sentence_transformers.__version__}, "
            f"mnr {__version__}")


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace this script's section of BENCHMARKS.md (between its markers), or append it."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def add_seed_flags(parser: argparse.ArgumentParser) -> None:
    """--seeds, --test, --bf16 and --data-dir: how a quality benchmark of several seeds is run."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--test", action="store_true", help="also score each run on the test split(s)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="the precision of every run (default: mnr's choice for this machine, made once)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)


def chosen_bf16(args: argparse.Namespace) -> bool:
    """--bf16 as given, else mnr's choice of precision on this machine's CPU, made once for every run of a call."""
    if args.bf16 is not None:
        return args.bf16
    import torch

    from mnr.device import native_bf16

    return native_bf16(torch.device("cpu"))
