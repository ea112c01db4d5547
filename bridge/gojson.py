"""JSON spelled the way Grafana's Go encoders spell it: strings, floats, frame meta, field config.

Grafana decodes every plugin frame into the SDK's `data.Frame` and writes it back out with
json-iterator. Three details of that path show in the bytes and are reproduced here:

- scalars: jsoniter's `WriteString` (no HTML escaping) for names, labels and string values;
  the standard-library-compatible `WriteVal` (HTML-escaped strings, sorted map keys, every
  number a float64) for values of free-form maps; `WriteFloat64` for numbers, which prints
  the shortest round-trip digits in fixed notation unless |v| < 1e-6 or |v| >= 1e21;
- `meta` is decoded into `data.FrameMeta` and re-encoded from that struct, so unknown keys
  disappear, known keys come out in the struct's order and `typeVersion` is always present;
- a field's `config` is decoded into `data.FieldConfig` and written by the SDK's hand-written
  `writeFieldConfig`, again in a fixed order that drops unknown keys.

Everything that Go's `json.Unmarshal` would reject raises `GoJSONError`, because the SDK
then fails to decode the frame at all.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final, Literal


class GoJSONError(ValueError):
    """A metadata document that Go's json.Unmarshal into the SDK's types would reject."""


# ---- scalars ----

_SHORT_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED: Final = re.compile('["\\\\\x00-\x1f]')
_ESCAPED_HTML: Final = re.compile('["\\\\\x00-\x1f<>&\u2028\u2029]')


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def go_string(value: str, *, html: bool = False) -> str:
    """A JSON string as jsoniter writes it (`WriteString`, or HTML-escaped like `WriteVal`)."""
    return '"' + (_ESCAPED_HTML if html else _ESCAPED).sub(_escape, value) + '"'


def _to_float32(value: float) -> float:
    try:
        narrowed: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:  # a rounded candidate beyond float32's range: not a round trip
        return math.inf
    return narrowed


_F32_FIXED_MIN: Final = _to_float32(1e-6)
_F32_FIXED_MAX: Final = _to_float32(1e21)


def _exponent_form(number: Decimal) -> str:
    """Go's `%e` with shortest digits: d.ddde±dd (at least two exponent digits)."""
    sign, digits, exponent = number.normalize().as_tuple()
    assert isinstance(exponent, int)
    scientific = exponent + len(digits) - 1
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return f"{'-' if sign else ''}{mantissa}e{'-' if scientific < 0 else '+'}{abs(scientific):02d}"


def go_float64(value: float) -> str:
    """A finite float64 as jsoniter's `WriteFloat64` prints it (`'f'` or `'e'`, shortest)."""
    text = repr(value)
    if "e" in text:
        return format(Decimal(text), "f") if 1e-6 <= abs(value) < 1e21 else text
    return text[:-2] if text.endswith(".0") else text


def go_float32(value: float) -> str:
    """A finite float32 as jsoniter's `WriteFloat32` prints it (other floats are narrowed first)."""
    value = _to_float32(value)
    shortest = Decimal(repr(value))
    for digits in range(1, 10):
        candidate = f"{value:.{digits - 1}e}"
        if _to_float32(float(candidate)) == value:
            shortest = Decimal(candidate)
            break
    magnitude = abs(value)
    if magnitude == 0 or _F32_FIXED_MIN <= magnitude < _F32_FIXED_MAX:
        return format(shortest, "f")
    return _exponent_form(shortest)


def go_general(value: float) -> str:
    """A float64 as Go's `%v` prints it: `%g` with shortest digits (exponent from 1e+06 up)."""
    if not math.isfinite(value):
        return "null"  # the SDK's ConfFloat64 marshals NaN and ±Inf as null
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    number = Decimal(repr(value)).normalize()
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)
    scientific = exponent + len(digits) - 1
    if scientific < -4 or scientific >= 6:
        return _exponent_form(number)
    return format(number, "f")


