"""Label and field selectors, in Kubernetes' syntax and with its matching rules.

Label selectors: comma-separated requirements ``key``, ``!key``, ``key=v`` (or ``==``),
``key!=v``, ``key in (a,b)``, ``key notin (a,b)``, ``key>N``, ``key<N``. A ``!=`` or
``notin`` requirement also matches objects without the label, as in Kubernetes.

Field selectors: ``field=v``, ``field==v``, ``field!=v`` joined by commas, where ``\\,``,
``\\=`` and ``\\\\`` escape; DataPlaneServices support ``metadata.name`` and
``metadata.namespace`` (always empty: they are cluster-scoped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bridge.apiserver import errors
from bridge.status import StatusError

_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY = re.compile(rf"^({_DNS_SUBDOMAIN}/)?{_NAME}$")
_VALUE = re.compile(rf"^{_NAME}?$")
_SPECIAL = frozenset(" \t\n,()=!<>")


class Operator(StrEnum):
    EQUALS = "="
    NOT_EQUALS = "!="
    IN = "in"
    NOT_IN = "notin"
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    GREATER_THAN = "gt"
    LESS_THAN = "lt"


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case Operator.EQUALS | Operator.IN:
                return present and value in self.values
            case Operator.NOT_EQUALS | Operator.NOT_IN:
                return not present or value not in self.values
            case Operator.EXISTS:
                return present
            case Operator.DOES_NOT_EXIST:
                return not present
            case Operator.GREATER_THAN | Operator.LESS_THAN:
                try:
                    number = int(value or "")
                except ValueError:
                    return False
                bound = int(next(iter(self.values)))
                return number > bound if self.operator is Operator.GREATER_THAN else number < bound
        return False  # pragma: no cover - every operator is handled above


@dataclass(frozen=True, slots=True)
class LabelSelector:
    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements


def _tokens(text: str) -> list[str]:
    tokens: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in " \t\n":
            i += 1
        elif text.startswith(("==", "!="), i):
            tokens.append(text[i : i + 2])
            i += 2
        elif char in ",()=!<>":
            tokens.append(char)
            i += 1
        else:
            start = i
            while i < len(text) and text[i] not in _SPECIAL:
                i += 1
            tokens.append(text[start:i])
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.at = 0

    def fail(self, expected: str) -> StatusError:
        found = self.tokens[self.at] if self.at < len(self.tokens) else "end of string"
        return errors.bad_request(
            f"unable to parse requirement: found '{found}', expected: {expected} "
            f"(in labelSelector {self.text!r})"
        )

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> str | None:
        lexeme = self.peek()
        self.at += 1
        return lexeme

    def key(self) -> str:
        lexeme = self.take()
        if lexeme is None or lexeme in (",", "(", ")", "=", "==", "!=", "!", "<", ">"):
            self.at -= 1
            raise self.fail("identifier")
        if not _KEY.match(lexeme) or len(lexeme) > 316:
            raise errors.bad_request(f"invalid label key {lexeme!r} in labelSelector")
        return lexeme

    def value(self) -> str:
        lexeme = self.peek()
        if lexeme is None or lexeme in (",", ")"):
            return ""  # "key=" selects an empty value
        if lexeme in ("(", "=", "==", "!=", "!", "<", ">"):
            raise self.fail("identifier")
        self.at += 1
        if not _VALUE.match(lexeme):
            raise errors.bad_request(f"invalid label value {lexeme!r} in labelSelector")
        return lexeme

    def values(self) -> frozenset[str]:
        if self.take() != "(":
            self.at -= 1
            raise self.fail("'('")
        found: set[str] = set()
        while True:
            found.add(self.value())
            lexeme = self.take()
            if lexeme == ")":
                return frozenset(found)
            if lexeme != ",":
                self.at -= 1
                raise self.fail("',' or ')'")

    def requirement(self) -> Requirement:
        if self.peek() == "!":
            self.at += 1
            return Requirement(self.key(), Operator.DOES_NOT_EXIST)
        key = self.key()
        lexeme = self.peek()
        if lexeme is None or lexeme == ",":
            return Requirement(key, Operator.EXISTS)
        self.at += 1
        if lexeme in ("=", "=="):
            return Requirement(key, Operator.EQUALS, frozenset({self.value()}))
        if lexeme == "!=":
            return Requirement(key, Operator.NOT_EQUALS, frozenset({self.value()}))
        if lexeme in ("in", "notin"):
            operator = Operator.IN if lexeme == "in" else Operator.NOT_IN
            return Requirement(key, operator, self.values())
        if lexeme in ("<", ">"):
            bound = self.take()
            if bound is None or not re.fullmatch(r"-?[0-9]+", bound):
                self.at -= 1
                raise self.fail("an integer")
            operator = Operator.GREATER_THAN if lexeme == ">" else Operator.LESS_THAN
            return Requirement(key, operator, frozenset({bound}))
        self.at -= 1
        raise self.fail("one of =, ==, !=, in, notin, <, >")

    def parse(self) -> LabelSelector:
        found: list[Requirement] = []
        if not self.tokens:
            return LabelSelector()
        while True:
            found.append(self.requirement())
            lexeme = self.take()
            if lexeme is None:
                return LabelSelector(tuple(found))
            if lexeme != ",":
                self.at -= 1
                raise self.fail("','")


def parse_label_selector(text: str) -> LabelSelector:
    return _Parser(text).parse()


# -- field selectors --------------------------------------------------------------------------

FIELDS: Mapping[str, Callable[[Mapping[str, Any]], str]] = {
    "metadata.name": lambda obj: str((obj.get("metadata") or {}).get("name") or ""),
    "metadata.namespace": lambda obj: "",
}


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    field: str
    value: str
    negated: bool

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return (FIELDS[self.field](obj) == self.value) != self.negated


@dataclass(frozen=True, slots=True)
class FieldSelector:
    requirements: tuple[FieldRequirement, ...] = ()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return all(r.matches(obj) for r in self.requirements)

    def exact_name(self) -> str | None:
        """The one name selected by ``metadata.name=x``, if the selector pins one."""
        names = {r.value for r in self.requirements if r.field == "metadata.name" and not r.negated}
        return names.pop() if len(names) == 1 else None


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise errors.bad_request(f"invalid field selector {text!r}: it ends with a lone \\")
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _operator(term: str) -> tuple[str, str, bool]:
    escaped = False
    for i, char in enumerate(term):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif term.startswith("!=", i):
            return term[:i], term[i + 2 :], True
        elif term.startswith("==", i):
            return term[:i], term[i + 2 :], False
        elif char == "=":
            return term[:i], term[i + 1 :], False
    raise errors.bad_request(f"invalid field selector: {term!r} has no =, == or != operator")


def parse_field_selector(text: str) -> FieldSelector:
    found: list[FieldRequirement] = []
    if not text.strip():
        return FieldSelector()
    for term in _split_unescaped(text, ","):
        field, value, negated = _operator(term)
        field = _unescape(field).strip()
        if field not in FIELDS:
            known = ", ".join(f'"{name}"' for name in FIELDS)
            raise errors.bad_request(f'"{field}" is not a known field selector: only {known}')
        found.append(FieldRequirement(field, _unescape(value), negated))
    return FieldSelector(tuple(found))


@dataclass(frozen=True, slots=True)
class Selection:
    """Both selectors of a list, watch or deletecollection request."""

    labels: LabelSelector = LabelSelector()
    fields: FieldSelector = FieldSelector()

    def matches(self, obj: Mapping[str, Any]) -> bool:
        metadata = obj.get("metadata") or {}
        labels = metadata.get("labels") or {}
        return self.fields.matches(obj) and self.labels.matches(labels)

    @property
    def everything(self) -> bool:
        return self.labels.empty and not self.fields.requirements

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Selection:
        return cls(
            parse_label_selector(query.get("labelSelector", "")),
            parse_field_selector(query.get("fieldSelector", "")),
        )
