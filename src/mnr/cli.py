"""``mnr train | eval | encode | mine | plot``: parse flags, call one plain function, report errors plainly."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
from pathlib import Path

from mnr.device import resolve_device
from mnr.errors import MnrError
from mnr.prompts import PromptChoice

TRAIN_EXAMPLES = """\
examples:
  # fine-tune the packaged all-MiniLM-L6-v2 on NLI entailment pairs, evaluating on STSb dev
  mnr train --model sentence-transformers/all-MiniLM-L6-v2 \\
      --data nli/snli_dev.jsonl.gz nli/mnli_dev_matched.jsonl.gz --data-dir ../shared/data \\
      --sts-dev sts/stsb_dev.jsonl.gz --output runs/nli --batch-size 32 --epochs 1

  # your own (anchor, positive) pairs, with other column names
  mnr train --data my_pairs.csv --columns anchor=question,positive=answer --output runs/qa

  # a recipe file, with one value overridden
  mnr train --config configs/nli-minilm-cpu.toml --output runs/demo --lr 3e-5

  # continue a run that was stopped (Ctrl-C, SIGTERM, a crash): the same command plus --resume
  mnr train --config configs/nli-minilm-cpu.toml --output runs/demo --lr 3e-5 --resume

  # a global batch of 1024 (512 per process, encoded 64 texts at a time), 2 processes sharing their negatives
  mnr train --config configs/nli-minilm-cpu.toml --output runs/big --batch-size 512 --mini-batch-size 64 --nproc 2
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnr",
        description="Fine-tune sentence-embedding models with Multiple Negatives Ranking loss, "
                    "and measure them on semantic textual similarity (STS).",
    )
    from mnr.version import __version__

    parser.add_argument("--version", action="version", version=f"mnr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser(
        "train", help="fine-tune a model", epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a sentence-embedding model. Settings come from the defaults, then --config, "
                    "then flags. The output directory gets final/ (the last model), best/ (the best on "
                    "--sts-dev), log.jsonl and config.toml; both models load with sentence-transformers.")
    train_parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)")
    _add_config_flags(train_parser)

    eval_parser = commands.add_parser(
        "eval", help="STS correlation and retrieval quality of one or more models, as markdown tables",
        description="STS: correlation (x100) between the cosine similarity of each sentence pair and its gold score. "
                    "Retrieval: every judged query ranks the whole corpus by cosine similarity; NDCG@10, MRR@10, "
                    "MAP@100, Recall@10, Recall@100 (x100, trec_eval definitions). Several models give one "
                    "comparison table.")
    eval_parser.add_argument("models", nargs="+", metavar="MODEL", help="model directories or hub names")
    eval_parser.add_argument("--sts", nargs="+", metavar="FILE", help="STS files (sentence1, sentence2, score); "
                             "default, without --retrieval: sts/stsb_test.jsonl.gz under --data-dir")
    eval_parser.add_argument("--retrieval", nargs="+", metavar="DIR[:SPLIT]", help="retrieval folders in BEIR's "
                             "layout (corpus, queries, qrels), e.g. retrieval/scifact; a part of a split: "
                             "DIR:SPLIT[START:STOP]")
    eval_parser.add_argument("--split", default="test", help="the qrels split of --retrieval folders that name none "
                             "(default: test)")
    eval_parser.add_argument("--data-dir", help="where relative --sts/--retrieval paths are looked up "
                             "(default: $MNR_DATA_DIR)")
    eval_parser.add_argument("--columns", default="", help="map the STS files' column names to ours: OURS=THEIRS,... "
                             "e.g. sentence1=text_a,sentence2=text_b,score=label")
    eval_parser.add_argument("--ignore-identical-ids", action="store_true", help="--retrieval: leave a passage whose "
                             "id is the query's own out of that query's ranking (MTEB's rule where queries are "
                             "themselves passages: argument retrieval, duplicate questions)")
    _add_strict_qrels_flag(eval_parser, "evaluation counts it as relevant and never retrieved, as BEIR and MTEB do")
    eval_parser.add_argument("--dims", nargs="+", type=_positive_int, default=[], metavar="DIM",
                             help="also score the embeddings' first DIM values (renormalised), a column each: what a "
                             "Matryoshka-trained model keeps at a smaller size (NDCG@10, Spearman)")
    eval_parser.add_argument("--json", metavar="FILE.json", help="also write every figure (each set's metrics, "
                             "the retrieval mean, each set's counts) to this JSON file")
    _add_prompt_flags(eval_parser, query="--retrieval's queries", corpus="--retrieval's passages",
                      sts="--sts sentences")
    _add_encoding_flags(eval_parser, "scores move by about 0.01")

    encode_parser = commands.add_parser(
        "encode", help="embed texts (a .txt file's lines or a records file's text column) into a file",
        description="Embed each line of a UTF-8 .txt file, or the text column of each record of a .jsonl/.json/"
                    ".csv/.tsv (optionally .gz) or .parquet file; row i of the output is line or record i. The "
                    "output format follows its extension: .npy (the (N, D) float32 array), .npz (embeddings and "
                    "ids), .jsonl or .parquet (id and embedding per record); ids are the input's _id/id column, "
                    "else positions. A .txt file written to .npy is read and embedded in blocks, so its size is not "
                    "bounded by memory; other outputs are built in memory.")
    encode_parser.add_argument("model", metavar="MODEL", help="model directory or hub name")
    encode_parser.add_argument("--input", required=True, metavar="FILE", help="one text per line (.txt), or records "
                               "with a text column")
    encode_parser.add_argument("--output", required=True, metavar="FILE", help="where to write the embeddings: .npy, "
                               ".npz, .jsonl or .parquet")
    encode_parser.add_argument("--columns", default="", help="records: the text column, and the id column to keep "
                               "beside each embedding: text=NAME[,id=NAME] (default: 'text' or the only column; "
                               "'_id' or 'id')")
    encode_parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    encode_parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    _add_dim_flag(encode_parser)
    _add_prompt_flags(encode_parser, sts="the texts")
    _add_encoding_flags(encode_parser, "cosines move by about 1e-4")

    mine_parser = commands.add_parser(
        "mine", help="mine hard negatives for (anchor, positive) rows from a corpus",
        description="For each (anchor, positive) row, rank the corpus with MODEL and write the best-ranked passages "
                    "that are not positives of the anchor as negatives: (anchor, positive, negative_1 .. negative_k) "
                    "rows, which mnr train takes as they are. Rows that find fewer than k negatives are left out "
                    "and counted.")
    mine_parser.add_argument("model", metavar="MODEL", help="model directory or hub name that ranks the candidates")
    mine_parser.add_argument("--data", required=True, nargs="+", metavar="SPEC", help="rows to mine for: pairs files "
                             "(anchor, positive) or retrieval folders DIR[:SPLIT][[START:STOP]] (their judged pairs)")
    mine_parser.add_argument("--output", required=True, metavar="FILE", help=".jsonl, .csv or .tsv (optionally .gz)")
    mine_parser.add_argument("--columns", default="", help="map --data column names to ours, e.g. "
                             "anchor=question,positive=answer")
    mine_parser.add_argument("--data-dir", help="where relative paths are looked up (default: $MNR_DATA_DIR)")
    from mnr.mine import MiningSettings
    from mnr.settings import add_flags

    add_flags(mine_parser, MiningSettings, skip=("model",))  # the settings mnr train reads as --mine-...
    _add_strict_qrels_flag(mine_parser, "its judgement is skipped")
    _add_dim_flag(mine_parser)
    _add_prompt_flags(mine_parser, query="the anchors", corpus="the positives and the corpus")
    mine_parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_encoding_flags(mine_parser, "scores move by about 1e-4")

    plot_parser = commands.add_parser(
        "plot", help="draw the training curves of one or more runs (overlaid) into a PNG",
        description="Loss (raw and smoothed), learning rate and dev metric of each run's log.jsonl, one colour per "
                    "run, e.g. two recipes side by side. mnr train draws OUTPUT/curves.png itself.")
    plot_parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (the --output of mnr train)")
    plot_parser.add_argument("--output", metavar="FILE.png", help="default: RUN/curves.png for one run, "
                             "curves.png here for several")
    plot_parser.add_argument("--labels", nargs="+", metavar="LABEL", help="names for the runs in the legends")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars around our own output
    try:
        return {"train": _train, "eval": _eval, "encode": _encode, "mine": _mine, "plot": _plot}[args.command](args)
    except MnrError as e:
        print(f"mnr {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"mnr {args.command}: interrupted", file=sys.stderr)
        return 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_encoding_flags(parser: argparse.ArgumentParser, bf16_effect: str) -> None:
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="texts per forward pass (default: 64)")
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--bf16", action="store_true", help=f"encode under bf16 autocast (faster on GPUs and on "
                        f"CPUs with AMX, slower on other CPUs; {bf16_effect})")


