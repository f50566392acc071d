"""The model card: the README.md written into every model folder a run saves (final/, best/).

It is what people read on a model's page, and the Hugging Face hub reads its YAML front matter.
Everything in it comes from what the run knows (its settings, data, log and machine); a fact the
run does not know is left out, never filled with a placeholder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
from pathlib import Path

import torch
import transformers

from mnr import settings
from mnr.config import TrainConfig
from mnr.fileio import HUB_PREFIX, parse_hub_spec
from mnr.mine import MiningSettings
from mnr.mixture import Mixture, Part
from mnr.prompts import PromptChoice
from mnr.version import __version__

POOLING_WORDS = {"mean": "mean of the token embeddings", "cls": "the first ([CLS]) token's embedding",
                 "max": "maximum over the token embeddings"}


@dataclasses.dataclass
class RunFacts:
    """What a run knows about the model it saves."""

    config: TrainConfig
    data: Mixture  # the run's datasets (one, or several)
    losses: list[str]  # each dataset's loss class's name
    pooling: str
    dim: int
    max_seq_length: int
    normalize: bool
    processes: int
    total_steps: int
    data_dir: Path | None  # where relative data paths were found
    base_license: str | None  # from the base model's own card
    evaluations: list[dict]  # the log's evaluation entries: {"step": N, SET: {METRIC: value}}
    best: tuple[str, str] | None  # the (dev set, metric) best/ is chosen by
    step: int = 0  # the step of the model this card describes
    train_seconds: float = 0.0
    rows: int = 0
    hardware: str = ""
    layout: str = ""  # how the training forward was laid out, and why (mnr.layout)


def model_card(facts: RunFacts, path: Path, which: str) -> str:
    """README.md for the model saved at ``path`` (``which``: "final" or "best"). A best/ of step 0 is the
    base model itself (no evaluation beat it): its card says so and claims no fine-tuning."""
    config = facts.config
    return "\n".join([
        _front_matter(facts, base=facts.step == 0),
        f"# {path.parent.name}/{path.name}" if path.parent.name else f"# {path.name}",
        "",
        _summary(facts, which),
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {_base_link(config.model.model)} |",
        f"| pooling | {POOLING_WORDS.get(facts.pooling, facts.pooling)} |",
        f"| embedding dimension | {facts.dim} |",
        f"| max sequence length | {facts.max_seq_length} tokens (longer texts are cut) |",
        f"| normalisation | {'L2-normalised' if facts.normalize else 'none (cosine similarity normalises)'} |",
        "| similarity | cosine |",
        "",
        "## Usage",
        "",
        "With [sentence-transformers](https://www.sbert.net):",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f"model = SentenceTransformer({str(path)!r})",
        'embeddings = model.encode(["A man is playing a guitar.", "Someone plays an instrument.", "The sky is blue."])',
        "print(model.similarity(embeddings, embeddings))",
        "```",
        "",
        "With mnr:",
        "",
        "```python",
        "from mnr import SentenceEncoder",
        "",
        f"encoder = SentenceEncoder.load({str(path)!r})",
        'embeddings = encoder.encode(["A man is playing a guitar.", "Someone plays an instrument."], normalize=True)',
        "print(embeddings @ embeddings.T)  # cosine similarities",
        "```",
        "",
        *_prompts(facts),
        *_smaller_embeddings(facts, path),
        *_evaluation(facts, which),
        "## Training",
        "",
        "| | |",
        "|---|---|",
        *_training_rows(facts),
        "",
        "## Reproduce",
        "",
        "```bash",
        _command(facts, path),
        "```",
        "",
        f"`mnr_config.toml` beside this file holds every setting of the run. Written by mnr {__version__}.",
        "",
    ])


def read_license(model_dir: Path | None) -> str | None:
    """The ``license:`` of a model's own README front matter, if it has one."""
    if model_dir is None or not (model_dir / "README.md").is_file():
        return None
    text = (model_dir / "README.md").read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not match:
        return None
    found = re.search(r"^license:\s*(\S+)\s*$", match.group(1), re.M)
    return found.group(1).strip("'\"") if found else None


