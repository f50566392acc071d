"""Prototypes of recipe ideas that are not (yet) options of mnr, measured like bench/ablate.py.

    python -m bench.explore gte                  # one prototype, seed 0
    python -m bench.explore --all                # every prototype not yet in bench/results/explore.json
    python -m bench.explore --weight-averaging   # WiSE-FT and seed soups of configs/best-nli.toml

The *-mpnet prototypes need all-mpnet-base-v2: MNR_GUIDE_MODEL=DIR names a local copy (the hub
name is tried otherwise); its embeddings of the NLI texts are computed once and cached.

Each prototype adds one piece through mnr's public interfaces (a loss class registered in
mnr.losses.LOSSES, rows given to train(data=...), or a model changed after loading and given to
train(encoder=...)) and trains one epoch of (premise, entailment, contradiction) triplets from the packaged
all-MiniLM-L6-v2, bf16, batch 32, lr 5e-5 unless it says otherwise; its comparison row in the
ablation table is "triplets-lr5e-5" (same settings, no patch). An idea that wins on STSb dev
becomes a real, tested option; one that does not stays here, reported in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
import torch.nn.functional as F

from bench.ablate import seed_means
from bench.common import NLI_FILES, ROOT, write_section
from mnr.config import TrainConfig
from mnr.data import RANKING, TrainingSet, load_nli, load_training_set
from mnr.evaluate import evaluate_sts, load_sts
from mnr.fileio import resolve_path
from mnr.losses import LOSSES, MNRSettings, MultipleNegativesRankingLoss, cosine_matrix
from mnr.model import SentenceEncoder
from mnr.train import train

RESULTS = ROOT / "bench" / "results" / "explore.json"

PROTOTYPES = {
    "gte": ("GTE's joint contrastive loss: one softmax over query->doc, query->query, doc->query and "
            "doc->doc scores (Li et al. 2023)", {}),
    "gte-b128": ("the same, batch 128", {"batch_size": 128}),
    "gte-b128-lr1e-4": ("the same, batch 128, lr 1e-4", {"batch_size": 128, "lr": 1e-4}),
    "cosent": ("MNR + CoSENT over every labelled pair of the batch: entailment > neutral > contradiction "
               "(Su 2022; 7,695 rows)", {}),
    "neutral-negative-b128": ("the premise's neutral hypothesis as a second hard negative (premises with all "
                              "three labels: 7,695 rows); batch 128", {"batch_size": 128}),
    "hypothesis-anchors-b128": ("every triplet also turned around: (entailment, premise, contradiction), twice the "
                                "rows; batch 128", {"batch_size": 128}),
    "distill-mpnet-b128": ("MNR + KL divergence to all-mpnet-base-v2's in-batch score distribution (same scale); "
                           "batch 128", {"batch_size": 128}),
    "guide-mpnet-b128": ("GISTEmbed-style: other rows' candidates that all-mpnet-base-v2 scores above the "
                         "positive are masked (own contradiction kept); batch 128", {"batch_size": 128}),
    "no-dropout": ("dropout off (deterministic encoder in training)", {}),
    "frozen-word-embeddings": ("word embeddings frozen (fewer updated parameters; 30% faster)", {}),
}


def quad_rows(records) -> list[tuple[str, str, str, str]]:
    """(premise, entailment, contradiction, neutral) for premises that have all three labels."""
    by_premise: dict[str, tuple[list, list, list]] = {}
    for r in records:
        e, c, n = by_premise.setdefault(r.premise, ([], [], []))
        (e if r.label == 0 else c if r.label == 2 else n).append(r.hypothesis)
    return [(p, pos, c[i % len(c)], n[i % len(n)])
            for p, (e, c, n) in by_premise.items() if c and n for i, pos in enumerate(e)]


# ---------------------------------------------------------------- the pieces a prototype adds
#
# Each is an extension through mnr's public interfaces: a loss class registered in
# mnr.losses.LOSSES, a TrainingSet built here and given to train(data=...), or an encoder changed
# after loading and given to train(encoder=...). Nothing in the package is patched.


class GTELoss(torch.nn.Module):
    """GTE's joint contrastive loss (Li et al. 2023): one softmax per anchor over query->doc,
    query->query, doc->query and doc->doc scores, the anchor's own positive the target."""

    input, in_batch_negatives, cacheable, Settings = RANKING, True, True, MNRSettings

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    @classmethod
    def from_settings(cls, settings, dim, processes):
        return cls(settings.scale)

    def forward(self, columns, labels=None):
        anchors, positives = columns[0], columns[1]
        candidates = torch.cat(columns[1:])
        b = len(anchors)
        own = torch.eye(b, dtype=torch.bool)
        qd = cosine_matrix(anchors, candidates)
        qq = cosine_matrix(anchors, anchors).masked_fill(own, float("-inf"))
        dq = cosine_matrix(positives, anchors)
        dd = cosine_matrix(positives, candidates).masked_fill(own.repeat(1, len(columns) - 1), float("-inf"))
        scores = torch.cat([qd, qq, dq, dd], 1) * self.scale
        return (torch.logsumexp(scores, 1) - qd.diagonal() * self.scale).mean()