def _add_dim_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=_positive_int, metavar="N", help="the first N values of each embedding "
                        "(renormalised where embeddings are compared): a Matryoshka-trained model's smaller embedding")


def _checked_dim(encoder, dim: int | None) -> int | None:
    """--dim against the model: above its dimension is an error; on a model not trained with --matryoshka-dims
    it works (the first values of any embedding do), with a warning that it works less well."""
    from mnr.errors import ConfigError

    if dim is None:
        return None
    if dim > encoder.dim:
        raise ConfigError(f"--dim {dim}: the model's embeddings have {encoder.dim} values")
    if dim not in _matryoshka_dims(encoder):
        print(f"warning: --dim {dim}: this model was not trained at {dim} dimensions (--matryoshka-dims); its first "
              f"{dim} values work, but less well than a Matryoshka-trained model's", file=sys.stderr)
    return dim


def _matryoshka_dims(encoder) -> list[int]:
    """The --matryoshka-dims a model was trained with, as the mnr_config.toml beside it says ([] if none)."""
    from mnr.config import tomllib

    path = encoder.source / "mnr_config.toml" if encoder.source else None
    if path is None or not path.exists():
        return []
    with open(path, "rb") as f:
        return list(tomllib.load(f).get("matryoshka_dims", []))


def _add_prompt_flags(parser: argparse.ArgumentParser, query: str = "", corpus: str = "", sts: str = "") -> None:
    """--query-prompt-name / --corpus-prompt-name for the sides a command embeds (named by the arguments), and
    --prompt-name for texts of no side; each a name of the model's prompts (mnr train --prompts), or none."""
    if query:
        parser.add_argument("--query-prompt-name", metavar="NAME", help=f"the model's prompt put before {query} "
                            "('none': no prompt; default: its 'query' prompt if it has one, as sentence-transformers' "
                            "encode_query)")
    if corpus:
        parser.add_argument("--corpus-prompt-name", metavar="NAME", help=f"the model's prompt put before {corpus} "
                            "('none': no prompt; default: its 'document', 'passage' or 'corpus' prompt, the first it "
                            "has, as sentence-transformers' encode_document)")
    if sts:
        parser.add_argument("--prompt-name", metavar="NAME", help=f"the model's prompt put before {sts} ('none': no "
                            "prompt; default: its default prompt if it names one, as sentence-transformers' encode)")