def hardware(device: torch.device) -> str:
    """One line: the GPU, or the CPU model and its cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU)"


# ---------------------------------------------------------------- parts


def _is_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _base_link(model: str) -> str:
    return f"[{model}](https://huggingface.co/{model})" if _is_hub_name(model) else f"`{model}`"


def _front_matter(facts: RunFacts, base: bool = False) -> str:
    """YAML the hub reads; hand-written (flat keys and lists of plain words, each quoted as JSON). ``base``:
    the model is the base model unchanged, so no training tags."""
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:"]
    trained = () if base else ("mnr", *(f"loss:{name}" for name in dict.fromkeys(facts.losses)))
    lines += [f"- {tag}" for tag in ("sentence-transformers", "sentence-similarity", "feature-extraction", *trained)]
    if _is_hub_name(facts.config.model.model):
        lines.append(f"base_model: {json.dumps(facts.config.model.model)}")
    if facts.base_license:
        lines.append(f"license: {json.dumps(facts.base_license)}")
    datasets = list(dict.fromkeys(parse_hub_spec(spec)[0] for d in facts.config.datasets() for spec in d.specs
                                  if spec.startswith(HUB_PREFIX)))
    if datasets:
        lines += ["datasets:", *[f"- {json.dumps(name)}" for name in datasets]]
    return "\n".join([*lines, "---", ""])


def _summary(facts: RunFacts, which: str) -> str:
    if facts.step == 0:
        measure = f" on {facts.best[0]} {facts.best[1]}" if facts.best else ""
        return (f"This is the base model {_base_link(facts.config.model.model)} unchanged, not a fine-tuned one: no "
                f"evaluation of the mnr run below beat it{measure}, so the run's `{which}/` holds the model as it "
                f"was before the first step (the trained model is the run's `final/`). The run is described "
                f"below.")
    what = (f"This is the model of step {facts.step} of {facts.total_steps}, the best on "
            f"{facts.best[0]} {facts.best[1]} (`best/` of the run)." if which == "best" and facts.best else
            f"This is the model after the last step ({facts.step} of {facts.total_steps}; `final/` of the run).")
    return (f"A sentence-embedding model fine-tuned from {_base_link(facts.config.model.model)} with mnr "
            f"({', '.join(dict.fromkeys(facts.losses))}) on {len(facts.data):,} rows"
            f"{f' of {len(facts.data.parts)} datasets' if len(facts.data.parts) > 1 else ''}. It maps a text to a "
            f"{facts.dim}-dimensional vector; the "
            f"cosine similarity of two vectors says how close the texts are in meaning. {what}")


def _prompts(facts: RunFacts) -> list[str]:
    """With --prompts: which texts get which prompt, and how to apply them."""
    settings = facts.config.prompts
    if not settings.prompts:
        return []
    by_column, sides = settings.by_column(), PromptChoice.of_run(settings)  # what queries and passages get
    query, document = sides.query, sides.corpus
    if len(facts.data.parts) > 1:  # each dataset's columns and theirs
        given = "; ".join(f"dataset `{p.name}`: " + (", ".join(dict.fromkeys(
            f"{column} `{name}`" for column, name in zip(p.data.columns, settings.names(
                p.data.columns, p.dataset.prompt_columns, check=False), strict=True) if name)) or "none")
            for p in facts.data.parts)
        given += "; the prompts: " + ", ".join(f"`{name}` {text!r}" for name, text in settings.prompts.items())
    else:
        given = "; ".join(f"{column}: `{name}`, {settings.prompts[name]!r}" for column, name in by_column.items())
    lines = ["### Prompts", "",
             f"Trained with prompts before the texts of its columns ({given}), "
             "saved in `config_sentence_transformers.json`; pooling "
             f"{'counts' if settings.include_prompt else 'leaves out'} their tokens. Embed each text with the prompt "
             "of the column it plays:", "", "```python"]
    if query:
        lines.append("queries = model.encode_query([...])" if query == "query" else
                     f"queries = model.encode([...], prompt_name={query!r})")
    if document:
        known = next((n for n in ("document", "passage", "corpus") if n in settings.prompts), None)
        lines.append("passages = model.encode_document([...])" if document == known else
                     f"passages = model.encode([...], prompt_name={document!r})")
    lines += [f"encoder.encode(texts, prompt=encoder.prompt({(query or document)!r}))  # mnr; `mnr encode "
              f"--prompt-name {query or document}` likewise", "```", ""]
    return lines


def _smaller_embeddings(facts: RunFacts, path: Path) -> list[str]:
    """With --matryoshka-dims: how to use the embedding's first values alone."""
    dims = facts.config.matryoshka.matryoshka_dims
    if not dims:
        return []
    small = min(dims)
    return ["### Smaller embeddings", "",
            f"Trained with Matryoshka representation learning at {', '.join(map(str, dims))} dimensions: the first "
            f"d values of an embedding are an embedding of their own (an index of {small} dimensions costs "
            f"{small / facts.dim:.0%} of one of {facts.dim}; the evaluation below gives each size's score).", "",
            "```python", f"model = SentenceTransformer({str(path)!r}, truncate_dim={small})",
            f"encoder.encode(texts, normalize=True, dim={small})  # mnr; `mnr encode --dim {small}` likewise",
            "```", ""]


