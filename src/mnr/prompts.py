"""Prompts: a text put before the texts of a column (``query: `` before queries, ``passage: `` before passages), as
E5, BGE and nomic train and use them, and sentence-transformers saves them in a model.

A run names its prompts (``--prompts query='query: ' passage='passage: '``) and which columns get which
(``--prompt-columns``; by default the anchor gets ``query``, positives and negatives ``passage``, ``document`` or
``corpus``, where those are named). The model keeps them in ``config_sentence_transformers.json``, so
sentence-transformers' ``encode_query`` / ``encode_document`` / ``encode(prompt_name=...)`` and mnr's commands
apply them: ``SentenceEncoder.prompt`` says which text goes before a query, a document or any text.
"""

from __future__ import annotations

from dataclasses import dataclass

from mnr.errors import ConfigError
from mnr.settings import check_types, require, setting

QUERY = "query"  # the prompt name encode_query uses
DOCUMENT_NAMES = ("document", "passage", "corpus")  # the names encode_document looks for, in its order
COLUMNS = ("anchor", "positive", "negative", "premise", "hypothesis")  # the columns a prompt can go before


@dataclass
class PromptSettings:
    prompts: dict[str, str] = setting({}, "NAME=TEXT ...: a text put before the texts of a column, e.g. "
                                          "query='query: ' passage='passage: ' (see --prompt-columns); saved in the "
                                          "model, so sentence-transformers' encode_query / encode_document / "
                                          "encode(prompt_name=NAME), mnr eval, mine and encode apply them (default: "
                                          "none)", weights=True, metavar="NAME=TEXT")
    prompt_columns: dict[str, str] = setting({}, "COLUMN=NAME ...: which columns get which of --prompts, e.g. "
                                                 "anchor=query positive=passage negative=passage (default: the anchor "
                                                 "gets query, positives and negatives get document, passage or corpus, "
                                                 "those of them --prompts names)", weights=True,
                                             metavar="COLUMN=NAME")
    include_prompt: bool = setting(True, "pooling counts a prompt's tokens, as sentence-transformers does by "
                                         "default; --no-include-prompt pools the text's own tokens only (saved in "
                                         "the model's pooling config)", weights=True)

    def __post_init__(self):
        check_types(self)
        require(self, "prompts", all(name.strip() and "=" not in name for name in self.prompts),
                "names must be non-empty and without '='")
        self.check_columns(self.prompt_columns)
        unused = [name for name in self.prompts if name not in self.by_column().values()]
        if unused:
            raise ConfigError(f"--prompts: no column gets {', '.join(map(repr, unused))}; say which with "
                              f"--prompt-columns COLUMN=NAME (columns: {', '.join(COLUMNS)})")

    def check_columns(self, prompt_columns: dict[str, str], where: str = "") -> None:
        """{column: prompt name} (the run's, or a dataset's: ``where`` names it) names columns and prompts that
        exist."""
        bad = [c for c in prompt_columns if c not in COLUMNS]
        if bad:
            raise ConfigError(f"{where}--prompt-columns names columns {', '.join(COLUMNS)}, got {bad[0]!r}")
        missing = sorted(set(prompt_columns.values()) - set(self.prompts))
        if missing:
            raise ConfigError(f"{where}--prompt-columns uses prompts --prompts does not name ({', '.join(missing)}), "
                              f"got {prompt_columns!r}")

    def by_column(self) -> dict[str, str]:
        """{column: prompt name} of the columns that get a prompt."""
        if self.prompt_columns or not self.prompts:
            return dict(self.prompt_columns)
        document = next((name for name in DOCUMENT_NAMES if name in self.prompts), None)
        chosen = {"anchor": QUERY if QUERY in self.prompts else None, "positive": document, "negative": document}
        return {column: name for column, name in chosen.items() if name}

    def names(self, columns: tuple[str, ...], prompt_columns: dict[str, str] | None = None,
              check: bool = True) -> list[str]:
        """The prompt name of each of ``columns`` ("" for none), after checking (``check``) that every prompt goes
        before a column of these rows. ``prompt_columns``: a dataset's own {column: prompt name} (exactly those;
        None: the run's, ``by_column``)."""
        by_column = self.by_column() if prompt_columns is None else prompt_columns
        names = [by_column.get(c.split("_")[0], "") for c in columns]  # negative_2 is a negative
        unused = [name for name in self.prompts if name not in names]
        if unused and check:
            raise ConfigError(f"--prompts: no column of the training rows ({', '.join(columns)}) gets "
                              f"{', '.join(map(repr, unused))}; say which with --prompt-columns COLUMN=NAME")
        return names


@dataclass(frozen=True)
class PromptChoice:
    """The prompt each side of an evaluation or of mining gets, by name: None for the model's own choice
    (``SentenceEncoder.prompt``: what sentence-transformers' encode_query / encode_document / encode apply), ""
    for none."""

    query: str | None = None  # queries (retrieval), anchors (mining)
    corpus: str | None = None  # the corpus's passages
    sts: str | None = None  # both sentences of an STS pair

    @classmethod
    def of_run(cls, settings: PromptSettings) -> PromptChoice:
        """A training run's: queries get the anchor's (or premise's) prompt, passages the positive's (or
        hypothesis's); STS pairs the prompt both get where they get the same, else none."""
        by_column = settings.by_column()
        query = by_column.get("anchor", by_column.get("premise", ""))
        corpus = by_column.get("positive", by_column.get("hypothesis", ""))
        return cls(query, corpus, query if query == corpus else "")

    @classmethod
    def from_flag(cls, query: str | None = None, corpus: str | None = None, sts: str | None = None) -> PromptChoice:
        """From command-line names, where "none" means no prompt."""
        return cls(*("" if name == "none" else name for name in (query, corpus, sts)))


MODELS_OWN = PromptChoice()  # every side gets what sentence-transformers would apply with this model


def saved(prompts: dict[str, str]) -> dict[str, str]:
    """``prompts`` as a model saves them: with a ``document`` prompt where the documents' prompt has another name
    (``passage``, ``corpus``). sentence-transformers 5 and 6 give every model a ``document`` prompt, empty unless
    saved, and ``encode_document`` looks for it first: without it the documents would get no prompt there."""
    document = next((name for name in DOCUMENT_NAMES if name in prompts), None)
    return prompts if document in (None, "document") else {**prompts, "document": prompts[document]}