def _prompt_choice(args: argparse.Namespace, encoders) -> PromptChoice:
    """The prompt names the flags give, checked against every model (an unknown name fails before any work)."""
    choice = PromptChoice.from_flag(getattr(args, "query_prompt_name", None), getattr(args, "corpus_prompt_name", None),
                                    getattr(args, "prompt_name", None))
    for encoder in encoders:
        for name in (choice.query, choice.corpus, choice.sts):
            encoder.prompt(name)
    return choice


def _add_strict_qrels_flag(parser: argparse.ArgumentParser, default_effect: str) -> None:
    parser.add_argument("--strict-qrels", action="store_true", help="retrieval folders: refuse a judgement of a "
                        f"passage that is not in the corpus (default: {default_effect}; a warning says how many)")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per key of TrainConfig (every group's, mining's as mine_ keys, every loss's); default None, so
    we can tell which flags were given."""
    from mnr.config import GROUPS, MINING_HELP, MINING_KEYS
    from mnr.losses import LOSSES
    from mnr.mine import MiningSettings
    from mnr.settings import add_flags

    for group in GROUPS.values():
        add_flags(parser, group)
    add_flags(parser, MiningSettings, keys=MINING_KEYS, defaults={"num_negatives": 0},
              helps={"num_negatives": MINING_HELP})
    added = set()
    for loss in LOSSES.values():  # a setting two losses share is one flag
        add_flags(parser, loss.Settings, skip=tuple(added))
        added |= {f.name for f in dataclasses.fields(loss.Settings)}


def _train(args: argparse.Namespace) -> int:
    from mnr import distributed
    from mnr.config import TrainConfig, keys
    from mnr.errors import Stopped
    from mnr.train import train

    flags = {key: getattr(args, key) for key in keys()}
    config = TrainConfig.from_sources(args.config, **flags)
    if config.run.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet launched: let torchrun start the processes
        os.environ[COMMAND_VARIABLE] = shlex.join(["mnr", *sys.argv[1:]])  # for the resume command, --nproc kept
        distributed.launch(config.run.nproc, sys.argv[1:])
    rank = 0
    try:
        with distributed.process_group(clean_exits=(Stopped,)):  # every process stops at the same step
            rank = distributed.world()[0]
            result = train(config)
    except Stopped as e:  # not a failure: everything up to this step is saved
        if rank == 0:
            print(f"mnr train: {e}. Continue with:\n  {resume_command()}", file=sys.stderr)
        return e.exit_code
    if rank != 0:
        return 0
    summary = result.summary
    print(f"final model: {summary['final']}")
    if "best" in summary:
        base = f"; the base model: {summary['base_score']:.2f}" if summary["base_score"] is not None else ""
        print(f"best model:  {summary['best']} ({summary['best_metric']} {summary['best_score']:.2f} at step "
              f"{summary['best_step']}{base})")
    print(f"trained:     {result.steps} steps, {summary['rows']:,} examples in {summary['train_seconds']:.0f} s, "
          f"{summary['rows_per_s']:.1f} examples/s")
    for name, seen in summary.get("datasets", {}).items():
        print(f"dataset:     {name}: {seen['rows']:,} rows, {seen['steps']} steps, loss {seen['loss']:.4f} (mean "
              "of its last 50 steps)")
    if "guide_left_out" in summary:
        print(f"guide:       left out {summary['guide_left_out']:.2%} of each anchor's in-batch candidates (mean "
              "over the steps)")
    print(f"curves:      {summary['curves']}")
    print(f"next:        {summary['next']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mnr.data import parse_column_map
    from mnr.errors import ConfigError
    from mnr.evaluate import RETRIEVAL, STS, STS_COLUMNS_HINT, comparison_table, evaluators
    from mnr.fileio import atomic_file, check_new_file, data_dir, short_name, write_json
    from mnr.model import SentenceEncoder
    from mnr.retrieval import METRICS, at_dim, mean_of_sets, retrieval_table, split_spec

    device = resolve_device(args.device)
    root = data_dir(args.data_dir)
    if args.json:
        check_new_file(args.json, "--json")
    if args.sts:
        specs = args.sts
    elif args.retrieval:
        specs = []
    elif root is not None:
        specs = ["sts/stsb_test.jsonl.gz"]
    else:
        raise ConfigError("--sts: no STS file given (and no --data-dir / $MNR_DATA_DIR to find stsb_test in)")
    sets = {short_name(spec): (STS, spec) for spec in specs}
    for spec in args.retrieval or []:
        folder, split, part = split_spec(spec)
        sets[f"{Path(folder).name}:{split or args.split}" + (f"[{part}]" if part else "")] = (RETRIEVAL, spec)
    loaded = evaluators(sets, root, flags={STS: "--sts", RETRIEVAL: "--retrieval"}, default_split=args.split,
                        strict_qrels=args.strict_qrels, ignore_identical_ids=args.ignore_identical_ids,
                        column_map=parse_column_map(args.columns), hint=STS_COLUMNS_HINT, dims=args.dims)
    counts = {}
    for e in loaded:
        if sets[e.name][0] != RETRIEVAL:
            continue
        data = e.data
        notes = [f"{data.skipped} without a relevant passage skipped"] if data.skipped else []
        if data.missing:
            notes.append(f"{data.missing} judged relevant passages not in the corpus (never retrieved)")
        print(f"{e.name}: {len(data.queries):,} queries, {len(data.passages):,} passages"
              + "".join(f", {note}" for note in notes), file=sys.stderr)
        counts[e.name] = {"queries": len(data.queries), "passages": len(data.passages), "skipped_queries": data.skipped,
                          "missing_judgements": data.missing, "ignore_identical_ids": args.ignore_identical_ids}
    # every model loads (on the CPU) before any is scored: a typo in the last one fails now, not after minutes
    encoders = {model: SentenceEncoder.load(model, device="cpu") for model in args.models}
    for encoder in encoders.values():
        for dim in args.dims:
            _checked_dim(encoder, dim)
    prompts = _prompt_choice(args, encoders.values())
    for e in loaded:
        e.prompts = prompts
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {STS: {}, RETRIEVAL: {}}
    for model, encoder in encoders.items():
        encoder.to(device)
        for e in loaded:
            scores = e(encoder, batch_size=args.batch_size, bf16=args.bf16, progress=True)
            results[sets[e.name][0]].setdefault(model, {})[e.name] = scores
        encoder.to("cpu")
    sts_results, retrieval_results = results[STS], results[RETRIEVAL]
    at = {d: f" @{d}d" for d in args.dims}
    sts_columns = {"spearman": "Spearman", "pearson": "Pearson", **{at_dim("spearman", d): f"Spearman{at[d]}"
                                                                     for d in args.dims}}
    retrieval_columns = {**METRICS, **{at_dim("ndcg@10", d): f"NDCG@10{at[d]}" for d in args.dims}}
    tables = [comparison_table(sts_results, sts_columns)] if sts_results else []
    tables += [retrieval_table(retrieval_results, retrieval_columns)] if retrieval_results else []
    print("\n\n".join(tables))
    if args.json:
        figures = {"models": args.models, "sts": sts_results,
                   "retrieval": {model: {**sets, **({"mean": mean_of_sets(sets)} if len(sets) > 1 else {})}
                                 for model, sets in retrieval_results.items()},
                   "retrieval_sets": counts}
        with atomic_file(args.json) as tmp:
            write_json(tmp, figures)
    return 0


def _encode(args: argparse.Namespace) -> int:
    from mnr.embedding_files import check_output, read_texts, write_embeddings
    from mnr.model import SentenceEncoder

    device = resolve_device(args.device)
    output = Path(args.output)
    check_output(output, args.overwrite)
    texts = read_texts(Path(args.input), args.columns)
    encoder = SentenceEncoder.load(args.model, device=device)
    dim = _checked_dim(encoder, args.dim) or encoder.dim
    prompt = encoder.prompt(_prompt_choice(args, [encoder]).sts)
    with _progress(texts.count, "encode", "text") as bar:
        def embed(block):
            embeddings = encoder.encode(block, batch_size=args.batch_size, normalize=args.normalize, bf16=args.bf16,
                                        dim=dim, prompt=prompt)
            bar.update(len(block))
            return embeddings

        write_embeddings(output, texts, dim, embed)
    print(f"{output}: {texts.count} x {dim} float32")
    return 0


def _progress(total: int, desc: str, unit: str):
    """A progress bar on stderr, as training shows its own."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def _mine(args: argparse.Namespace) -> int:
    from mnr.data import RANKING, load_training_set, parse_column_map
    from mnr.errors import DataError
    from mnr.fileio import check_writable, data_dir, write_rows
    from mnr.mine import MiningSettings, columns, mine, mining_corpus
    from mnr.model import SentenceEncoder

    settings = MiningSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MiningSettings)
                                 if f.name != "model" and getattr(args, f.name) is not None})
    device = resolve_device(args.device)
    root = data_dir(args.data_dir)
    output = Path(args.output)
    check_writable(output, args.overwrite)  # before any work: mining takes minutes
    data = load_training_set(args.data, root=root, wants=RANKING,
                             column_map=parse_column_map(args.columns), strict_qrels=args.strict_qrels)
    rows = [(row[0], row[1]) for row in data.rows]
    corpus = mining_corpus(settings.corpus, root, data, args.data)
    encoder = SentenceEncoder.load(args.model, device=device)
    dim = _checked_dim(encoder, args.dim)
    print(f"mining {settings.num_negatives} negatives for {len(rows):,} rows ({len({a for a, _ in rows}):,} anchors) "
          f"from {len(corpus):,} passages", file=sys.stderr)
    prompts = _prompt_choice(args, [encoder])
    mined = mine(encoder, rows, corpus, settings, batch_size=args.batch_size, bf16=args.bf16, dim=dim, prompts=prompts)
    if not mined.rows:
        raise DataError(f"no row found {settings.num_negatives} negatives that pass the filters; lower "
                        "--num-negatives or the margins, or raise --range-max")
    write_rows(output, columns(settings.num_negatives), mined.rows)
    print(f"{output}: {mined.summary()}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from mnr.errors import ConfigError
    from mnr.fileio import check_new_file
    from mnr.plot import plot_runs

    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    output = Path(args.output) if args.output else (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1
                                                    else Path("curves.png"))
    check_new_file(output)
    print(plot_runs([Path(run) for run in args.runs], output, args.labels))
    return 0


COMMAND_VARIABLE = "MNR_COMMAND"  # the command as the user typed it, for processes torchrun started


def resume_command() -> str:
    """The command that continues this run: the one given, with --resume."""
    command = os.environ.get(COMMAND_VARIABLE) or shlex.join(["mnr", *sys.argv[1:]])
    return command if "--resume" in shlex.split(command) else f"{command} --resume"


if __name__ == "__main__":
    sys.exit(main())
