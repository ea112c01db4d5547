"""The ``DataPlaneService`` resource: its typed form, parsing and validation."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

GROUP = "aggregation.grafana.app"
VERSION = "v0alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DataPlaneService"
RESOURCE = "dataplaneservices"


class ServiceType(StrEnum):
    QUERY = "query"
    ROUTE = "route"
    STREAM = "stream"
    ADMISSION = "admission"
    CONVERSION = "conversion"
    DATASOURCE_PROXY = "datasource-proxy"


# Spellings upstream used at some point, accepted and normalised.
SERVICE_TYPE_ALIASES = {"datsource-proxy": ServiceType.DATASOURCE_PROXY, "data": ServiceType.QUERY}


class PluginType(StrEnum):
    APP = "app"
    DATASOURCE = "datasource"


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
# Kubernetes version strings; Grafana uses v0alphaN, which Kubernetes' own rule (v1+) forbids.
_VERSION = re.compile(r"^v(0|[1-9][0-9]*)((alpha|beta)[1-9][0-9]*)?$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]+$")
_WILDCARD = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}$")


@dataclass(frozen=True, slots=True)
class Cause:
    """One reason an object is invalid, as Kubernetes reports it in ``Status.details.causes``."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"


class InvalidObject(ValueError):
    """The object fails validation; ``causes`` lists every bad field."""

    def __init__(self, name: str, causes: Sequence[Cause]) -> None:
        self.name = name
        self.causes = tuple(causes)
        summary = "; ".join(f"{c.field}: {c.message}" for c in self.causes)
        super().__init__(f'{KIND} "{name}" is invalid: {summary}')


@dataclass(frozen=True, slots=True)
class Service:
    type: ServiceType
    method: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class DataPlaneService:
    """A registered DataPlaneService: which plugin serves which group/version, and how."""

    name: str
    plugin_id: str
    plugin_type: PluginType
    group: str
    version: str
    services: tuple[Service, ...]
    object: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}"

    def service(self, kind: ServiceType) -> Service | None:
        return next((s for s in self.services if s.type is kind), None)

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> DataPlaneService:
        """Validate a decoded object and build the typed form; raises :class:`InvalidObject`."""
        causes: list[Cause] = []
        metadata = obj.get("metadata")
        name = metadata.get("name") if isinstance(metadata, Mapping) else None
        if obj.get("apiVersion") != API_VERSION:
            causes.append(Cause("apiVersion", f"must be {API_VERSION}", "FieldValueNotSupported"))
        if obj.get("kind") != KIND:
            causes.append(Cause("kind", f"must be {KIND}", "FieldValueNotSupported"))
        if not isinstance(name, str) or not name:
            causes.append(Cause("metadata.name", "Required value", "FieldValueRequired"))
            name = ""
        spec = obj.get("spec")
        if not isinstance(spec, Mapping):
            causes.append(Cause("spec", "Required value", "FieldValueRequired"))
            raise InvalidObject(name, causes)

        plugin_id = _string(spec, "pluginID", causes, required=True)
        plugin_type_raw = _string(spec, "pluginType", causes, required=True)
        plugin_type = PluginType.DATASOURCE
        if plugin_type_raw:
            try:
                plugin_type = PluginType(plugin_type_raw)
            except ValueError:
                causes.append(
                    Cause(
                        "spec.pluginType",
                        f"Unsupported value: {shown(plugin_type_raw)}: "
                        'supported values: "app", "datasource"',
                        "FieldValueNotSupported",
                    )
                )
        group = _string(spec, "group", causes, required=True)
        if group and (not _DNS_SUBDOMAIN.match(group) or len(group) > 253):
            causes.append(
                Cause("spec.group", f"Invalid value: {shown(group)}: must be a DNS subdomain")
            )
        version = _string(spec, "version", causes, required=True)
        if version and not _VERSION.match(version):
            causes.append(
                Cause(
                    "spec.version",
                    f"Invalid value: {shown(version)}: must look like v1, v2beta1 or v0alpha1",
                )
            )
        if name and group and version and name != f"{version}.{group}":
            causes.append(
                Cause(
                    "metadata.name",
                    f"Invalid value: {shown(name)}: "
                    f"must be {shown(f'{version}.{group}')} (<version>.<group>)",
                )
            )
        services = _services(spec.get("services"), causes)
        if causes:
            raise InvalidObject(name, causes)
        return cls(
            name=name,
            plugin_id=plugin_id,
            plugin_type=plugin_type,
            group=group,
            version=version,
            services=services,
            object=obj,
        )


