"""The route template language: the small, safe subset of Go ``text/template`` Grafana uses.

A plugin.json route renders its ``url``, ``urlParams``, ``headers``, ``body`` and
``tokenAuth`` strings against the datasource's settings. Grafana runs full Go templates; the
forms routes actually use (protocol reference §5) are accepted here and nothing else:

* literal text, and actions ``{{.JsonData.key}}`` / ``{{.SecureJsonData.key}}`` (``key`` a Go
  identifier; ``.JsonData.a.b`` walks nested objects);
* ``{{orEmpty .JsonData.key}}`` (or ``{{.JsonData.key | orEmpty}}``): ``""`` for a missing or
  null value instead of Go's ``<no value>``;
* Go's whitespace trim markers ``{{- `` and `` -}}``.

Anything else (pipelines, other functions, variables, comments, ``range``...) is refused when
the route is loaded, with the offending text. Nothing is ever evaluated as code. Values print
as Go's ``fmt`` prints the decoded JSON: strings as they are, numbers as written, ``true``,
``[a b]``, ``map[k:v]``; a missing key prints ``<no value>``, as in Grafana.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["Template", "TemplateData", "TemplateError"]

NO_VALUE: Final = "<no value>"
_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FIELD = re.compile(rf"\.(JsonData|SecureJsonData)((?:\.{_IDENT})+)")
_ROOTS: Final = {"JsonData": "jsonData", "SecureJsonData": "secureJsonData"}


class TemplateError(ValueError):
    """A template that cannot be parsed, or cannot be rendered against these settings."""


@dataclass(frozen=True, slots=True)
class TemplateData:
    """What a template sees: the datasource's ``jsonData`` and decrypted ``secureJsonData``."""

    json_data: Mapping[str, Any]
    secure_json_data: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Field:
    root: str  # "JsonData" or "SecureJsonData"
    keys: tuple[str, ...]
    or_empty: bool


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and field references, in order."""

    source: str
    parts: tuple[str | _Field, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        parts: list[str | _Field] = []
        position = 0
        trim_next = False
        for match in _ACTION.finditer(source):
            text = source[position : match.start()]
            inner = match.group(1)
            if trim_next:
                text = text.lstrip()
            if inner.startswith("-") and inner[1:2].isspace():
                text = text.rstrip()
                inner = inner[1:]
            trim_next = inner.endswith("-") and inner[-2:-1].isspace()
            if trim_next:
                inner = inner[:-1]
            if text:
                parts.append(text)
            parts.append(_action(inner.strip(), match.group(0)))
            position = match.end()
        tail = source[position:]
        if "{{" in tail:
            raise TemplateError(f"unclosed '{{{{' in template {source!r}")
        if trim_next:
            tail = tail.lstrip()
        if tail:
            parts.append(tail)
        return cls(source=source, parts=tuple(parts))

    @property
    def is_literal(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def render(self, data: TemplateData) -> str:
        out: list[str] = []
        for part in self.parts:
            out.append(part if isinstance(part, str) else _render_field(part, data))
        return "".join(out)


def _action(inner: str, whole: str) -> _Field:
    or_empty = False
    words = inner.split()
    if len(words) == 2 and words[0] == "orEmpty":
        expression, or_empty = words[1], True
    elif len(words) == 3 and words[1:2] == ["|"] and words[2] == "orEmpty":
        expression, or_empty = words[0], True
    elif len(words) == 1:
        expression = words[0]
    else:
        raise TemplateError(
            f"unsupported template action {whole!r}: only {{{{.JsonData.key}}}}, "
            "{{.SecureJsonData.key}} and orEmpty of either are allowed"
        )
    match = _FIELD.fullmatch(expression)
    if match is None:
        raise TemplateError(
            f"unsupported template action {whole!r}: expected .JsonData.<key> or "
            ".SecureJsonData.<key>"
        )
    root = match.group(1)
    keys = tuple(match.group(2)[1:].split("."))
    if root == "SecureJsonData" and len(keys) > 1:
        raise TemplateError(
            f"invalid template action {whole!r}: secureJsonData values are strings, "
            "they have no fields"
        )
    return _Field(root=root, keys=keys, or_empty=or_empty)


_MISSING: Final = object()


def _render_field(field: _Field, data: TemplateData) -> str:
    value: Any = data.json_data if field.root == "JsonData" else data.secure_json_data
    walked = _ROOTS[field.root]
    for key in field.keys:
        if value is _MISSING or value is None:
            raise TemplateError(f"{walked} is missing, so {walked}.{key} cannot be read")
        if not isinstance(value, Mapping):
            raise TemplateError(
                f"{walked} is {_kind(value)}, not an object, so {walked}.{key} cannot be read"
            )
        value = value.get(key, _MISSING)
        walked = f"{walked}.{key}"
    if value is _MISSING or value is None:
        return "" if field.or_empty else NO_VALUE
    return go_format(value)


def go_format(value: Any, *, nested: bool = False) -> str:
    """``value`` as Go's ``fmt`` prints a decoded JSON value (numbers as JSON writes them)."""
    if value is None:
        return "<nil>" if nested else NO_VALUE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, Mapping):
        items = " ".join(f"{k}:{go_format(value[k], nested=True)}" for k in sorted(value))
        return f"map[{items}]"
    if isinstance(value, list | tuple):
        return "[" + " ".join(go_format(v, nested=True) for v in value) + "]"
    return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__
