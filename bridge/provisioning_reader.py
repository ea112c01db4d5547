"""Reading one Grafana provisioning file into checked entries, with file:line:key errors.

The YAML is walked as nodes (not loaded into dicts) so every error can name its line, and so
scalars keep the text Grafana's YAML library would see: ``basicAuth: yes`` is an error in
Grafana (Go's ``strconv.ParseBool``) and is one here too; ``password: 0123`` stays ``0123``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bridge.provisioning_values import Expander, ExpansionError

_NULL = "tag:yaml.org,2002:null"
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_INT = re.compile(r"[+-]?[0-9]+")
# Grafana's rule for new uids; they also appear in URL paths here, so nothing else is allowed.
_UID = re.compile(r"[A-Za-z0-9_-]{1,40}")

# Keys Grafana reads that the bridge has no use for; anything else gets a warning.
_DATASOURCE_KEYS = frozenset(
    {
        "name",
        "type",
        "uid",
        "orgId",
        "orgName",
        "url",
        "user",
        "database",
        "basicAuth",
        "basicAuthUser",
        "isDefault",
        "jsonData",
        "secureJsonData",
        "access",
        "withCredentials",
        "editable",
        "version",
        "correlations",
        "description",
        "apiVersion",
    }
)
_MOVED_TO_SECURE = {"password": "password", "basicAuthPassword": "basicAuthPassword"}
_APP_KEYS = frozenset(
    {"type", "org_id", "orgId", "org_name", "orgName", "disabled", "jsonData", "secureJsonData"}
)


class ProvisioningError(Exception):
    """A provisioning file cannot be used: which file, which line, which key, and why."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        where = str(self.path) if self.path is not None else "provisioning"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class Deletion:
    org_id: int
    name: str


@dataclass(frozen=True, slots=True)
class DataSourceEntry:
    path: Path
    line: int
    org_id: int
    name: str
    type: str
    uid: str
    url: str
    user: str
    database: str
    basic_auth: bool
    basic_auth_user: str
    is_default: bool
    json_data: dict[str, Any]
    secure_json_data: dict[str, str] = field(repr=False)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def content(self) -> dict[str, Any]:
        """Everything a plugin sees of this datasource (for change detection)."""
        return {
            "name": self.name,
            "type": self.type,
            "url": self.url,
            "user": self.user,
            "database": self.database,
            "basicAuth": self.basic_auth,
            "basicAuthUser": self.basic_auth_user,
            "jsonData": self.json_data,
            "secureJsonData": _secret_digests(self.secure_json_data),
        }


@dataclass(frozen=True, slots=True)
class AppEntry:
    path: Path
    line: int
    org_id: int
    plugin_id: str
    enabled: bool
    json_data: dict[str, Any]
    secure_json_data: dict[str, str] = field(repr=False)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def content(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "jsonData": self.json_data,
            "secureJsonData": _secret_digests(self.secure_json_data),
        }


def _secret_digests(secrets: Mapping[str, str]) -> dict[str, str]:
    # Change detection needs to see a rotated secret, not to hold a second copy of it.
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in secrets.items()}


E = TypeVar("E", DataSourceEntry, AppEntry)