def _evaluation(facts: RunFacts, which: str) -> list[str]:
    if not facts.evaluations:
        return []
    sets = list(dict.fromkeys(name for e in facts.evaluations for name in e if name != "step"))
    columns = [(name, metric) for name in sets
               for metric in next(e[name] for e in facts.evaluations if name in e)]
    base_note = " (step 0 is the base model, before training)" if facts.evaluations[0]["step"] == 0 else ""
    config = facts.config
    identical = ", a passage whose id is the query's own left out of its ranking (MTEB's ignore_identical_ids)"
    described = {name: f"`{spec}`" + (identical if kind == "retrieval" and config.eval.ignore_identical_ids else "")
                 for name, (kind, spec) in config.eval.dev_sets().items()}
    named = [f"- {name}: {described[name]}" for name in sets if name in described]
    lines = ["## Evaluation", "", f"Measured during training on the run's dev set{base_note}:", "",
             *([*named, ""] if named else []),
             "| step | " + " | ".join(f"{name} {metric}" for name, metric in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    for e in facts.evaluations:
        label = str(e["step"]) + (" (base model)" if e["step"] == 0 else "") + (
            " (this model)" if e["step"] == facts.step else "")
        cells = [f"{e[name][metric]:.2f}" if name in e else "" for name, metric in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    base = facts.evaluations[0] if facts.evaluations[0]["step"] == 0 else None
    this = next((e for e in reversed(facts.evaluations) if e["step"] == facts.step), None)
    if facts.best and base and this:
        name, metric = facts.best
        lines += ["", f"{name} {metric}: {this[name][metric]:.2f} for this model, {base[name][metric]:.2f} for the "
                      f"base model ({this[name][metric] - base[name][metric]:+.2f})."]
    if config.training.bf16:
        lines += ["", "These scores were computed under bf16 autocast, as the run trained: `mnr eval --bf16` gives "
                      "the same figures, plain `mnr eval` (fp32) figures a few hundredths apart."]
    return [*lines, ""]


def _training_rows(facts: RunFacts) -> list[str]:
    config = facts.config
    mining, training, matryoshka = config.mining, config.training, config.matryoshka
    loss_settings = ", ".join(f"{name} {_word(value)}" for name, value in settings.items(config.loss))
    several = len(facts.data.parts) > 1
    rows = [
        *(_data_row(part, loss if several else None) for part, loss in
          zip(facts.data.parts, facts.losses, strict=True)),
        *([f"| batches | each from one dataset, {config.data.dataset_sampling} "
           + ("(every batch of every dataset once per epoch, in a seeded random order) |"
              if config.data.dataset_sampling == "proportional" else
              "(one of each in turn, until one has none left) |")] if several else []),
        *([f"| hard negatives | {mining.num_negatives} per row"
           + (f" of {', '.join(f'`{p.name}`' for p in facts.data.parts if p.mined)}" if several else "")
           + ", mined before training: "
           f"{f'`{mining.model}`' if mining.model else 'the base model'}'s best-ranked "
           f"passages of {f'`{mining.corpus}`' if mining.corpus else 'the data corpus'} among its top "
           f"{mining.range_max}, the anchor's positives excluded" + _mining_filters(mining)
           + "; rows that found fewer left out |"] if mining else []),
        f"| loss | {', '.join(dict.fromkeys(facts.losses))}" + (f" ({loss_settings})" if loss_settings else "")
        + " |",
        *([f"| Matryoshka | the loss also on the first {', '.join(map(str, matryoshka.matryoshka_dims))} values of "
           "each embedding" + (f", weights {', '.join(f'{w:g}' for w in matryoshka.matryoshka_weights)}"
                               if matryoshka.matryoshka_weights else "") + " |"]
          if matryoshka.matryoshka_dims else []),
        *([f"| guide | {config.guide.describe()} (likely false negatives; GISTEmbed) |"] if config.guide.guide else []),
        f"| batch | {training.batch_size} rows per step" + (f" and process ({training.batch_size * facts.processes} "
                                                              "in all)" if facts.processes > 1 else "") +
        (f", embedded {training.mini_batch_size} texts at a time (gradient caching)" if training.mini_batch_size
         else "") + " |",
        f"| epochs, steps | {training.epochs}, {facts.total_steps} |",
        f"| learning rate | {training.lr:g} peak; linear warm-up over {training.warmup_ratio:.0%} of the steps, then "
        f"linear decay to 0; AdamW, weight decay {training.weight_decay:g}, gradient norm clipped to "
        f"{training.max_grad_norm:g} |",
        f"| precision | {'bf16 autocast (fp32 weights and loss)' if training.bf16 else 'fp32'} |",
        *([f"| layout | {facts.layout} |"] if facts.layout else []),
        f"| processes | {facts.processes} |",
        f"| seed | {training.seed} |",
    ]
    if facts.train_seconds:
        rows.append(f"| training time | {_duration(facts.train_seconds)} for {facts.rows:,} rows "
                    f"({facts.rows / facts.train_seconds:.1f} rows/s{' per process' if facts.processes > 1 else ''}) |")
    if facts.hardware:
        rows.append(f"| hardware | {facts.hardware} |")
    rows.append(f"| versions | mnr {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
                f"Python {platform.python_version()} |")
    return rows


def _data_row(part: Part, loss: str | None) -> str:
    """A dataset's row of the training table: its sources, rows and columns (and, with several, name, loss and batch
    size)."""
    data, dataset = part.data, part.dataset
    sources = "; ".join(f"`{name}` ({rows:,} rows)" for name, rows in data.sources.items())
    sampled = f", a seeded sample of {dataset.max_examples:,}" if dataset.max_examples else ""
    if loss is None:
        return f"| data | {sources}: {len(data):,} rows of ({', '.join(data.columns)}){sampled} |"
    return (f"| dataset `{part.name}` | {sources}: {len(data):,} rows of ({', '.join(data.columns)}){sampled}; "
            f"{loss}, batches of {dataset.batch_size} |")


def _mining_filters(mining: MiningSettings) -> str:
    """The filters beyond the range, as the card names them."""
    return "".join([f", ranks from {mining.range_min}" if mining.range_min else "",
                    f", absolute margin {mining.absolute_margin:g}" if mining.absolute_margin is not None else "",
                    f", relative margin {mining.relative_margin:g}" if mining.relative_margin else "",
                    f", scores at most {mining.max_score:g}" if mining.max_score is not None else "",
                    f", a seeded random sample (seed {mining.seed})" if mining.sampling == "random" else ""])


def _command(facts: RunFacts, path: Path) -> str:
    args = ["mnr", "train", "--config", str(path / "mnr_config.toml")]
    if not facts.config.data.data_dir and facts.data_dir is not None:
        args += ["--data-dir", str(facts.data_dir)]
    return shlex.join([*args, "--output", "NEW_OUTPUT_DIR", "--no-resume"])


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _word(value) -> str:
    if isinstance(value, list):
        return " + ".join(map(str, value))
    return ("on" if value else "off") if isinstance(value, bool) else str(value)
