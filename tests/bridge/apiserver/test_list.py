"""Lists over HTTP: selectors, pages, resource versions, and the tables kubectl prints."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.apiserver.table import available, human_duration, table
from tests.bridge.apiserver.conftest import (
    ADMIN,
    BASE,
    TABLE,
    VIEWER,
    build_app,
    condition,
    sample,
    with_status,
)
from tests.bridge.apiserver.store import ObservedStore

Client = TestClient[web.Request, web.Application]

GROUPS = ("a.grafana.app", "b.grafana.app", "c.grafana.app", "d.grafana.app")


@pytest.fixture
async def filled(client: Client, store: ObservedStore) -> Client:
    for i, group in enumerate(GROUPS):
        obj = sample(group, labels={"team": "even" if i % 2 == 0 else "odd", "index": str(i)})
        await store.create(obj)
    return client


def names(body: dict[str, Any]) -> list[str]:
    return [item["metadata"]["name"].split(".")[1] for item in body["items"]]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ["a", "b", "c", "d"]),
        ("labelSelector=team%3Deven", ["a", "c"]),
        ("labelSelector=team!%3Deven", ["b", "d"]),
        ("labelSelector=index+in+(1,2,9)", ["b", "c"]),
        ("labelSelector=index+notin+(1,2)", ["a", "d"]),
        ("labelSelector=index>1", ["c", "d"]),
        ("labelSelector=missing", []),
        ("labelSelector=!missing", ["a", "b", "c", "d"]),
        ("fieldSelector=metadata.name%3Dv0alpha1.b.grafana.app", ["b"]),
        ("fieldSelector=metadata.name!%3Dv0alpha1.b.grafana.app", ["a", "c", "d"]),
        (
            "labelSelector=team%3Deven&fieldSelector=metadata.name!%3Dv0alpha1.a.grafana.app",
            ["c"],
        ),
    ],
)
async def test_list_selects(filled: Client, query: str, expected: list[str]) -> None:
    response = await filled.get(f"{BASE}?{query}", headers=VIEWER)
    assert response.status == 200
    body = await response.json()
    assert body["kind"] == "DataPlaneServiceList"
    assert body["apiVersion"] == "aggregation.grafana.app/v0alpha1"
    assert body["metadata"]["resourceVersion"] == "4"
    assert names(body) == expected


@pytest.mark.parametrize(
    ("query", "code", "message"),
    [
        ("labelSelector=team+in+a", 400, "unable to parse requirement"),
        ("fieldSelector=spec.group%3Dx", 400, "is not a known field selector"),
        ("limit=x", 400, "invalid limit"),
        ("resourceVersion=x", 400, "invalid resourceVersion"),
        ("resourceVersionMatch=Exact", 400, "forbidden unless resourceVersion is provided"),
        ("resourceVersionMatch=Sometimes&resourceVersion=1", 400, "unsupported value"),
        ("resourceVersion=0&resourceVersionMatch=Exact", 400, "forbidden for resourceVersion 0"),
        ("resourceVersion=3&resourceVersionMatch=Exact", 410, "too old resource version"),
        ("resourceVersion=99", 504, "Too large resource version: 99, current: 4"),
        ("resourceVersion=99&resourceVersionMatch=NotOlderThan", 504, "Too large"),
        ("continue=not-a-token", 400, "invalid continue token"),
        ("continue=x&resourceVersion=1", 400, "not allowed with continue"),
        ("includeObject=Everything", 400, "includeObject must be one of"),
    ],
)
async def test_list_refuses(filled: Client, query: str, code: int, message: str) -> None:
    response = await filled.get(f"{BASE}?{query}", headers=VIEWER)
    assert response.status == code
    body = await response.json()
    assert message in body["message"]


@pytest.mark.parametrize(
    "query",
    [
        "resourceVersion=0",
        "resourceVersion=4&resourceVersionMatch=Exact",
        "resourceVersion=2&resourceVersionMatch=NotOlderThan",
        "resourceVersion=3",
    ],
)
async def test_list_resource_versions_served(filled: Client, query: str) -> None:
    response = await filled.get(f"{BASE}?{query}", headers=VIEWER)
    assert response.status == 200
    assert len((await response.json())["items"]) == 4


async def test_too_large_resource_version_says_when_to_retry(filled: Client) -> None:
    response = await filled.get(f"{BASE}?resourceVersion=99", headers=VIEWER)
    assert response.headers["Retry-After"] == "1"
    body = await response.json()
    assert body["reason"] == "Timeout"
    assert body["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


async def test_pages(filled: Client) -> None:
    seen: list[str] = []
    query = "limit=3"
    remaining = []
    while True:
        body = await (await filled.get(f"{BASE}?{query}", headers=VIEWER)).json()
        seen += names(body)
        remaining.append(body["metadata"].get("remainingItemCount"))
        token = body["metadata"].get("continue")
        if not token:
            break
        query = f"limit=3&continue={token}"
    assert seen == ["a", "b", "c", "d"]
    assert remaining == [1, None]


async def test_page_with_selector_has_no_remaining_count(filled: Client) -> None:
    body = await (await filled.get(f"{BASE}?limit=1&labelSelector=team", headers=VIEWER)).json()
    assert names(body) == ["a"]
    assert body["metadata"]["continue"]
    assert "remainingItemCount" not in body["metadata"]


async def test_continue_after_a_change_is_410(filled: Client, store: ObservedStore) -> None:
    body = await (await filled.get(f"{BASE}?limit=2", headers=VIEWER)).json()
    await store.create(sample("e.grafana.app"))
    response = await filled.get(
        f"{BASE}?limit=2&continue={body['metadata']['continue']}", headers=VIEWER
    )
    assert response.status == 410
    assert (await response.json())["reason"] == "Expired"


async def test_yaml_list(filled: Client) -> None:
    response = await filled.get(BASE, headers={**VIEWER, "Accept": "application/yaml"})
    assert response.content_type == "application/yaml"
    body = yaml.safe_load(await response.text())
    assert names(body) == ["a", "b", "c", "d"]


async def test_pretty(filled: Client) -> None:
    text = await (await filled.get(f"{BASE}?pretty=true", headers=VIEWER)).text()
    assert text.startswith('{\n  "kind": "DataPlaneServiceList"')


# -- tables -------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
async def clocked(store: ObservedStore) -> Any:
    async with TestClient(
        TestServer(build_app(store, clock=lambda: NOW), host="127.0.0.1")
    ) as running:
        yield running


def _aged(group: str, ago: timedelta, *conditions: Any) -> dict[str, Any]:
    obj = sample(group)
    obj["metadata"]["creationTimestamp"] = (NOW - ago).strftime("%Y-%m-%dT%H:%M:%SZ")
    return with_status(obj, *conditions) if conditions else obj


def test_table_rows() -> None:
    rows = table(
        [
            _aged("a.grafana.app", timedelta(seconds=42)),
            _aged("b.grafana.app", timedelta(minutes=5, seconds=7), condition("True", "Passed")),
            _aged(
                "c.grafana.app", timedelta(days=3, hours=2), condition("False", "PluginNotFound")
            ),
            _aged("d.grafana.app", timedelta(hours=30), condition("Unknown")),
            sample("e.grafana.app"),
        ],
        list_metadata={"resourceVersion": "9"},
        include="None",
        version="v1",
        now=NOW,
    )["rows"]
    assert [row["cells"] for row in rows] == [
        ["v0alpha1.a.grafana.app", "Unknown", "42s"],
        ["v0alpha1.b.grafana.app", "True", "5m7s"],
        ["v0alpha1.c.grafana.app", "False (PluginNotFound)", "3d2h"],
        ["v0alpha1.d.grafana.app", "Unknown", "30h"],
        ["v0alpha1.e.grafana.app", "Unknown", "<unknown>"],
    ]


async def test_table_over_http(clocked: Client, store: ObservedStore) -> None:
    created = await store.create(sample("a.grafana.app"))
    await store.update(with_status(created, condition("False", "Starting")), expected_version=None)
    response = await clocked.get(BASE, headers={**VIEWER, "Accept": TABLE})
    assert response.status == 200
    assert response.headers["Content-Type"] == TABLE
    body = await response.json()
    assert body["kind"] == "Table"
    assert body["apiVersion"] == "meta.k8s.io/v1"
    assert body["metadata"]["resourceVersion"] == "2"
    assert [c["name"] for c in body["columnDefinitions"]] == ["Name", "Available", "Age"]
    assert body["columnDefinitions"][0]["format"] == "name"
    (row,) = body["rows"]
    assert row["cells"][:2] == ["v0alpha1.a.grafana.app", "False (Starting)"]
    assert row["object"]["kind"] == "PartialObjectMetadata"
    assert row["object"]["metadata"]["name"] == "v0alpha1.a.grafana.app"


@pytest.mark.parametrize(
    ("include", "object_kind"),
    [("None", None), ("Metadata", "PartialObjectMetadata"), ("Object", "DataPlaneService")],
)
async def test_table_include_object(
    clocked: Client, store: ObservedStore, include: str, object_kind: str | None
) -> None:
    await store.create(sample())
    url = f"{BASE}/v0alpha1.prometheus.grafana.app?includeObject={include}"
    body = await (await clocked.get(url, headers={**VIEWER, "Accept": TABLE})).json()
    (row,) = body["rows"]
    assert row.get("object", {}).get("kind") == object_kind


async def test_table_v1beta1_and_fallback(clocked: Client, store: ObservedStore) -> None:
    await store.create(sample())
    beta = "application/json;as=Table;v=v1beta1;g=meta.k8s.io"
    body = await (await clocked.get(BASE, headers={**VIEWER, "Accept": beta})).json()
    assert body["apiVersion"] == "meta.k8s.io/v1beta1"
    # kubectl's own header: table first, plain JSON as the fallback.
    kubectl = f"{TABLE},{beta},application/json"
    assert (await (await clocked.get(BASE, headers={**VIEWER, "Accept": kubectl})).json())[
        "kind"
    ] == "Table"
    unknown_table = "application/json;as=Table;v=v2;g=meta.k8s.io,application/json"
    plain = await (await clocked.get(BASE, headers={**VIEWER, "Accept": unknown_table})).json()
    assert plain["kind"] == "DataPlaneServiceList"
    refused = await clocked.get(
        BASE, headers={**VIEWER, "Accept": "application/json;as=Table;v=v2;g=meta.k8s.io"}
    )
    assert refused.status == 406


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-1, "0s"),
        (0, "0s"),
        (119, "119s"),
        (120, "2m"),
        (125, "2m5s"),
        (600, "10m"),
        (179 * 60 + 59, "179m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 61, "3h1m"),
        (8 * 3600, "8h"),
        (47 * 3600 + 59 * 60, "47h"),
        (48 * 3600, "2d"),
        (50 * 3600, "2d2h"),
        (8 * 86400, "8d"),
        (729 * 86400, "729d"),
        (730 * 86400, "2y"),
        (731 * 86400, "2y1d"),
        (8 * 365 * 86400, "8y"),
    ],
)
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (None, "Unknown"),
        ({"conditions": []}, "Unknown"),
        ({"conditions": [{"type": "Other", "status": "True"}]}, "Unknown"),
        ({"conditions": [condition("True", "Passed")]}, "True"),
        ({"conditions": [condition("False", "CrashLooping")]}, "False (CrashLooping)"),
        ({"conditions": [condition("False")]}, "False"),
        ({"conditions": [condition("Unknown", "Starting")]}, "Unknown (Starting)"),
    ],
)
def test_available_column(status: Any, text: str) -> None:
    obj: dict[str, Any] = {"metadata": {"name": "x"}}
    if status is not None:
        obj["status"] = status
    assert available(obj) == text


async def test_admin_may_read_too(filled: Client) -> None:
    assert (await filled.get(BASE, headers=ADMIN)).status == 200