def go_value(value: Any) -> str:
    """Any decoded JSON value as the SDK re-encodes an `interface{}`: sorted keys, float64s."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return go_string(value, html=True)
    if isinstance(value, int | float):
        return go_float64(float(value))
    if isinstance(value, list):
        return "[" + ",".join(go_value(item) for item in value) + "]"
    return (
        "{"
        + ",".join(go_string(key, html=True) + ":" + go_value(value[key]) for key in sorted(value))
        + "}"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(text: str | bytes, *, what: str) -> Any:
    """Strict JSON (no NaN/Infinity); numbers too large for a float64 are rejected like Go does."""
    try:
        value = json.loads(text, parse_constant=_reject_constant)
        _check_numbers(value)
    except (ValueError, OverflowError, RecursionError) as exc:
        raise GoJSONError(f"{what} is not valid JSON: {exc}") from None
    return value


def _check_numbers(value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        float(value)  # OverflowError beyond float64, as Go's decoder reports "out of range"
    elif isinstance(value, list):
        for item in value:
            _check_numbers(item)
    elif isinstance(value, dict):
        for item in value.values():
            _check_numbers(item)


# ---- the SDK's structs: decode as json.Unmarshal does, encode as the SDK writes them ----


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _mismatch(path: str, want: str, value: Any) -> GoJSONError:
    return GoJSONError(f"{path}: cannot unmarshal {_describe(value)} into {want}")


@dataclass(frozen=True, slots=True)
class _Kind:
    """How one Go type reads a JSON value, writes it back, and what omitempty considers empty."""

    decode: Callable[[Any, str], Any]  # JSON null or a missing key arrive as None
    encode: Callable[[Any], str]
    empty: Callable[[Any], bool]
    pointer: bool = False  # nil-able: writeFieldConfig writes it whenever it is not nil


Policy = Literal["always", "omitempty", "set"]


@dataclass(frozen=True, slots=True)
class _Member:
    key: str
    kind: _Kind
    policy: Policy  # "set": writeFieldConfig's hand-written `!= ""` / `!= nil` checks

    def omitted(self, value: Any) -> bool:
        if self.policy == "always":
            return False
        if self.policy == "set" and self.kind.pointer:
            return value is None
        return self.kind.empty(value)


def _string(value: Any, path: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _mismatch(path, "string", value)
    return value


def _bool(value: Any, path: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise _mismatch(path, "bool", value)
    return value


def _number(value: Any, path: str) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise _mismatch(path, "float64", value)
    return None if value is None else float(value)


def _unsigned(bits: int) -> Callable[[Any, str], int | None]:
    def decode(value: Any, path: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
            raise _mismatch(path, f"uint{bits}", value)
        return value

    return decode


def _object(value: Any, path: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise _mismatch(path, "map[string]interface {}", value)
    return value


def _list_of(item: _Kind, go_type: str) -> _Kind:
    def decode(value: Any, path: str) -> list[Any] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise _mismatch(path, go_type, value)
        return [item.decode(element, f"{path}[{index}]") for index, element in enumerate(value)]

    def encode(value: list[Any] | None) -> str:
        return "null" if value is None else "[" + ",".join(map(item.encode, value)) + "]"

    return _Kind(decode, encode, lambda value: not value, pointer=True)


def _struct(members: Iterable[_Member], go_type: str, *, pointer: bool) -> _Kind:
    spec = tuple(members)
    exact = {member.key: member for member in spec}
    folded = {member.key.lower(): member for member in spec}

    def decode(value: Any, path: str) -> dict[str, Any] | None:
        if value is None:
            return None if pointer else {}
        if not isinstance(value, dict):
            raise _mismatch(path, go_type, value)
        fields: dict[str, Any] = {}
        for key, element in value.items():
            # encoding/json prefers an exact key but accepts a case-insensitive match
            member = exact.get(key) or folded.get(key.lower())
            if member is not None:
                fields[member.key] = member.kind.decode(element, f"{path}.{member.key}")
        return fields

    def encode(fields: dict[str, Any] | None) -> str:
        if fields is None:
            return "null"
        parts = []
        for member in spec:
            value = fields.get(member.key)
            if member.key not in fields:
                value = member.kind.decode(None, "")
            if not member.omitted(value):
                parts.append(go_string(member.key) + ":" + member.kind.encode(value))
        return "{" + ",".join(parts) + "}"

    return _Kind(decode, encode, _is_nil, pointer=pointer)


def _go_bool(value: Any) -> str:
    return "true" if value else "false"


def _falsy(value: Any) -> bool:
    return not value


def _is_nil(value: Any) -> bool:
    return value is None


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _mismatch(path, "int", value)
    return value


STRING = _Kind(_string, lambda value: go_string(value, html=True), _falsy)
RAW_STRING = _Kind(_string, go_string, _falsy)  # written with WriteString
BOOL = _Kind(lambda value, path: bool(_bool(value, path)), _go_bool, _falsy)
BOOL_POINTER = _Kind(_bool, _go_bool, _is_nil, pointer=True)
UINT16_POINTER = _Kind(_unsigned(16), str, _is_nil, pointer=True)
FLOAT64 = _Kind(lambda value, path: _number(value, path) or 0.0, go_float64, _falsy)
CONF_FLOAT = _Kind(lambda value, path: _number(value, path) or 0.0, go_general, _falsy)
CONF_FLOAT_POINTER = _Kind(_number, go_general, _is_nil, pointer=True)
OBJECT = _Kind(_object, go_value, _falsy, pointer=True)
OBJECT_POINTER = _Kind(_object, go_value, _is_nil, pointer=True)  # a struct we do not model
ANY = _Kind(lambda value, path: value, go_value, _is_nil, pointer=True)
ANY_LIST = _list_of(ANY, "[]interface {}")
INT_LIST = _list_of(_Kind(_int, str, _falsy), "[]int")
STRING_LIST = _list_of(STRING, "[]string")


def _type_version(value: Any, path: str) -> list[int]:
    if value is None:
        return [0, 0]
    if not isinstance(value, list):
        raise _mismatch(path, "data.FrameTypeVersion", value)
    parts = [_unsigned(64)(element, f"{path}[{index}]") or 0 for index, element in enumerate(value)]
    return [*parts, 0, 0][:2]  # a Go array keeps its length whatever the JSON holds


TYPE_VERSION = _Kind(_type_version, lambda value: f"[{value[0]},{value[1]}]", lambda value: False)

_SEVERITIES: Final = ("info", "warning", "error")


def _severity(value: Any, path: str) -> str:
    if value is None:
        return "info"
    if value not in _SEVERITIES:
        raise GoJSONError(f"{path}: unrecognized notice severity {value!r}")
    return str(value)


SEVERITY = _Kind(_severity, go_string, lambda value: False)


def _field_config_members(policy: Policy, text: _Kind) -> list[_Member]:
    """`data.FieldConfig` in declaration order (also writeFieldConfig's order)."""
    threshold = _struct(
        [
            _Member("value", CONF_FLOAT, "omitempty"),
            _Member("color", STRING, "omitempty"),
            _Member("state", STRING, "omitempty"),
        ],
        "data.Threshold",
        pointer=False,
    )
    thresholds = _struct(
        [
            _Member("mode", STRING, "always"),
            _Member("steps", _list_of(threshold, "[]data.Threshold"), "always"),
        ],
        "data.ThresholdsConfig",
        pointer=True,
    )
    link = _struct(
        [
            _Member("title", STRING, "omitempty"),
            _Member("targetBlank", BOOL, "omitempty"),
            _Member("url", STRING, "omitempty"),
            _Member("internal", OBJECT_POINTER, "omitempty"),
        ],
        "data.DataLink",
        pointer=False,
    )
    enum = _struct(
        [
            _Member("text", STRING_LIST, "always"),
            _Member("color", STRING_LIST, "omitempty"),
            _Member("icon", STRING_LIST, "omitempty"),
            _Member("description", STRING_LIST, "omitempty"),
        ],
        "data.EnumFieldConfig",
        pointer=True,
    )
    type_config = _struct(
        [_Member("enum", enum, "omitempty")], "data.FieldTypeConfig", pointer=True
    )
    return [
        _Member("displayName", text, policy),
        _Member("displayNameFromDS", text, policy),
        _Member("path", text, policy),
        _Member("description", text, policy),
        _Member("filterable", BOOL_POINTER, policy),
        _Member("writeable", BOOL_POINTER, policy),
        _Member("unit", text, policy),
        _Member("decimals", UINT16_POINTER, policy),
        _Member("min", CONF_FLOAT_POINTER, policy),
        _Member("max", CONF_FLOAT_POINTER, policy),
        _Member("interval", FLOAT64, "omitempty"),
        _Member("mappings", ANY_LIST, policy),
        _Member("thresholds", thresholds, policy),
        _Member("color", OBJECT, policy),
        _Member("links", _list_of(link, "[]data.DataLink"), policy),
        _Member("noValue", text, policy),
        _Member("type", type_config, policy),
        _Member("custom", OBJECT, policy),
    ]


FIELD_CONFIG: Final = _struct(
    _field_config_members("set", RAW_STRING), "data.FieldConfig", pointer=False
)
_QUERY_STAT: Final = _struct(
    [*_field_config_members("omitempty", STRING), _Member("value", FLOAT64, "always")],
    "data.QueryStat",
    pointer=False,
)
_NOTICE: Final = _struct(
    [
        _Member("severity", SEVERITY, "always"),
        _Member("text", STRING, "always"),
        _Member("link", STRING, "omitempty"),
        _Member("inspect", ANY, "omitempty"),
    ],
    "data.Notice",
    pointer=False,
)
FRAME_META: Final = _struct(
    [
        _Member("type", STRING, "omitempty"),
        _Member("typeVersion", TYPE_VERSION, "always"),
        _Member("path", STRING, "omitempty"),
        _Member("pathSeparator", STRING, "omitempty"),
        _Member("custom", ANY, "omitempty"),
        _Member("stats", _list_of(_QUERY_STAT, "[]data.QueryStat"), "omitempty"),
        _Member("notices", _list_of(_NOTICE, "[]data.Notice"), "omitempty"),
        _Member("channel", STRING, "omitempty"),
        _Member("preferredVisualisationType", STRING, "omitempty"),
        _Member("preferredVisualisationPluginId", STRING, "omitempty"),
        _Member("executedQueryString", STRING, "omitempty"),
        _Member("dataTopic", STRING, "omitempty"),
        _Member("uniqueRowIdFields", INT_LIST, "omitempty"),
    ],
    "data.FrameMeta",
    pointer=False,
)


def frame_meta_json(text: str) -> str:
    """Schema metadata `meta` as Grafana writes it after decoding it into `data.FrameMeta`."""
    return FRAME_META.encode(FRAME_META.decode(parse_json(text, what="meta"), "meta"))


def field_config_json(text: str) -> str:
    """Field metadata `config` as the SDK's writeFieldConfig writes the decoded FieldConfig."""
    return FIELD_CONFIG.encode(FIELD_CONFIG.decode(parse_json(text, what="config"), "config"))


def labels_json(text: str) -> str | None:
    """Field metadata `labels` (map[string]string, keys sorted); None when it is JSON null."""
    labels = parse_json(text, what="labels")
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise _mismatch("labels", "data.Labels", labels)
    for key, value in labels.items():
        if not isinstance(value, str):
            raise _mismatch(f"labels.{key}", "string", value)
    return (
        "{"
        + ",".join(go_string(key) + ":" + go_string(labels[key]) for key in sorted(labels))
        + "}"
    )