def _string(spec: Mapping[str, Any], key: str, causes: list[Cause], *, required: bool) -> str:
    value = spec.get(key)
    if value is None or value == "":
        if required:
            causes.append(Cause(f"spec.{key}", "Required value", "FieldValueRequired"))
        return ""
    if not isinstance(value, str):
        causes.append(Cause(f"spec.{key}", f"Invalid value: {shown(value)}: must be a string"))
        return ""
    return value


def _services(raw: object, causes: list[Cause]) -> tuple[Service, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        causes.append(Cause("spec.services", "Invalid value: must be a list"))
        return ()
    services: list[Service] = []
    seen: dict[ServiceType, int] = {}
    for i, item in enumerate(raw):
        where = f"spec.services[{i}]"
        if not isinstance(item, Mapping):
            causes.append(Cause(where, "Invalid value: must be an object"))
            continue
        type_raw = item.get("type")
        if type_raw is None or type_raw == "":
            causes.append(Cause(f"{where}.type", "Required value", "FieldValueRequired"))
            continue
        kind = SERVICE_TYPE_ALIASES.get(type_raw) if isinstance(type_raw, str) else None
        if kind is None:
            try:
                kind = ServiceType(type_raw) if isinstance(type_raw, str) else None
            except ValueError:
                kind = None
        if kind is None:
            causes.append(
                Cause(
                    f"{where}.type",
                    f"Unsupported value: {shown(type_raw)}: supported values: "
                    + ", ".join(shown(t.value) for t in ServiceType),
                    "FieldValueNotSupported",
                )
            )
            continue
        if kind in seen:
            causes.append(
                Cause(
                    f"{where}.type",
                    f'Duplicate value: "{kind}" (also spec.services[{seen[kind]}])',
                    "FieldValueDuplicate",
                )
            )
            continue
        seen[kind] = i
        method = item.get("method")
        if method is not None and method != "":
            if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
                causes.append(
                    Cause(
                        f"{where}.method",
                        f"Unsupported value: {shown(method)}: supported values: "
                        + ", ".join(shown(m) for m in sorted(HTTP_METHODS)),
                        "FieldValueNotSupported",
                    )
                )
                method = None
            else:
                method = method.upper()
        else:
            method = None
        path = item.get("path")
        if path is not None and path != "":
            problem = path_pattern_problem(path) if isinstance(path, str) else "must be a string"
            if problem:
                causes.append(Cause(f"{where}.path", f"Invalid value: {shown(path)}: {problem}"))
                path = None
        else:
            path = None
        services.append(Service(type=kind, method=method, path=path))
    return tuple(services)


def shown(value: object) -> str:
    """A value as Kubernetes prints it in a field error: strings in double quotes, JSON-escaped.

    Long values are cut, so a cause never echoes a whole hostile body back.
    """
    if isinstance(value, str):
        text = json.dumps(value if len(value) <= 200 else value[:200] + "…", ensure_ascii=False)
    elif value is None or isinstance(value, (bool, int, float)):
        text = json.dumps(value)
    else:
        text = f"<{type(value).__name__}>"  # a list or object where a scalar belongs
    return text


def path_pattern_problem(pattern: str) -> str | None:
    """Why a route path pattern is malformed, or None if it is fine.

    Patterns are ``/literal/{name}/…``; a final ``{name...}`` matches the rest of the path.
    """
    if not pattern.startswith("/"):
        return "must start with /"
    segments = pattern[1:].split("/")
    names: set[str] = set()
    for i, segment in enumerate(segments):
        if segment == "":
            return "must not contain empty segments (// or a trailing /)"
        if segment in (".", ".."):
            return "must not contain . or .. segments"
        match = _WILDCARD.match(segment)
        if match:
            name = match.group(1)
            if name in names:
                return f"wildcard {{{name}}} is used twice"
            names.add(name)
            if match.group(2) and i != len(segments) - 1:
                return f"{{{name}...}} must be the last segment"
            continue
        if "{" in segment or "}" in segment:
            return f"segment {shown(segment)} mixes text and a wildcard"
        if not _SEGMENT.match(segment):
            return f"segment {shown(segment)} has characters that are not allowed in a URL path"
    return None


# -- conditions -------------------------------------------------------------------------------

CONDITION_AVAILABLE = "Available"


def find_condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    """The ``status.conditions`` entry of type ``kind`` in a decoded object, if any."""
    status = obj.get("status")
    conditions = status.get("conditions") if isinstance(status, Mapping) else None
    if not isinstance(conditions, list):
        return None
    for condition in conditions:
        if isinstance(condition, Mapping) and condition.get("type") == kind:
            return condition
    return None