@dataclass(frozen=True, slots=True)
class SourceFile(Generic[E]):
    """What one file provisions, plus what it read and when it last changed."""

    path: Path
    entries: tuple[E, ...]
    deletions: tuple[Deletion, ...]
    dependencies: tuple[Path, ...]
    modified_ms: int
    warnings: tuple[str, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader, except that timestamps stay strings (JSON has no dates; Go keeps them)."""


def _timestamp_as_text(loader: yaml.SafeLoader, node: Node) -> str:
    assert isinstance(node, ScalarNode)
    return str(loader.construct_scalar(node))


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


def read_datasources_file(path: Path, *, env: Mapping[str, str]) -> SourceFile[DataSourceEntry]:
    """Read a ``provisioning/datasources`` file (``apiVersion: 1``)."""
    with _File(path, env) as f:
        if f.root is None:
            return f.result((), ())  # empty or only comments: provisions nothing, as in Grafana
        top = f.fields(f.root, "")
        version = top.get("apiVersion")
        if version is None or f.version(version) < 1:
            raise ProvisioningError(
                "apiVersion is missing or 0: Grafana reads such a file in its deprecated "
                "version 0 format (snake_case keys), which the bridge does not support; add "
                "'apiVersion: 1' and use camelCase keys",
                path=path,
                line=_line(version) if version is not None else 1,
                key="apiVersion",
            )
        for key, node in top.items():
            if key not in ("apiVersion", "datasources", "deleteDatasources", "prune"):
                f.warn(node, key, "unknown key, ignored")
        deletions = tuple(
            f.deletion(node, f"deleteDatasources[{i}]")
            for i, node in enumerate(f.items(top.get("deleteDatasources"), "deleteDatasources"))
        )
        entries = tuple(
            f.datasource(node, f"datasources[{i}]")
            for i, node in enumerate(f.items(top.get("datasources"), "datasources"))
        )
        return f.result(entries, deletions)


def read_apps_file(path: Path, *, env: Mapping[str, str]) -> SourceFile[AppEntry]:
    """Read a ``provisioning/plugins`` file (Grafana ignores its ``apiVersion``)."""
    with _File(path, env) as f:
        top = f.fields(f.root, "") if f.root is not None else {}
        for key, node in top.items():
            if key not in ("apiVersion", "apps"):
                f.warn(node, key, "unknown key, ignored")
        entries = tuple(
            f.app(node, f"apps[{i}]") for i, node in enumerate(f.items(top.get("apps"), "apps"))
        )
        return f.result(entries, ())


class _File:
    """One file being read: its YAML nodes, its expander and its warnings."""

    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        self.path = path
        self.expander = Expander(env=env)
        self.notes: list[str] = []
        try:
            text = path.read_text(encoding="utf-8")
            self.mtime_ns = path.stat().st_mtime_ns
        except OSError as exc:
            raise ProvisioningError(f"cannot read the file: {exc.strerror}", path=path) from None
        except UnicodeDecodeError:
            raise ProvisioningError("the file is not UTF-8 text", path=path) from None
        self.loader = _Loader(text)
        try:
            self.root: Node | None = self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise ProvisioningError(
                f"not valid YAML: {exc.problem or exc.context}",
                path=path,
                line=mark.line + 1 if mark is not None else None,
            ) from None
        except yaml.YAMLError as exc:
            raise ProvisioningError(f"not valid YAML: {exc}", path=path) from None
        if self.root is not None and _is_null(self.root):
            self.root = None

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.loader.dispose()

    def result(self, entries: tuple[E, ...], deletions: tuple[Deletion, ...]) -> SourceFile[E]:
        stamps = [self.mtime_ns]
        for dependency in self.expander.files:
            try:
                stamps.append(dependency.stat().st_mtime_ns)
            except OSError:
                continue
        notes = list(self.notes)
        notes.extend(
            f"{self.path}: ${name} is not set; it expands to an empty string"
            for name in sorted(self.expander.unset)
        )
        return SourceFile(
            path=self.path,
            entries=entries,
            deletions=deletions,
            dependencies=tuple(sorted(self.expander.files)),
            modified_ms=max(stamps) // 1_000_000,
            warnings=tuple(notes),
        )

    # --- entries ---

    def datasource(self, node: Node, key: str) -> DataSourceEntry:
        fields = self.fields(node, key)
        for name, value in fields.items():
            if name in _MOVED_TO_SECURE:
                self.warn(value, f"{key}.{name}", "ignored; Grafana reads it from secureJsonData")
            elif name not in _DATASOURCE_KEYS:
                self.warn(value, f"{key}.{name}", "unknown key, ignored")
        name = self.required(fields, node, key, "name")
        org_id = self.org_id(fields, node, key, id_key="orgId", name_key="orgName")
        uid = self.string(fields.get("uid"), f"{key}.uid")
        if not uid:
            uid = safe_uid_from_name(name)
        elif not _UID.fullmatch(uid):
            raise self.error(
                fields["uid"],
                f"{key}.uid",
                f"{uid!r} is not a valid uid: at most 40 letters, digits, '-' or '_'",
            )
        return DataSourceEntry(
            path=self.path,
            line=_line(node),
            org_id=org_id,
            name=name,
            type=self.required(fields, node, key, "type"),
            uid=uid,
            url=self.string(fields.get("url"), f"{key}.url"),
            user=self.string(fields.get("user"), f"{key}.user"),
            database=self.string(fields.get("database"), f"{key}.database"),
            basic_auth=self.boolean(fields.get("basicAuth"), f"{key}.basicAuth"),
            basic_auth_user=self.string(fields.get("basicAuthUser"), f"{key}.basicAuthUser"),
            is_default=self.boolean(fields.get("isDefault"), f"{key}.isDefault"),
            json_data=self.json_object(fields.get("jsonData"), f"{key}.jsonData"),
            secure_json_data=self.string_map(fields.get("secureJsonData"), f"{key}.secureJsonData"),
        )

    def deletion(self, node: Node, key: str) -> Deletion:
        fields = self.fields(node, key)
        for name, value in fields.items():
            if name not in ("name", "orgId", "orgName"):
                self.warn(value, f"{key}.{name}", "unknown key, ignored")
        name = self.required(fields, node, key, "name")
        return Deletion(
            org_id=self.org_id(fields, node, key, id_key="orgId", name_key="orgName"), name=name
        )

    def app(self, node: Node, key: str) -> AppEntry:
        fields = self.fields(node, key)
        for name, value in fields.items():
            if name not in _APP_KEYS:
                self.warn(value, f"{key}.{name}", "unknown key, ignored")
        plugin_id = self.required(fields, node, key, "type")
        # Grafana reads org_id for apps; orgId (the datasource spelling) is accepted too.
        org_id = self.org_id(fields, node, key, id_key="org_id", name_key="org_name")
        if "orgId" in fields:
            other = self.org_id(fields, node, key, id_key="orgId", name_key="orgName")
            if "org_id" in fields and other != org_id:
                raise self.error(
                    fields["orgId"], f"{key}.orgId", f"disagrees with org_id ({org_id})"
                )
            org_id = other
        return AppEntry(
            path=self.path,
            line=_line(node),
            org_id=org_id,
            plugin_id=plugin_id,
            enabled=not self.boolean(fields.get("disabled"), f"{key}.disabled"),
            json_data=self.json_object(fields.get("jsonData"), f"{key}.jsonData"),
            secure_json_data=self.string_map(fields.get("secureJsonData"), f"{key}.secureJsonData"),
        )

    def org_id(
        self, fields: Mapping[str, Node], node: Node, key: str, *, id_key: str, name_key: str
    ) -> int:
        value = self.integer(fields.get(id_key), f"{key}.{id_key}")
        if value is None or value == 0:
            if name_key in fields and not _is_null(fields[name_key]):
                raise self.error(
                    fields[name_key],
                    f"{key}.{name_key}",
                    f"org names cannot be resolved without Grafana's database; use {id_key}",
                )
            return 1  # Grafana's default org
        if value < 0:
            raise self.error(fields[id_key], f"{key}.{id_key}", f"must be positive, got {value}")
        return value

    # --- values ---

    def fields(self, node: Node, key: str) -> dict[str, Node]:
        if not isinstance(node, MappingNode):
            raise self.error(node, key or "(top level)", "expected a mapping")
        self.loader.flatten_mapping(node)  # resolves YAML merge keys ("<<: *anchor")
        found: dict[str, Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise self.error(key_node, key or "(top level)", "keys must be plain strings")
            name = key_node.value
            if name in found:
                raise self.error(key_node, _join(key, name), "the key appears twice")
            found[name] = value_node
        return found

    def items(self, node: Node | None, key: str) -> list[Node]:
        if node is None or _is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            raise self.error(node, key, "expected a list")
        return list(node.value)

    def required(self, fields: Mapping[str, Node], node: Node, key: str, name: str) -> str:
        value = self.string(fields.get(name), f"{key}.{name}")
        if not value:
            raise self.error(fields.get(name, node), f"{key}.{name}", "is required")
        return value

    def string(self, node: Node | None, key: str) -> str:
        text = self.scalar(node, key)
        return "" if text is None else self.expand(node, key, text)

    def boolean(self, node: Node | None, key: str) -> bool:
        text = self.scalar(node, key)
        if text is None:
            return False
        value = self.expand(node, key, text)
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise self.error(node, key, f"expected true or false, got {value!r}")

    def integer(self, node: Node | None, key: str) -> int | None:
        text = self.scalar(node, key)
        if text is None:
            return None
        value = self.expand(node, key, text)
        if value == "":
            return None  # as Grafana: an empty value leaves the default
        if not _INT.fullmatch(value):
            raise self.error(node, key, f"expected an integer, got {value!r}")
        return int(value)

    def version(self, node: Node) -> int:
        text = self.scalar(node, "apiVersion")
        if text is None or not _INT.fullmatch(text):
            raise self.error(node, "apiVersion", f"expected an integer, got {text!r}")
        return int(text)

    def scalar(self, node: Node | None, key: str) -> str | None:
        if node is None or _is_null(node):
            return None
        if not isinstance(node, ScalarNode):
            raise self.error(node, key, "expected a single value, not a list or mapping")
        return str(node.value)

    def json_object(self, node: Node | None, key: str) -> dict[str, Any]:
        if node is None or _is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            raise self.error(node, key, "expected a mapping")
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self.error(node, key, f"cannot be read: {exc}") from None
        expanded = self.expand_tree(node, key, value)
        try:
            json.dumps(expanded, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise self.error(node, key, f"cannot be represented as JSON: {exc}") from None
        assert isinstance(expanded, dict)
        return expanded

    def expand_tree(self, node: Node, key: str, value: Any) -> Any:
        if isinstance(value, str):
            return self.expand(node, key, value)
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for name, item in value.items():
                if not isinstance(name, str):
                    raise self.error(node, key, f"keys must be strings, got {name!r}")
                out[name] = self.expand_tree(node, _join(key, name), item)
            return out
        if isinstance(value, list):
            return [self.expand_tree(node, f"{key}[{i}]", item) for i, item in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(node, key, f"{value} cannot be represented as JSON")
        return value

    def string_map(self, node: Node | None, key: str) -> dict[str, str]:
        if node is None or _is_null(node):
            return {}
        result: dict[str, str] = {}
        for name, value in self.fields(node, key).items():
            # A null secret is an empty string, as Go decodes it into map[string]string.
            result[name] = self.string(value, _join(key, name))
        return result

    def expand(self, node: Node | None, key: str, text: str) -> str:
        try:
            return self.expander.expand(text)
        except ExpansionError as exc:
            raise self.error(node, key, str(exc)) from None

    def warn(self, node: Node, key: str, message: str) -> None:
        self.notes.append(f"{self.path}:{_line(node)}: {key}: {message}")

    def error(self, node: Node | None, key: str, message: str) -> ProvisioningError:
        return ProvisioningError(
            message, path=self.path, line=_line(node) if node is not None else None, key=key
        )


def safe_uid_from_name(name: str) -> str:
    """The uid Grafana gives a provisioned datasource that names none: from its name."""
    return "P" + hashlib.sha256(name.encode()).hexdigest()[:16].upper()


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
