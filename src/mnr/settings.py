"""Settings: each component declares its own, as a dataclass of ``setting(...)`` fields (litgpt's ``args.py``);
users see every one as a flat TOML key and a ``--flag``.

A field's name is its key (``batch_size`` -> ``--batch-size``); a group read by ``mnr train`` under a prefix
(mining's ``range_max`` -> ``mine_range_max``) is given its keys by the caller. A type is text, an integer, a
number or true/false, a list of one of those, a table of texts by name (``dict[str, str]``: ``--prompts
query='query: '``, TOML ``prompts = {query = "query: "}``), or one of those ``| None`` (not set: decided at run
time). The
group's ``__post_init__`` calls ``check_types`` and then ``require`` for each rule on the values, so a bad value
fails with its flag named before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Iterator

from mnr.errors import ConfigError

SCALARS = {str: "text", int: "an integer", float: "a number", bool: "true or false"}
PLURALS = {str: "text", int: "integers", float: "numbers", bool: "true or false values"}


def setting(default, help: str, *, weights: bool, metavar: str = ""):
    """A setting: its default, its ``--flag`` help, and whether it changes the trained weights (``weights``: a
    checkpoint only resumes under the same values of those); ``metavar``: a list flag's word for an item."""
    metadata = {"help": help, "weights": weights, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def kind(group: type, name: str) -> tuple[type, type | None, bool]:
    """A field's (scalar type, its container: list, dict (of texts by name) or None, may be None)."""
    hint = typing.get_type_hints(group)[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, dict):
        return typing.get_args(hint)[-1], typing.get_origin(hint), optional
    return hint, None, optional


def items(group) -> Iterator[tuple[str, object]]:
    """(field name, value) of a settings object, in declaration order."""
    for f in dataclasses.fields(group):
        yield f.name, getattr(group, f.name)


def check_types(group, keys: dict[str, str] | None = None) -> None:
    """Every value of ``group`` is of its field's type (an integer where a number is expected becomes one; one text
    where a list of text is expected, as older config.toml files hold, a list of it); else a ConfigError naming the
    flag (``keys``: field name -> key, where they differ)."""
    for f in dataclasses.fields(group):
        scalar, container, optional = kind(type(group), f.name)
        is_list = container is list
        value = getattr(group, f.name)
        if value is None and optional:
            continue
        if container is dict:
            if not (isinstance(value, dict) and all(isinstance(k, str) and _is(v, scalar) for k, v in value.items())):
                raise ConfigError(f"{flag((keys or {}).get(f.name, f.name))} must be NAME=TEXT pairs (TOML: a table "
                                  f"of texts), got {value!r}")
            continue
        if is_list and scalar is str and isinstance(value, str):
            value = [value] if value else []
        if is_list and isinstance(value, list):
            value = [float(v) if _widens(v, scalar) else v for v in value]
        elif _widens(value, scalar):
            value = float(value)
        setattr(group, f.name, value)
        ok = (isinstance(value, list) and all(_is(v, scalar) for v in value)) if is_list else _is(value, scalar)
        if not ok:
            what = f"a list of {PLURALS[scalar]}" if is_list else SCALARS[scalar]
            raise ConfigError(f"{flag((keys or {}).get(f.name, f.name))} must be {what}, got {value!r}")


def _widens(value, scalar: type) -> bool:
    return scalar is float and isinstance(value, int) and not isinstance(value, bool)


def _is(value, scalar: type) -> bool:
    return isinstance(value, scalar) and not (scalar is int and isinstance(value, bool))


def require(group, name: str, ok: bool, message: str, keys: dict[str, str] | None = None) -> None:
    """A rule on one value: ``--flag message, got VALUE`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{flag((keys or {}).get(name, name))} {message}, got {getattr(group, name)!r}")


def add_flags(parser: argparse.ArgumentParser, group: type, keys: dict[str, str] | None = None,
              skip: tuple[str, ...] = (), defaults: dict | None = None, helps: dict | None = None) -> None:
    """One flag per field of ``group`` (``keys``: field name -> key where they differ; ``skip``: fields the command
    takes otherwise). Flags default to None, so a caller can tell which were given; the help shows the default
    (``defaults`` and ``helps``: the command's own, where they differ)."""
    for f in dataclasses.fields(group):
        if f.name in skip:
            continue
        key = (keys or {}).get(f.name, f.name)
        scalar, container, _ = kind(group, f.name)
        value = (defaults or {}).get(f.name, default(f))
        shown = value not in ("", [], {}, None)
        text = (helps or {}).get(f.name, f.metadata["help"])
        help_text = f"{text} (default: {value!r})" if shown else text
        if container is dict:  # NAME=TEXT ..., repeated flags add to it
            parser.add_argument(flag(key), nargs="+", action=PairsAction, default=None, type=pair(flag(key)),
                                metavar=f.metadata.get("metavar") or "NAME=TEXT", help=help_text)
        elif scalar is bool and not container:
            parser.add_argument(flag(key), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif container is list:  # a repeated flag adds to the list (argparse's default would keep the last)
            parser.add_argument(flag(key), nargs="+", action="extend", default=None, type=scalar,
                                metavar=f.metadata.get("metavar") or key.upper(), help=help_text)
        else:
            parser.add_argument(flag(key), type=scalar, default=None, metavar=key.upper(), help=help_text)


def pair(name: str):
    """An argparse type: ``NAME=TEXT`` -> (NAME, TEXT), split at the first ``=``; the text may be empty."""
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"{name}: expected NAME=TEXT, got {text!r}")
        return key.strip(), value
    return parse


class PairsAction(argparse.Action):
    """Collects ``NAME=TEXT`` pairs into a dict (a name given twice: the last text)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or {}) | dict(values))


def toml_value(value) -> str:
    if isinstance(value, dict):  # an inline table; quoted keys take any name
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string is a valid TOML basic string
