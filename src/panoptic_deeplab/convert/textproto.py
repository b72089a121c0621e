"""Protobuf text format (``.textproto``, as deeplab2 writes its configs) read into nested dicts.

Only the syntax is parsed (``name: value``, ``name { ... }`` / ``name: { ... }``, ``#`` comments, repeated fields);
no message classes are needed, so deeplab2's and protobuf's code stay out. The caller picks the fields it knows
and applies the ``.proto`` defaults itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["TextprotoError", "field", "read_textproto"]


class TextprotoError(ValueError):
    """The file is not valid protobuf text format."""


_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|([A-Za-z_][\w.]*)|("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|'
                    r'([-+]?[\d.][\w.+-]*)|([:{}<>\[\],;]))')


def read_textproto(path: str | os.PathLike[str]) -> dict[str, list]:
    """A protobuf text-format file as nested dicts: every field maps to the list of its values (messages are
    dicts, strings unquoted, numbers int or float), without deeplab2's or protobuf's message classes."""
    text = Path(path).read_text()
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos:].strip() == "":
                break
            line = text.count("\n", 0, pos) + 1
            raise TextprotoError(f"{path}:{line}: cannot parse the text-format config near {text[pos:pos + 20]!r}")
        pos = match.end()
        for kind, value in zip(("name", "string", "number", "symbol"), match.groups()):
            if value is not None:
                tokens.append((kind, value))

    def message(i: int, closing: str | None) -> tuple[dict[str, list], int]:
        fields: dict[str, list] = {}
        while i < len(tokens):
            kind, value = tokens[i]
            if kind == "symbol" and value == closing:
                return fields, i + 1
            if kind != "name":
                raise TextprotoError(f"{path}: expected a field name, found {value!r}")
            i += 1
            if i < len(tokens) and tokens[i] == ("symbol", ":"):
                i += 1
            if i >= len(tokens):
                raise TextprotoError(f"{path}: field {value} has no value")
            kind2, token = tokens[i]
            if kind2 == "symbol" and token in "{<":
                child, i = message(i + 1, "}" if token == "{" else ">")
                fields.setdefault(value, []).append(child)
            else:
                fields.setdefault(value, []).append(_scalar(kind2, token))
                i += 1
            if i < len(tokens) and tokens[i] in (("symbol", ","), ("symbol", ";")):
                i += 1
        if closing is not None:
            raise TextprotoError(f"{path}: a message is not closed with {closing!r}")
        return fields, i

    return message(0, None)[0]


def _scalar(kind: str, token: str) -> str | int | float | bool:
    if kind == "string":
        return token[1:-1]
    if kind == "number":
        try:
            return int(token)
        except ValueError:
            return float(token)
    return {"true": True, "false": False}.get(token, token)


def field(fields: dict[str, list], dotted: str, default: object = None) -> object:
    """The last value of a dotted field path (``model_options.backbone.output_stride``), or ``default``."""
    *parents, leaf = dotted.split(".")
    for name in parents:
        values = fields.get(name)
        if not values:
            return default
        fields = values[-1]
    return fields.get(leaf, [default])[-1]
