"""``mnr train | eval | encode``: parse flags, call one plain function, report errors plainly."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import sys
import typing
from pathlib import Path

from mnr.errors import MnrError

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
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # train eval encode plot

    train_parser = commands.add_parser(
        "train", help="fine-tune a model", epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a sentence-embedding model. Settings come from the defaults, then --config, "
                    "then flags. The output directory gets final/ (the last model), best/ (the best on "
                    "--sts-dev), log.jsonl and config.toml; both models load with sentence-transformers.")
    train_parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags win)")
    _add_config_flags(train_parser)

    eval_parser = commands.add_parser(
        "eval", help="STS Spearman/Pearson of one or more models, as a markdown table",
        description="Correlation (x100) between the cosine similarity of each sentence pair and its gold score. "
                    "Several models give one comparison table.")
    eval_parser.add_argument("models", nargs="+", metavar="MODEL", help="model directories or hub names")
    eval_parser.add_argument("--sts", nargs="+", metavar="FILE", help="STS files (sentence1, sentence2, score); "
                             "default: sts/stsb_test.jsonl.gz under --data-dir")
    eval_parser.add_argument("--data-dir", help="where relative --sts paths are looked up (default: $MNR_DATA_DIR)")
    eval_parser.add_argument("--columns", default="", help="map the STS files' column names to ours: OURS=THEIRS,... "
                             "e.g. sentence1=text_a,sentence2=text_b,score=label")
    eval_parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    eval_parser.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (faster on CPUs with "
                             "AVX-512 BF16 and GPUs; scores move by about 0.01)")

    encode_parser = commands.add_parser(
        "encode", help="embed the lines of a text file into a .npy array",
        description="Embed each line of a UTF-8 text file; row i of the (N, D) float32 array is line i.")
    encode_parser.add_argument("model", metavar="MODEL", help="model directory or hub name")
    encode_parser.add_argument("--input", required=True, metavar="FILE.txt", help="one text per line")
    encode_parser.add_argument("--output", required=True, metavar="FILE.npy", help="where to write the embeddings")
    encode_parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    encode_parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    encode_parser.add_argument("--bf16", action="store_true", help="encode under bf16 autocast (faster on CPUs "
                               "with AVX-512 BF16 and GPUs; cosines move by about 1e-4)")

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
        return {"train": _train, "eval": _eval, "encode": _encode, "plot": _plot}[args.command](args)
    except MnrError as e:
        print(f"mnr {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"mnr {args.command}: interrupted", file=sys.stderr)
        return 130


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; default None so we can tell which flags were given."""
    from mnr.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = default not in ("", [], None)
        help_text = f"{f.metadata['help']} (default: {default!r})" if shown else f.metadata["help"]
        if kind in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind == list[str]:
            parser.add_argument(flag, nargs="+", default=None, metavar="FILE", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=help_text)


def _train(args: argparse.Namespace) -> int:
    from mnr import distributed
    from mnr.config import TrainConfig
    from mnr.errors import Stopped
    from mnr.train import train

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig.from_sources(args.config, **flags)
    if config.nproc > 1 and "WORLD_SIZE" not in os.environ:  # not yet launched: let torchrun start the processes
        os.environ[COMMAND_VARIABLE] = shlex.join(["mnr", *sys.argv[1:]])  # for the resume command, --nproc kept
        distributed.launch(config.nproc, sys.argv[1:])
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
    print(f"curves:      {summary['curves']}")
    print(f"next:        {summary['next']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mnr.data import STS_COLUMNS_HINT, data_dir, load_sts, parse_column_map, resolve_path, short_name
    from mnr.errors import ConfigError
    from mnr.evaluate import comparison_table, evaluate_sts
    from mnr.model import SentenceEncoder

    root = data_dir(args.data_dir)
    if args.sts:
        specs = args.sts
    elif root is not None:
        specs = ["sts/stsb_test.jsonl.gz"]
    else:
        raise ConfigError("--sts: no STS file given (and no --data-dir / $MNR_DATA_DIR to find stsb_test in)")
    column_map = parse_column_map(args.columns)
    sets = {short_name(spec): load_sts(resolve_path(spec, root), column_map, hint=STS_COLUMNS_HINT) for spec in specs}
    results = {}
    for name in args.models:
        encoder = SentenceEncoder.load(name)
        results[name] = {set_name: evaluate_sts(encoder, examples, args.batch_size, bf16=args.bf16)
                         for set_name, examples in sets.items()}
    print(comparison_table(results))
    return 0


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    from mnr.data import not_utf8
    from mnr.errors import DataError
    from mnr.model import SentenceEncoder

    try:
        texts = Path(args.input).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise not_utf8(Path(args.input)) from None
    except OSError as e:
        raise DataError(f"{args.input}: cannot read: {e.strerror or e}") from None
    while texts and not texts[-1].strip():  # blank lines at the end of a file are not texts
        texts.pop()
    for line_no, text in enumerate(texts, start=1):
        if not text.strip():
            raise DataError(f"{args.input}:{line_no}: empty line (every line is a text to embed)")
    if not texts:
        raise DataError(f"{args.input}: empty file")
    encoder = SentenceEncoder.load(args.model)
    embeddings = encoder.encode(texts, batch_size=args.batch_size, normalize=args.normalize, bf16=args.bf16)
    output = Path(args.output)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, embeddings)
    tmp.replace(output)  # atomic: never a half-written array at --output
    print(f"{output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from mnr.errors import ConfigError
    from mnr.plot import plot_runs

    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    output = Path(args.output) if args.output else (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1
                                                    else Path("curves.png"))
    print(plot_runs([Path(run) for run in args.runs], output, args.labels))
    return 0


COMMAND_VARIABLE = "MNR_COMMAND"  # the command as the user typed it, for processes torchrun started


def resume_command() -> str:
    """The command that continues this run: the one given, with --resume."""
    command = os.environ.get(COMMAND_VARIABLE) or shlex.join(["mnr", *sys.argv[1:]])
    return command if "--resume" in shlex.split(command) else f"{command} --resume"


if __name__ == "__main__":
    sys.exit(main())
