"""How long a guide (the base model) takes to embed configs/best-nli.toml's training texts once, and the share of
in-batch candidates it leaves out over epoch 0's batches (margin 0): python -m bench.guide_share"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import DEFAULT_DATA_DIR
from mnr.config import TrainConfig
from mnr.guide import Guide, load_guide
from mnr.recipe import batches_of_epoch, training_data


def main() -> None:
    config = TrainConfig.from_sources("configs/best-nli.toml", data_dir=DEFAULT_DATA_DIR,
                                      guide="sentence-transformers/all-MiniLM-L6-v2", bf16=True)
    data = training_data(config, Path(DEFAULT_DATA_DIR), None)
    model = load_guide(config.guide, torch.device("cpu"))
    start = time.perf_counter()
    guide = Guide.embed(model, config.guide, data, torch.device("cpu"), True, 1)
    seconds = time.perf_counter() - start
    for batch in batches_of_epoch(data, config, 0):
        guide.exclude(batch)
    shares = [x.item() for x in guide.read()]
    print(f"texts {len(guide.embeddings)}, embed {seconds:.1f} s, steps {len(shares)}, "
          f"left out {sum(shares) / len(shares):.4f} (min {min(shares):.4f}, max {max(shares):.4f})")


if __name__ == "__main__":
    main()
