"""Discovery, /version and OpenAPI over HTTP: what kubectl reads before it does anything."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.apiserver import openapi
from bridge.apiserver.discovery import api_group
from tests.bridge.apiserver.conftest import ADMIN, BASE, build_app
from tests.bridge.apiserver.store import ObservedStore

Client = TestClient[web.Request, web.Application]

GROUP = "/apis/aggregation.grafana.app"
VERSION = f"{GROUP}/v0alpha1"


@pytest_asyncio.fixture
async def client(store: ObservedStore) -> AsyncIterator[Client]:
    """A signed-in caller: discovery and OpenAPI are not for anonymous callers."""
    server = TestServer(build_app(store), host="127.0.0.1")
    async with TestClient(server, headers=ADMIN) as running:
        yield running


@pytest_asyncio.fixture
async def anonymous(store: ObservedStore) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app(store), host="127.0.0.1")) as running:
        yield running


@pytest.mark.parametrize(
    "path",
    [
        GROUP,
        VERSION,
        "/openapi/v2",
        "/openapi/v3",
        "/openapi/v3/apis/aggregation.grafana.app/v0alpha1",
    ],
)
async def test_discovery_needs_a_signed_in_caller(anonymous: Client, path: str) -> None:
    response = await anonymous.get(path)
    assert response.status == 401
    assert (await response.json())["kind"] == "Status"


async def test_version_is_public_as_in_kubernetes(anonymous: Client) -> None:
    response = await anonymous.get("/version")
    assert response.status == 200
    assert "gitVersion" in await response.json()


AGGREGATED = (
    "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
    "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
    "application/json"
)


@pytest.mark.parametrize(
    ("path", "accept", "code", "content_type", "kind"),
    [
        pytest.param(GROUP, "", 200, "application/json", "APIGroup", id="group"),
        pytest.param(VERSION, "", 200, "application/json", "APIResourceList", id="version"),
        pytest.param(
            VERSION,
            AGGREGATED,
            200,
            "application/json",
            "APIResourceList",
            id="declines-aggregated",
        ),
        pytest.param("/apis", AGGREGATED, 200, "application/json", "APIGroupList", id="apis"),
        pytest.param(
            VERSION,
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
            406,
            "application/json",
            "Status",
            id="only-aggregated-406",
        ),
        pytest.param(VERSION, "application/yaml", 200, "application/yaml", None, id="yaml"),
        pytest.param(
            VERSION,
            "application/vnd.kubernetes.protobuf",
            406,
            "application/json",
            "Status",
            id="protobuf-406",
        ),
    ],
)
async def test_discovery_documents(
    client: Client, path: str, accept: str, code: int, content_type: str, kind: str | None
) -> None:
    headers = {"Accept": accept} if accept else {}
    response = await client.get(path, headers=headers)
    assert response.status == code
    assert response.content_type == content_type
    if kind is not None:
        assert (await response.json())["kind"] == kind


async def test_resource_list_describes_the_resource(client: Client) -> None:
    body = await (await client.get(VERSION)).json()
    assert body["groupVersion"] == "aggregation.grafana.app/v0alpha1"
    main, status = body["resources"]
    assert main == {
        "name": "dataplaneservices",
        "singularName": "dataplaneservice",
        "namespaced": False,
        "kind": "DataPlaneService",
        "verbs": [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ],
        "categories": ["dataplane"],
        "storageVersionHash": main["storageVersionHash"],
    }
    assert len(main["storageVersionHash"]) == 12
    assert status == {
        "name": "dataplaneservices/status",
        "singularName": "",
        "namespaced": False,
        "kind": "DataPlaneService",
        "verbs": ["get", "patch", "update"],
    }


async def test_group_and_group_list(client: Client) -> None:
    group = await (await client.get(GROUP)).json()
    version = {"groupVersion": "aggregation.grafana.app/v0alpha1", "version": "v0alpha1"}
    assert group == {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": "aggregation.grafana.app",
        "versions": [version],
        "preferredVersion": version,
    }
    assert api_group() == {k: v for k, v in group.items() if k not in ("kind", "apiVersion")}


async def test_version(client: Client) -> None:
    body = await (await client.get("/version")).json()
    assert body["major"] == "1"
    assert body["minor"].isdigit()
    assert body["gitVersion"].startswith(f"v1.{body['minor']}.0+grafana-bridge-")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", GROUP, "GET, HEAD"),
        ("DELETE", VERSION, "GET, HEAD"),
        ("PUT", BASE, "DELETE, GET, HEAD, POST"),
        ("POST", f"{BASE}/x", "DELETE, GET, HEAD, PATCH, PUT"),
        ("DELETE", f"{BASE}/x/status", "GET, HEAD, PATCH, PUT"),
        ("POST", "/openapi/v3", "GET, HEAD"),
    ],
)
async def test_other_methods_are_405(client: Client, method: str, path: str, allow: str) -> None:
    response = await client.request(method, path)
    assert response.status == 405
    assert response.headers["Allow"] == allow
    body = await response.json()
    assert (body["kind"], body["reason"], body["code"]) == ("Status", "MethodNotAllowed", 405)


# -- OpenAPI ------------------------------------------------------------------------------------


async def test_openapi_v3_root_points_at_the_group_document(client: Client) -> None:
    root = await (await client.get("/openapi/v3")).json()
    url = root["paths"]["apis/aggregation.grafana.app/v0alpha1"]["serverRelativeURL"]
    assert url == f"/openapi/v3/apis/aggregation.grafana.app/v0alpha1?hash={openapi.V3_HASH}"
    response = await client.get(url)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "public, immutable"
    document = await response.json()
    assert document["openapi"].startswith("3.")
    unhashed = await client.get("/openapi/v3/apis/aggregation.grafana.app/v0alpha1")
    assert unhashed.headers["Cache-Control"] == "no-cache, private"


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method != "parameters":
                found[(path, method)] = op
    return found


def test_openapi_v3_tells_kubectl_the_server_validates_fields() -> None:
    """kubectl skips client-side validation when PATCH takes ``fieldValidation``."""
    operations = _operations(openapi.v3_document())
    item = f"{BASE}/{{name}}"
    patch = operations[(item, "patch")]
    assert patch["x-kubernetes-group-version-kind"] == {
        "group": "aggregation.grafana.app",
        "version": "v0alpha1",
        "kind": "DataPlaneService",
    }
    assert any(p["name"] == "fieldValidation" and p["in"] == "query" for p in patch["parameters"])
    # Strategic merge patch is not offered, so no client picks it from the document.
    assert set(patch["requestBody"]["content"]) == set(openapi.PATCH_TYPES)
    actions = {key: op["x-kubernetes-action"] for key, op in operations.items()}
    assert actions == {
        (BASE, "get"): "list",
        (BASE, "post"): "post",
        (BASE, "delete"): "deletecollection",
        (item, "get"): "get",
        (item, "put"): "put",
        (item, "patch"): "patch",
        (item, "delete"): "delete",
        (f"{item}/status", "get"): "get",
        (f"{item}/status", "put"): "put",
        (f"{item}/status", "patch"): "patch",
    }


def test_openapi_v3_references_resolve() -> None:
    document = openapi.v3_document()
    schemas = document["components"]["schemas"]
    text = json.dumps(document)
    refs = {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert refs and refs <= set(schemas)


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> dict[int, bytes]:
    """Decode a message of length-delimited fields only (all the v2 document has)."""
    found: dict[int, bytes] = {}
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        assert key & 7 == 2
        length, at = _read_varint(data, at)
        found[key >> 3] = data[at : at + length]
        at += length
    return found


async def test_openapi_v2_protobuf_is_a_valid_empty_document(client: Client) -> None:
    response = await client.get("/openapi/v2", headers={"Accept": openapi.OPENAPI_V2_PROTOBUF})
    assert response.status == 200
    document = _fields(await response.read())
    assert document[1] == b"2.0"
    info = _fields(document[2])
    assert (info[1], info[2]) == (b"Grafana Aggregator", b"0.1")


@pytest.mark.parametrize(
    ("accept", "code"),
    [("application/json", 200), ("", 200), ("text/html", 406)],
)
async def test_openapi_v2_json(client: Client, accept: str, code: int) -> None:
    response = await client.get("/openapi/v2", headers={"Accept": accept} if accept else {})
    assert response.status == code
    if code == 200:
        assert (await response.json())["swagger"] == "2.0"