class CoSENTLoss(MultipleNegativesRankingLoss):
    """MNR on (anchor, positive, contradiction) plus CoSENT (Su 2022) over every labelled pair of the
    batch: cos(entailment) > cos(neutral) > cos(contradiction). Rows: (premise, entailment,
    contradiction, neutral)."""

    @classmethod
    def from_settings(cls, settings, dim, processes):
        return cls(scale=settings.scale)

    def forward(self, columns, labels=None):
        anchors, positives, contradictions, neutrals = columns
        loss = super().forward(columns[:3], labels)
        cos = torch.cat([F.cosine_similarity(anchors, x) for x in (positives, neutrals, contradictions)])
        grade = torch.arange(3, 0, -1).repeat_interleave(len(anchors)).float()
        wrong_way = ((cos[None, :] - cos[:, None]) * 20.0)[grade[:, None] > grade[None, :]]
        return loss + torch.logsumexp(torch.cat([torch.zeros(1), wrong_way]), 0)


def guided_loss(distill: bool, table: torch.Tensor, row_texts: torch.Tensor) -> type:
    """MNR guided by another model's embeddings ``table`` (texts, D) of each row's texts (``row_texts``,
    (rows, C) indices into the table); the rows' labels are their own indices, so the loss finds them.

    distill: MNR + KL divergence to the guide's in-batch score distribution (same scale). Otherwise
    GISTEmbed-style: other rows' candidates the guide scores above the positive are masked; the row's
    own contradiction, a labelled negative, is kept.
    """

    class GuidedMNR(MultipleNegativesRankingLoss):
        @classmethod
        def from_settings(cls, settings, dim, processes):
            return cls(scale=settings.scale)

        def forward(self, columns, labels=None):
            anchors = columns[0]
            guide = table[row_texts[labels.cpu()]].unbind(1)  # C x (B, D)
            b = len(anchors)
            scores = cosine_matrix(anchors, torch.cat(columns[1:])) * self.scale
            teacher = (guide[0] @ torch.cat(guide[1:]).T) * self.scale
            target = torch.arange(b)
            if not distill:
                above = teacher > teacher.diagonal()[:, None]
                above[target, b + target] = False
                return F.cross_entropy(scores.masked_fill(above, float("-inf")), target)
            kl = F.kl_div(F.log_softmax(scores, 1), F.log_softmax(teacher, 1), log_target=True, reduction="batchmean")
            return F.cross_entropy(scores, target) + kl

    return GuidedMNR


