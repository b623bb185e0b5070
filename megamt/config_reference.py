"""``megamt config``: every config key with its type, default and meaning, from the tree itself.

The reference is generated from ``megamt/config.py``: the dataclass fields give the keys,
types and defaults, the string under each field (its docstring) gives the meaning. The
checked-in ``docs/config.md`` is this module's Markdown output, and a test regenerates it
and compares, so the reference cannot drift from the code::

    megamt config reference              # the reference as text (also under `megamt config --help`)
    megamt config reference --markdown   # docs/config.md
    megamt config show SPEC [key=value]  # a spec resolved: YAML + overrides + defaults, validated
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing
from dataclasses import MISSING
from typing import Any, Iterator

from megamt import config as C

# Containers whose keys users choose: how the reference names them.
MAP_KEYS = {"tasks": "<task>", "inputs": "<split>", "fields": "<canonical field>", "verbalizers": "<label>",
            "static_weights": "<task>", "metrics": "<task>", "weights": "<task>", "from_config": "<hf key>"}


def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass: the string literal right under each field."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


@dataclasses.dataclass
class Key:
    """One row of the reference."""

    key: str
    type: str
    default: str
    doc: str
    section: str


def _type_text(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union or (origin is not None and origin.__name__ == "UnionType"):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_type_text(a) for a in inner)
        return f"{text} or null" if len(inner) < len(args) else text
    if origin is list:
        return f"list of {_type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping to {_type_text(args[1])}" if args else "mapping"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, dict)) and not value:
        return "[]" if isinstance(value, list) else "{}"
    return str(value)


def iter_keys(cls=C.MultitaskConfig, prefix: str = "", section: str = "") -> Iterator[Key]:
    """Every leaf key of the tree under ``cls``, depth first, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        sec = section or f.name
        inner = _container_item(tp)
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, key + ".", sec)
        elif inner is not None and dataclasses.is_dataclass(inner[1]):
            kind, item = inner
            sub = f"{key}.{MAP_KEYS.get(f.name, '<name>')}." if kind == "dict" else f"{key}[i]."
            yield from iter_keys(item, sub, sec)
        else:
            yield Key(key, _type_text(tp), _default_text(f), docs.get(f.name, ""), sec)


def _container_item(tp) -> tuple[str, Any] | None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict and args:
        return "dict", args[1]
    if origin is list and args:
        return "list", args[0]
    return None


def undocumented() -> list[str]:
    """Keys without a docstring (a test keeps this empty)."""
    return [k.key for k in iter_keys() if not k.doc.strip()]


def _sections() -> list[tuple[str, str]]:
    docs = []
    for f in dataclasses.fields(C.MultitaskConfig):
        tp = typing.get_type_hints(C.MultitaskConfig)[f.name]
        item = _container_item(tp)
        cls = item[1] if item else tp
        docs.append((f.name, inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("\n", " ")))
    return docs


INTRO = ("A megamt config (spec) is one YAML file with these sections; every key is optional unless "
         "marked required. Precedence: command-line dotted overrides (`data.seq_len=1024`) > YAML > "
         "defaults. Unknown keys, wrong types and impossible values are errors that name the key. "
         "`${VAR}` in a string value is replaced by the environment variable VAR. Relative input paths "
         "are resolved against the spec file's folder.")


def aliases_text() -> list[str]:
    return [f"{alias} -> {section}.{attr}" for alias, (section, attr) in C.ALIASES.items()]


def reference_markdown() -> str:
    lines = ["# megamt config reference", "",
             "<!-- generated by `megamt config reference --markdown > docs/config.md`; "
             "tests/unit/test_config_reference.py checks it is current -->", "", INTRO, ""]
    keys = list(iter_keys())
    for name, doc in _sections():
        lines += [f"## `{name}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for k in keys:
            if k.section == name:
                meaning = " ".join(k.doc.split()).replace("|", "\\|")
                lines.append(f"| `{k.key}` | {k.type.replace('|', '/')} | `{k.default}` | {meaning} |")
        lines.append("")
    lines += ["## Aliases", "", "Flat names accepted by `MultitaskConfig(...)` and as overrides, one field each:", ""]
    lines += [f"- `{a}`" for a in aliases_text()]
    return "\n".join(lines) + "\n"


def reference_text(width: int = 100) -> str:
    import textwrap

    lines = [textwrap.fill(INTRO, width), ""]
    keys = list(iter_keys())
    for name, doc in _sections():
        lines += [f"{name}: {doc}"]
        for k in keys:
            if k.section == name:
                lines.append(f"  {k.key}  ({k.type}; default {k.default})")
                lines += textwrap.wrap(" ".join(k.doc.split()), width, initial_indent="      ",
                                       subsequent_indent="      ")
        lines.append("")
    lines += ["aliases: " + ", ".join(aliases_text())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megamt config", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="every key:\n\n" + reference_text())
    sub = ap.add_subparsers(dest="command")
    ref = sub.add_parser("reference", help="every config key: type, default, meaning")
    ref.add_argument("--markdown", action="store_true", help="Markdown (docs/config.md) instead of text")
    show = sub.add_parser("show", help="print a spec resolved (YAML + overrides + defaults), validated")
    show.add_argument("spec")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=1024")
    args = ap.parse_args(argv)
    if args.command == "reference":
        sys.stdout.write(reference_markdown() if args.markdown else reference_text())
        return 0
    if args.command == "show":
        try:
            cfg = C.load_config(args.spec, args.overrides)
        except C.ConfigError as e:
            print(f"megamt config: {e}", file=sys.stderr)
            return 2
        sys.stdout.write(cfg.to_yaml())
        return 0
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
