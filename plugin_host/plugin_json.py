"""plugin.json: the typed fields a backend host needs, validated the way Grafana reads them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, TypeVar

PLUGIN_TYPES = frozenset({"app", "datasource", "panel", "renderer", "secretsmanager"})

# These types are started under a fixed binary name, so they need no "executable".
FIXED_EXECUTABLE_TYPES = frozenset({"renderer", "secretsmanager"})

_T = TypeVar("_T")


class PluginJSONError(ValueError):
    """plugin.json cannot be used; the message says exactly why."""

    def __init__(self, message: str, *, plugin_id: str | None = None) -> None:
        super().__init__(message)
        self.plugin_id = plugin_id


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginJSON:
    """The parts of plugin.json the host acts on, plus the whole document in ``raw``."""

    id: str
    type: str
    name: str
    version: str | None
    backend: bool
    executable: str | None
    alerting: bool
    streaming: bool
    # Raw JSON objects: compared, but left out of the hash (dicts are unhashable).
    routes: tuple[Mapping[str, Any], ...] = field(hash=False)
    includes: tuple[Mapping[str, Any], ...] = field(hash=False)
    grafana_dependency: str | None
    raw: Mapping[str, Any] = field(hash=False)


def parse_plugin_json(text: str | bytes) -> PluginJSON:
    """Parse and validate a plugin.json document; raise PluginJSONError with a precise reason."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PluginJSONError(
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise PluginJSONError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except RecursionError:
        raise PluginJSONError("invalid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise PluginJSONError(f"top level must be a JSON object, got {_json_type(doc)}")
    try:
        return plugin_json_from_dict(doc)
    except PluginJSONError as exc:
        # Name the plugin in the error when the document at least says who it is.
        plugin_id = doc.get("id")
        if exc.plugin_id is None and isinstance(plugin_id, str) and plugin_id.strip():
            exc.plugin_id = plugin_id
        raise


def plugin_json_from_dict(doc: Mapping[str, Any]) -> PluginJSON:
    plugin_id = _field(doc, "id", str, "")
    if not plugin_id.strip():
        raise PluginJSONError('"id" is required and must be a non-empty string')
    plugin_type = _field(doc, "type", str, "")
    if plugin_type not in PLUGIN_TYPES:
        allowed = "|".join(sorted(PLUGIN_TYPES))
        raise PluginJSONError(f'"type" must be one of {allowed}, got {plugin_type!r}')

    info = _field(doc, "info", dict, {})
    version = _field(info, "version", str, None, where="info.")
    dependencies = _field(doc, "dependencies", dict, {})
    grafana_dependency = _field(dependencies, "grafanaDependency", str, None, where="dependencies.")

    backend = _field(doc, "backend", bool, False)
    executable = _field(doc, "executable", str, None) or None
    if backend and executable is None and plugin_type not in FIXED_EXECUTABLE_TYPES:
        raise PluginJSONError('"backend" is true but "executable" is missing')
    if executable is not None:
        _check_executable_prefix(executable)

    return PluginJSON(
        id=plugin_id,
        type=plugin_type,
        name=_field(doc, "name", str, ""),
        version=version or None,
        backend=backend,
        executable=executable,
        alerting=_field(doc, "alerting", bool, False),
        streaming=_field(doc, "streaming", bool, False),
        routes=_list_of_objects(doc, "routes"),
        includes=_list_of_objects(doc, "includes"),
        grafana_dependency=grafana_dependency,
        raw=doc,
    )


def _check_executable_prefix(executable: str) -> None:
    # Grafana joins this onto the plugin directory unchecked; we refuse anything that could
    # name a binary outside it, since the host would exec whatever that resolves to.
    if "\0" in executable:  # no file name holds one; os.stat would raise ValueError on it
        raise PluginJSONError(f'"executable" must not contain a NUL character, got {executable!r}')
    path = PurePosixPath(executable.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or executable.startswith("~"):
        raise PluginJSONError(
            f'"executable" must be a name inside the plugin directory, got {executable!r}'
        )


def _field(doc: Mapping[str, Any], key: str, kind: type[_T], default: _T, *, where: str = "") -> _T:
    value = doc.get(key)
    # Go's decoder leaves a field at its zero value for JSON null; so do we.
    if value is None:
        return default
    # bool is a subclass of int, and JSON true must not pass as a number (or vice versa).
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise PluginJSONError(f'"{where}{key}" must be {_kind_name(kind)}, got {_json_type(value)}')
    return value


def _list_of_objects(doc: Mapping[str, Any], key: str) -> tuple[Mapping[str, Any], ...]:
    items = _field(doc, key, list, [])
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise PluginJSONError(f'"{key}[{index}]" must be an object, got {_json_type(item)}')
    return tuple(items)


def _kind_name(kind: type) -> str:
    return {str: "a string", bool: "a boolean", dict: "an object", list: "an array"}.get(
        kind, kind.__name__
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