def prototype(name: str, config: TrainConfig) -> dict:
    """The loss name, training set and encoder of prototype ``name`` (None: what the config names)."""
    root = Path(config.data.data_dir)
    specs = [resolve_path(f, root) for f in NLI_FILES]
    triplets = load_training_set(specs, hard_negatives=True)
    per_file = [load_nli(spec) for spec in specs]
    out: dict = {"loss": "mnr", "data": None, "encoder": None}
    if name.startswith("gte"):
        LOSSES["gte"] = GTELoss
        out["loss"] = "gte"
    if name.startswith(("neutral-negative", "cosent")):
        rows = [row for records in per_file for row in quad_rows(records)]  # premises are grouped file by file
        out["data"] = TrainingSet(("anchor", "positive", "negative", "neutral"), rows, {"NLI quads": len(rows)})
        if name == "cosent":
            LOSSES["cosent"] = CoSENTLoss
            out["loss"] = "cosent"
    if name.startswith("hypothesis-anchors"):
        rows = [t for p, e, c in triplets.rows for t in ((p, e, c), (e, p, c))]
        out["data"] = TrainingSet(triplets.columns, rows, {"NLI triplets, both ways": len(rows)})
    if name.startswith(("distill-mpnet", "guide-mpnet")):
        index, table = guide_embeddings(config.data.data_dir)
        row_texts = torch.tensor([[index[t] for t in row] for row in triplets.rows])
        LOSSES["guided"] = guided_loss(name.startswith("distill"), table, row_texts)
        out["loss"] = "guided"
        out["data"] = dataclasses.replace(triplets, labels=list(range(len(triplets))))
    if name in ("no-dropout", "frozen-word-embeddings"):
        encoder = SentenceEncoder.load(config.model.model, max_seq_length=config.model.max_seq_length,
                                       layout=config.model.layout)
        if name == "no-dropout":
            for module in encoder.transformer.modules():  # attention reads its rate from its Dropout's p
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        else:
            encoder.transformer.embeddings.word_embeddings.weight.requires_grad_(False)
        out["encoder"] = encoder
    return out


GUIDE = os.environ.get("MNR_GUIDE_MODEL", "sentence-transformers/all-mpnet-base-v2")


