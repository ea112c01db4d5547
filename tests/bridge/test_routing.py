"""Routing: one row per behaviour, as kube-aggregator's proxy tests are laid out."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bridge.apis import DataPlaneService, InvalidObject
from bridge.routing import Endpoint, Match, MethodNotAllowed, PathError, RouteTable


def dps(
    name: str, plugin: str, services: list[dict[str, Any]], *, plugin_type: str = "datasource"
) -> DataPlaneService:
    version, group = name.split(".", 1)
    return DataPlaneService.from_object(
        {
            "apiVersion": "aggregation.grafana.app/v0alpha1",
            "kind": "DataPlaneService",
            "metadata": {"name": name},
            "spec": {
                "pluginID": plugin,
                "pluginType": plugin_type,
                "group": group,
                "version": version,
                "services": services,
            },
        }
    )


TABLE = RouteTable.build(
    [
        dps("v0alpha1.prom.grafana.app", "prometheus", [{"type": "query"}, {"type": "route"}]),
        dps(
            "v1.example.grafana.app",
            "example-app",
            [{"type": "route", "method": "GET", "path": "/things/{name}"}],
            plugin_type="app",
        ),
        dps(
            "v1.hooks.grafana.app",
            "hooks-app",
            [{"type": "admission"}, {"type": "conversion"}],
            plugin_type="app",
        ),
    ]
)
P = "/apis/prom.grafana.app/v0alpha1/namespaces/default"

CASES: list[tuple[str, str, Endpoint | None, dict[str, str] | None]] = [
    # (method, path, endpoint or None for the delegate, expected params)
    ("POST", f"{P}/datasources/abc/query", Endpoint.QUERY, {"namespace": "default", "uid": "abc"}),
    ("POST", f"{P}/connections/abc/query", Endpoint.QUERY, {"namespace": "default", "uid": "abc"}),
    ("GET", f"{P}/datasources/abc/health", Endpoint.HEALTH, {"namespace": "default", "uid": "abc"}),
    (
        "GET",
        f"{P}/datasources/abc/resource/api/v1/labels",
        Endpoint.RESOURCE,
        {"namespace": "default", "uid": "abc", "path": "api/v1/labels"},
    ),
    (
        "DELETE",
        f"{P}/datasources/abc/resource",
        Endpoint.RESOURCE,
        {"namespace": "default", "uid": "abc"},
    ),
    (
        "GET",
        f"{P}/datasources/abc/resource/a%20b/",
        Endpoint.RESOURCE,
        {"namespace": "default", "uid": "abc", "path": "a b/"},
    ),
    ("GET", f"{P}/datasources/abc", None, None),  # CRUD of datasources: the delegate's
    ("GET", "/apis/prom.grafana.app/v0alpha1", None, None),
    ("GET", "/apis/prom.grafana.app/v0alpha1/", None, None),
    ("GET", "/apis/prom.grafana.app/v1/namespaces/default/datasources/abc/health", None, None),
    ("GET", "/api/datasources", None, None),
    ("GET", "/apis", None, None),
    (
        "GET",
        "/apis/example.grafana.app/v1/namespaces/org-2/things/x",
        Endpoint.ROUTE,
        {"namespace": "org-2", "name": "x"},
    ),
    (
        "HEAD",
        "/apis/example.grafana.app/v1/namespaces/org-2/things/x",
        Endpoint.ROUTE,
        {"namespace": "org-2", "name": "x"},
    ),
    (
        "POST",
        "/apis/example.grafana.app/v1/namespaces/org-2/things/x",
        None,
        None,
    ),  # other methods: delegate
    ("GET", "/apis/example.grafana.app/v1/namespaces/org-2/things/x/y", None, None),
    (
        "GET",
        "/apis/example.grafana.app/v1/namespaces/org-2/health",
        Endpoint.HEALTH,
        {"namespace": "org-2"},
    ),
    ("POST", "/apis/hooks.grafana.app/v1/admission/validate", Endpoint.VALIDATE, {}),
    ("POST", "/apis/hooks.grafana.app/v1/admission/mutate", Endpoint.MUTATE, {}),
    ("POST", "/apis/hooks.grafana.app/v1/conversion", Endpoint.CONVERSION, {}),
]


@pytest.mark.parametrize(("method", "path", "endpoint", "params"), CASES)
def test_resolve(
    method: str, path: str, endpoint: Endpoint | None, params: dict[str, str] | None
) -> None:
    result = TABLE.resolve(method, path)
    if endpoint is None:
        assert result is None
    else:
        assert isinstance(result, Match)
        assert result.endpoint is endpoint
        assert dict(result.params) == params


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", f"{P}/datasources/abc/query", {"POST"}),
        ("POST", f"{P}/datasources/abc/health", {"GET", "HEAD"}),
        ("GET", "/apis/hooks.grafana.app/v1/admission/validate", {"POST"}),
    ],
)
def test_method_not_allowed(method: str, path: str, allowed: set[str]) -> None:
    result = TABLE.resolve(method, path)
    assert isinstance(result, MethodNotAllowed)
    assert result.allowed == allowed


@pytest.mark.parametrize(
    "path",
    [
        f"{P}/datasources/abc/resource/../../../etc/passwd",
        f"{P}/datasources/abc/resource/%2e%2e/secret",
        f"{P}/datasources/abc/resource/%2E%2E",
        f"{P}/datasources/abc/resource/a%2Fb",
        f"{P}/datasources/abc/resource/a%5Cb",
        f"{P}//datasources/abc/query",
        f"{P}/datasources//abc/query",
        f"{P}/datasources/abc/resource/./x",
        f"{P}/datasources/abc/resource/%00",
        f"{P}/datasources/abc/resource/%ff",
    ],
)
def test_hostile_paths_under_a_mount_are_refused(path: str) -> None:
    with pytest.raises(PathError):
        TABLE.resolve("GET", path)


def test_hostile_paths_elsewhere_go_to_the_delegate_untouched() -> None:
    assert TABLE.resolve("GET", "/apis/other.grafana.app/v1/../../x") is None
    assert TABLE.resolve("GET", "/public/plugins/x/../../etc/passwd") is None


def test_conflicts_are_resolved_by_name_and_reported() -> None:
    a = dps("v1.same.grafana.app", "plugin-a", [{"type": "query"}])
    b_obj = {
        "apiVersion": "aggregation.grafana.app/v0alpha1",
        "kind": "DataPlaneService",
        "metadata": {"name": "v1.same.grafana.app"},
        "spec": {
            "pluginID": "plugin-b",
            "pluginType": "datasource",
            "group": "same.grafana.app",
            "version": "v1",
        },
    }
    b = DataPlaneService.from_object(b_obj)
    table = RouteTable.build([b, a])
    assert len(table) == 1
    # Names are equal here, so the sort is stable on input order: the first given wins.
    assert table.conflicts == {"v1.same.grafana.app": "stored object v1.same.grafana.app"}


def test_lookup_cost_does_not_grow_with_the_table() -> None:
    small = RouteTable.build(
        [dps(f"v1.g{i}.grafana.app", "p", [{"type": "query"}]) for i in range(10)]
    )
    big = RouteTable.build(
        [dps(f"v1.g{i}.grafana.app", "p", [{"type": "query"}]) for i in range(10_000)]
    )
    path = "/apis/g5.grafana.app/v1/namespaces/default/datasources/x/query"

    def cost(table: RouteTable) -> float:
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter()
            for _ in range(2000):
                table.resolve("POST", path)
            best = min(best, time.perf_counter() - began)
        return best

    assert isinstance(big.resolve("POST", path), Match)
    # Generous bound: a linear scan over 10,000 services would be ~1000x slower.
    assert cost(big) < cost(small) * 3


INVALID: list[tuple[dict[str, Any], list[str]]] = [
    (
        {
            "metadata": {"name": "v1.a.b"},
            "spec": {"pluginID": "p", "pluginType": "datasource", "group": "a.b", "version": "v1"},
        },
        [],
    ),
    (
        {
            "metadata": {"name": "x"},
            "spec": {"pluginID": "p", "pluginType": "datasource", "group": "a.b", "version": "v1"},
        },
        ["metadata.name"],
    ),
    (
        {
            "metadata": {"name": "v1.A_B"},
            "spec": {"pluginID": "p", "pluginType": "datasource", "group": "A_B", "version": "v1"},
        },
        ["spec.group"],
    ),
    (
        {
            "metadata": {"name": "1.a.b"},
            "spec": {"pluginID": "p", "pluginType": "datasource", "group": "a.b", "version": "1"},
        },
        ["spec.version"],
    ),
    (
        {
            "metadata": {"name": "v1.a.b"},
            "spec": {"pluginType": "widget", "group": "a.b", "version": "v1"},
        },
        ["spec.pluginID", "spec.pluginType"],
    ),
    (
        {
            "metadata": {"name": "v1.a.b"},
            "spec": {
                "pluginID": "p",
                "pluginType": "app",
                "group": "a.b",
                "version": "v1",
                "services": [{"type": "query"}, {"type": "query"}],
            },
        },
        ["spec.services[1].type"],
    ),
    (
        {
            "metadata": {"name": "v1.a.b"},
            "spec": {
                "pluginID": "p",
                "pluginType": "app",
                "group": "a.b",
                "version": "v1",
                "services": [{"type": "bogus"}],
            },
        },
        ["spec.services[0].type"],
    ),
    (
        {
            "metadata": {"name": "v1.a.b"},
            "spec": {
                "pluginID": "p",
                "pluginType": "app",
                "group": "a.b",
                "version": "v1",
                "services": [{"type": "route", "method": "FETCH", "path": "x/{a"}],
            },
        },
        ["spec.services[0].method", "spec.services[0].path"],
    ),
    (
        {
            "metadata": {"name": "v1.a.b"},
            "spec": {
                "pluginID": "p",
                "pluginType": "app",
                "group": "a.b",
                "version": "v1",
                "services": [{"type": "route", "path": "/a/{x}/{x}"}],
            },
        },
        ["spec.services[0].path"],
    ),
    (
        {
            "metadata": {"name": "v1.a.b"},
            "spec": {
                "pluginID": "p",
                "pluginType": "app",
                "group": "a.b",
                "version": "v1",
                "services": [{"type": "route", "path": "/a/../b"}],
            },
        },
        ["spec.services[0].path"],
    ),
]


@pytest.mark.parametrize(("obj", "bad_fields"), INVALID)
def test_validation_reports_each_bad_field(obj: dict[str, Any], bad_fields: list[str]) -> None:
    full = {"apiVersion": "aggregation.grafana.app/v0alpha1", "kind": "DataPlaneService", **obj}
    if not bad_fields:
        assert DataPlaneService.from_object(full).name == obj["metadata"]["name"]
        return
    with pytest.raises(InvalidObject) as info:
        DataPlaneService.from_object(full)
    assert [c.field for c in info.value.causes] == bad_fields


def test_historical_spelling_is_accepted() -> None:
    service = dps("v1.a.b", "p", [{"type": "datsource-proxy"}])
    assert [s.type.value for s in service.services] == ["datasource-proxy"]
