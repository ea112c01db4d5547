"""The route table: which requests belong to which DataPlaneService endpoint.

A table is immutable and built whole; the server swaps it atomically (one attribute write),
so a request in flight keeps the table it started with. Lookup is one dict access on
``(group, version)`` followed by a match against that object's few routes, so its cost does
not depend on how many services are registered.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import unquote

from bridge.apis import DataPlaneService, PluginType, ServiceType
from bridge.manifests import ManifestService

log = logging.getLogger(__name__)


class Endpoint(StrEnum):
    QUERY = "query"
    RESOURCE = "resource"
    ROUTE = "route"
    HEALTH = "health"
    STREAM = "stream"
    PROXY = "datasource-proxy"
    VALIDATE = "admission-validate"
    MUTATE = "admission-mutate"
    CONVERSION = "conversion"


class PathError(ValueError):
    """A path under a bridge-owned prefix that is not canonical (``..``, ``//``, encoded ``/``)."""


@dataclass(frozen=True, slots=True)
class Route:
    endpoint: Endpoint
    pattern: tuple[str, ...]  # literal segments, "{name}" wildcards, final "{name...}"
    methods: frozenset[str] | None  # None: any method
    # A method outside ``methods`` gets 405 here instead of going to the delegate.
    exclusive: bool = False

    @property
    def specificity(self) -> tuple[int, int]:
        literals = sum(1 for s in self.pattern if not s.startswith("{"))
        rest = 1 if self.pattern and self.pattern[-1].endswith("...}") else 0
        return (-literals, rest)

    def match(self, segments: list[str]) -> dict[str, str] | None:
        pattern = self.pattern
        rest = bool(pattern) and pattern[-1].endswith("...}")
        fixed = pattern[:-1] if rest else pattern
        if len(segments) < len(fixed) or (not rest and len(segments) != len(fixed)):
            return None
        params: dict[str, str] = {}
        for want, got in zip(fixed, segments, strict=False):
            if want.startswith("{"):
                if got == "":
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        if rest:
            params[pattern[-1][1:-4]] = "/".join(segments[len(fixed) :])
        return params


@dataclass(frozen=True, slots=True)
class Match:
    service: DataPlaneService
    endpoint: Endpoint
    params: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    service: DataPlaneService
    allowed: frozenset[str]


@dataclass(frozen=True, slots=True)
class Mount:
    service: DataPlaneService
    routes: tuple[Route, ...]

    @property
    def origin(self) -> str:
        """Where the mounted object comes from: ``manifest <file>`` or ``stored object <name>``."""
        return origin_of(self.service)


def origin_of(service: DataPlaneService) -> str:
    """``manifest <file>`` for a service loaded from a manifest, else ``stored object <name>``."""
    if isinstance(service, ManifestService):
        return service.origin
    return f"stored object {service.name}"


def _precedence(service: DataPlaneService) -> tuple[int, str]:
    # Manifests first (files the operator configured), then stored objects; by name within.
    return (0 if isinstance(service, ManifestService) else 1, service.name)


_QUERY = frozenset({"POST"})
_READ = frozenset({"GET", "HEAD"})


# A table is rebuilt whole on every change; most services in it are unchanged, so their
# routes come from here (DataPlaneService is frozen and hashable). Bounded: large registries
# just recompute the tail.
@functools.lru_cache(maxsize=16384)
def routes_for(service: DataPlaneService) -> tuple[Route, ...]:
    """Every route a DataPlaneService mounts under ``/apis/{group}/{version}``."""
    ns = ("namespaces", "{namespace}")
    ds = (*ns, "datasources", "{uid}")
    is_ds = service.plugin_type is PluginType.DATASOURCE
    routes: list[Route] = []
    for item in service.services:
        if item.type is ServiceType.QUERY:
            for segment in ("datasources", "connections"):
                routes.append(
                    Route(Endpoint.QUERY, (*ns, segment, "{uid}", "query"), _QUERY, exclusive=True)
                )
        elif item.type is ServiceType.ROUTE and item.path:
            methods = frozenset({item.method or "GET"}) | (
                _READ if item.method == "GET" else frozenset()
            )
            routes.append(
                Route(
                    Endpoint.ROUTE,
                    (*ns, *item.path.strip("/").split("/")),
                    methods if item.method else None,
                )
            )
        elif item.type is ServiceType.ROUTE:
            base = ds if is_ds else ns
            routes.append(Route(Endpoint.RESOURCE, (*base, "resource"), None))
            routes.append(Route(Endpoint.RESOURCE, (*base, "resource", "{path...}"), None))
        elif item.type is ServiceType.STREAM:
            routes.append(
                Route(Endpoint.STREAM, (*(ds if is_ds else ns), "stream", "{path...}"), None)
            )
        elif item.type is ServiceType.DATASOURCE_PROXY:
            routes.append(Route(Endpoint.PROXY, (*ds, "proxy", "{path...}"), None))
        elif item.type is ServiceType.ADMISSION:
            routes.append(
                Route(Endpoint.VALIDATE, ("admission", "validate"), _QUERY, exclusive=True)
            )
            routes.append(Route(Endpoint.MUTATE, ("admission", "mutate"), _QUERY, exclusive=True))
        elif item.type is ServiceType.CONVERSION:
            routes.append(Route(Endpoint.CONVERSION, ("conversion",), _QUERY, exclusive=True))
    # Every registered plugin answers health checks, as Grafana's datasource and app APIs do.
    routes.append(Route(Endpoint.HEALTH, (*(ds if is_ds else ns), "health"), _READ, exclusive=True))
    routes.sort(key=lambda r: r.specificity)
    return tuple(routes)


@dataclass(frozen=True)
class RouteTable:
    """An immutable snapshot of every mounted DataPlaneService."""

    mounts: Mapping[tuple[str, str], Mount] = field(default_factory=dict)
    # name of each object that lost a group/version conflict → the origin of the one that
    # holds the mount (:attr:`Mount.origin`, e.g. "manifest /etc/bridge/dps/x.yaml")
    conflicts: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, services: Iterable[DataPlaneService]) -> RouteTable:
        """Mount each service; of two claiming one group/version, a manifest's wins.

        Object names are ``<version>.<group>``, so two stored objects (or two manifests, which
        :func:`~bridge.manifests.load_manifests` refuses) never claim one group/version: the
        only conflict is a manifest and a stored object of the same name, and the manifest,
        a file the operator configured, holds the mount, whatever order ``services`` come in.
        """
        mounts: dict[tuple[str, str], Mount] = {}
        conflicts: dict[str, str] = {}
        for service in sorted(services, key=_precedence):
            key = (service.group, service.version)
            winner = mounts.get(key)
            if winner is not None:
                conflicts[service.name] = winner.origin
                continue
            mounts[key] = Mount(service=service, routes=routes_for(service))
        return cls(mounts=mounts, conflicts=conflicts)

    def __len__(self) -> int:
        return len(self.mounts)

    def services(self) -> list[DataPlaneService]:
        return [m.service for m in self.mounts.values()]

    def groups(self) -> dict[str, list[str]]:
        """Group name → versions served, for discovery."""
        found: dict[str, list[str]] = {}
        for group, version in sorted(self.mounts):
            found.setdefault(group, []).append(version)
        return found

    def resolve(self, method: str, raw_path: str) -> Match | MethodNotAllowed | None:
        """The endpoint for a request, or None when the delegate should have it.

        Raises :class:`PathError` for a non-canonical path under a mounted prefix: such a
        path is refused rather than normalised, so routing and authorisation can never see
        two spellings of one path.
        """
        if not raw_path.startswith("/apis/"):
            return None
        parts = raw_path.split("/", 4)  # "", "apis", group, version, rest
        if len(parts) < 4:
            return None
        mount = self.mounts.get((parts[2], parts[3]))
        if mount is None:
            return None
        if len(parts) == 4 or parts[4] == "":
            return None  # the group/version root itself: discovery lives at the delegate
        segments = _segments(parts[4])
        not_allowed: set[str] = set()
        for route in mount.routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.methods is None or method in route.methods:
                return Match(service=mount.service, endpoint=route.endpoint, params=params)
            if route.exclusive:
                not_allowed |= route.methods
        if not_allowed:
            return MethodNotAllowed(service=mount.service, allowed=frozenset(not_allowed))
        return None


_RAW_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
_DECODED_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\/]")


def _segments(raw: str) -> list[str]:
    segments = raw.split("/")
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if not segment:
            if i != last:
                raise PathError("the path contains an empty segment (//)")
            continue
        value = segment
        if "%" in segment:
            try:
                value = unquote(segment, errors="strict")
            except UnicodeDecodeError:
                raise PathError("the path is not valid UTF-8 once decoded") from None
            if _DECODED_FORBIDDEN.search(value):
                raise PathError("the path contains an encoded /, \\ or control character")
            segments[i] = value
        elif _RAW_FORBIDDEN.search(segment):
            raise PathError("the path contains a \\ or control character")
        if value in (".", ".."):
            raise PathError("the path contains a . or .. segment")
    return segments