def guide_embeddings(data_dir: str):
    """The guide model's normalised embedding of every NLI text, computed once and cached (mpnet
    takes about six minutes for the 39K texts on two CPU cores). The cache is keyed by the guide
    as given, so two different models in directories of the same name do not share it."""
    import hashlib

    key = hashlib.sha256(f"{GUIDE}\n{Path(data_dir).resolve()}".encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"mnr-explore-guide-{Path(GUIDE).name}-{key}.pt"
    if not cache.exists():
        texts = sorted({t for f in NLI_FILES for r in load_nli(resolve_path(f, Path(data_dir)))
                        for t in (r.premise, r.hypothesis)})
        embeddings = SentenceEncoder.load(GUIDE).encode(texts, batch_size=128, normalize=True, bf16=True)
        torch.save({"texts": texts, "embeddings": torch.from_numpy(embeddings).float()}, cache)
    saved = torch.load(cache)
    return {t: i for i, t in enumerate(saved["texts"])}, saved["embeddings"]


def run(name: str, seed: int, data_dir: str, max_examples: int = 0) -> dict:
    settings = {"hard_negatives": True, "bf16": True, "lr": 5e-5, "eval_steps": 100_000, "save_every": 0,
                **PROTOTYPES[name][1]}
    root = Path(data_dir)
    with tempfile.TemporaryDirectory(prefix="mnr-explore-") as tmp:
        # max length 128: what its tables were measured at (the default was 128 then)
        config = TrainConfig(data=NLI_FILES, data_dir=data_dir, output=f"{tmp}/run", seed=seed,
                             max_examples=max_examples, **{"max_seq_length": 128, **settings})
        parts = prototype(name, config)
        config = config.replace(loss=parts["loss"])
        result = train(config, data=parts["data"], encoder=parts["encoder"], progress=False)
        losses = [json.loads(line)["loss"] for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        encoder = SentenceEncoder.load(str(result.final))
        dev = evaluate_sts(encoder, load_sts(resolve_path("sts/stsb_dev.jsonl.gz", root)))
        test = evaluate_sts(encoder, load_sts(resolve_path("sts/stsb_test.jsonl.gz", root)))
    return {"name": name, "seed": seed, "settings": settings, "rows": result.rows, "dev": dev["spearman"],
            "test": test["spearman"], "train_seconds": result.train_seconds, "first_losses": losses[:5]}


def false_negatives(data_dir: str, batch_size: int = 32) -> str:
    """How often, in the batches of the triplet recipe, the base model scores a candidate above the
    anchor's own positive, and which candidates those are: the ones a guide-model filter
    (GISTEmbed-style) would mask as suspected false negatives."""
    from mnr.batching import epoch_batches

    data = load_training_set([resolve_path(f, Path(data_dir)) for f in NLI_FILES], hard_negatives=True)
    texts = list(dict.fromkeys(t for row in data.rows for t in row))
    embeddings = torch.from_numpy(SentenceEncoder.load("sentence-transformers/all-MiniLM-L6-v2").encode(
        texts, batch_size=128, normalize=True))
    index = {t: i for i, t in enumerate(texts)}
    counts = {"rows": 0, "flagged": 0, "own": 0, "positives": 0, "contradictions": 0}
    for batch in epoch_batches(data, batch_size, 0, 0):
        a, p, n = (embeddings[[index[data.rows[i][c]] for i in batch]] for c in range(3))
        scores = a @ torch.cat([p, n]).T  # (B, 2B)
        b = len(batch)
        above = scores > scores.diagonal()[:b, None]
        counts["rows"] += b
        counts["flagged"] += int(above.any(1).sum())
        own = above[torch.arange(b), b + torch.arange(b)]
        counts["own"] += int(own.sum())
        counts["positives"] += int(above[:, :b].sum())
        counts["contradictions"] += int(above[:, b:].sum() - own.sum())
    return ("Base model, triplet batches of {batch} (seed 0): {flagged:,} of {rows:,} rows have a candidate scored "
            "above their positive. Of the candidates above a positive, {own:,} are the row's own contradiction, "
            "{positives:,} another row's positive, {contradictions:,} another row's contradiction."
            ).format(batch=batch_size, **counts)


def weight_averaging(data_dir: str, seeds: tuple[int, ...] = (0, 1, 2)) -> str:
    """Two ways of averaging weights, measured on the chosen recipe (configs/best-nli.toml):
    WiSE-FT (Wortsman et al. 2022), the fine-tuned weights interpolated with the base model's, which
    often keeps more of what the base model knew; and a uniform soup of the runs of several seeds."""
    import subprocess

    root = Path(data_dir)
    dev, test = (load_sts(resolve_path(f"sts/stsb_{split}.jsonl.gz", root)) for split in ("dev", "test"))
    lines = ["| weights | STSb dev | STSb test |", "|---|---:|---:|"]
    with tempfile.TemporaryDirectory(prefix="mnr-explore-") as tmp:
        for seed in seeds:
            subprocess.run([sys.executable, "-m", "mnr", "train", "--config", str(ROOT / "configs" / "best-nli.toml"),
                            "--data-dir", data_dir, "--output", f"{tmp}/{seed}", "--seed", str(seed),
                            "--eval-steps", "100000", "--save-every", "0"], check=True)
        encoder = SentenceEncoder.load(f"{tmp}/{seeds[0]}/final")
        runs = [SentenceEncoder.load(f"{tmp}/{seed}/final").state_dict() for seed in seeds]
        base = SentenceEncoder.load("sentence-transformers/all-MiniLM-L6-v2").state_dict()

        def score(label: str, weights: dict) -> None:
            encoder.load_state_dict(weights)
            lines.append(f"| {label} | {evaluate_sts(encoder, dev)['spearman']:.2f} "
                         f"| {evaluate_sts(encoder, test)['spearman']:.2f} |")

        def mix(states: list[dict], factors: list[float]) -> dict:
            return {k: sum(f * s[k] for f, s in zip(factors, states, strict=True)) if v.is_floating_point() else v
                    for k, v in states[0].items()}

        for alpha in (1.0, 0.9, 0.7, 0.5, 1.2, 1.4):
            sign = "+" if alpha <= 1 else "-"
            score(f"seed {seeds[0]}: {alpha} x fine-tuned {sign} {abs(1 - alpha):.1f} x base",
                  mix([runs[0], base], [alpha, 1 - alpha]))
        for seed, state in zip(seeds[1:], runs[1:], strict=True):
            score(f"seed {seed} alone", state)
        score(f"soup of seeds {', '.join(map(str, seeds))}", mix(runs, [1 / len(runs)] * len(runs)))
    return "\n".join(lines)


def write_table(results: dict) -> None:
    lines = ["| prototype | what changes | seeds | rows | STSb dev (mean) | STSb test (mean) | training time (s) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, (what, _) in PROTOTYPES.items():
        if not (m := seed_means(results, name)):
            continue
        mark = "*" if any("measured_with" in r for r in m["runs"]) else ""
        lines.append(f"| {name}{mark} | {what} | {m['seeds']} | {m['runs'][0]['rows']:,} | {m['dev']:.2f} "
                     f"| {m['test']:.2f} | {m['train_seconds']:.0f} |")
    body = f"""## Prototypes that did not make it (quality)

Command: `python -m bench.explore --all` (results in `bench/results/explore.json`). Each prototype
patches mnr for one run: triplets, batch 32, lr 5e-5, 1 epoch, bf16, unless it says otherwise; the
row to compare with is "triplets-lr5e-5" above (dev 87.47, test 84.10), or "triplets-b128-lr5e-5"
for batch 128 (the chosen recipe). None beat the chosen recipe on STSb dev, so none became an option.
Rows marked * were measured with an earlier scratch copy of the same patch, before this script was
committed. The *-mpnet rows use all-mpnet-base-v2 (STSb dev 88.11, test 83.42 zero-shot) as a guide.

{chr(10).join(lines)}
"""
    write_section(ROOT / "BENCHMARKS.md", "bench/explore.py", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(PROTOTYPES)}")
    parser.add_argument("--all", action="store_true", help="every prototype not yet measured, each in a child")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table", action="store_true", help="only rewrite BENCHMARKS.md from saved results")
    parser.add_argument("--false-negatives", action="store_true", help="count suspected in-batch false negatives")
    parser.add_argument("--weight-averaging", action="store_true",
                        help="WiSE-FT interpolation and seed soups of configs/best-nli.toml (3 trainings)")
    parser.add_argument("--data-dir", default=os.environ.get("MNR_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--max-examples", type=int, default=0,
                        help="a quick check on a seeded sample of the rows: prints, saves nothing")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.false_negatives:
        print(false_negatives(args.data_dir))
        return
    if args.weight_averaging:
        print(weight_averaging(args.data_dir))
        return
    if args.table:
        write_table(results)
        return
    if args.all:  # each prototype in a child: registered losses and loaded models stay apart
        import subprocess

        for name in PROTOTYPES:
            if f"{name}@{args.seed}" not in results:
                subprocess.run([sys.executable, "-m", "bench.explore", name, "--seed", str(args.seed),
                                "--data-dir", args.data_dir], check=True, cwd=ROOT)
        write_table(json.loads(RESULTS.read_text()))
        return
    if len(args.names) != 1 or args.names[0] not in PROTOTYPES:
        parser.error(f"give one prototype (they do not combine) of: {', '.join(PROTOTYPES)}; or --all")
    name = args.names[0]
    result = run(name, args.seed, args.data_dir, args.max_examples)
    print(f"{name}@{args.seed}: dev {result['dev']:.2f}  test {result['test']:.2f}  {result['train_seconds']:.0f} s; "
          f"first losses {result['first_losses']}")
    if args.max_examples:
        return
    results[f"{name}@{args.seed}"] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
