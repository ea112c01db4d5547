"""Who may call what: every endpoint the bridge serves x every kind of caller → the status.

One bridge (token authentication, real plugin processes, a stand-in Grafana as delegate and
as the datasource-proxy upstream) and one table, :data:`MATRIX`, rendered in
docs/security.md ("Authorization matrix"). Callers:

* ``anonymous``: no credentials (anonymous access is off, as Grafana's default);
* ``viewer``/``editor``/``admin``: that role in org 1 (namespace ``default``);
* ``server-admin``: a Grafana server admin who is only a Viewer in org 1;
* ``other-org``: an Editor of org 2, calling into org 1's namespace;
* ``other-org-admin``: an Admin of org 2 (a tenant: may not write cluster-wide objects).

Plus: namespace/org mismatch both ways, and per-route ``reqRole`` on proxy routes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bridge.apis import API_VERSION, KIND
from tests.bridge.conftest import (
    PY,
    PY_GROUP,
    VERSION,
    FrontDoor,
    StandInGrafana,
    auth_headers,
    bridge_config,
    dataplane_service,
    datasource,
    front_door,
    python_fixture_as,
    stand_in_grafana,
    write_datasources,
    write_manifest,
)
from tests.conftest import FIXTURE_PLUGINS

ASYNC = pytest.mark.asyncio(loop_scope="module")

CALLERS = (
    "anonymous",
    "viewer",
    "editor",
    "admin",
    "server-admin",
    "other-org",
    "other-org-admin",
)
# The token user behind each caller (None: no Authorization header).
TOKEN_USER: Mapping[str, str | None] = {
    "anonymous": None,
    "viewer": "viewer",
    "editor": "editor",
    "admin": "admin",
    "server-admin": "serveradmin",
    "other-org": "other",
    "other-org-admin": "otheradmin",
}
GRANTS: Mapping[str, Mapping[str, Any]] = {
    "admin": {"org_id": 1, "role": "Admin"},
    "editor": {"org_id": 1, "role": "Editor"},
    "viewer": {"org_id": 1, "role": "Viewer"},
    "serveradmin": {"org_id": 1, "role": "Viewer", "server_admin": True},
    "other": {"org_id": 2, "role": "Editor"},
    "otheradmin": {"org_id": 2, "role": "Admin"},
}

APP = "bridge-pymatrix-app"
APP_GROUP = "matrix.app.grafana.app"
DS = f"/apis/{PY_GROUP}/{VERSION}/namespaces/default/datasources/py"
DPS_VERSION = "/apis/aggregation.grafana.app/v0alpha1"
DPS = f"{DPS_VERSION}/dataplaneservices"
ALL_SERVICES = (
    {"type": "query"},
    {"type": "route"},
    {"type": "stream"},
    {"type": "datasource-proxy"},
    {"type": "admission"},
    {"type": "conversion"},
)


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    sse: bool = False  # a long-lived answer (SSE, watch): only the status line and headers are read
    websocket: bool = False  # sent as a WebSocket handshake; 101 when it is upgraded


def admission_review(namespace: str) -> dict[str, Any]:
    thing = {"apiVersion": "things.example.com/v1", "kind": "Thing"}
    obj = {**thing, "metadata": {"name": "a", "namespace": namespace}, "spec": {}}
    gvr = {"group": "things.example.com", "version": "v1", "resource": "things"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "things.example.com", "version": "v1", "kind": "Thing"},
            "resource": gvr,
            "requestKind": {"group": "things.example.com", "version": "v1", "kind": "Thing"},
            "requestResource": gvr,
            "name": "a",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "kubernetes-admin"},
            "object": obj,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


CONVERSION_REVIEW = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "ConversionReview",
    "request": {
        "uid": "c0",
        "desiredAPIVersion": "things.example.com/v2",
        "objects": [
            {"apiVersion": "things.example.com/v1", "kind": "Thing", "metadata": {"name": "a"}}
        ],
    },
}

NEW_NAME = "v0alpha1.matrix-new.datasource.grafana.app"
NEW_SERVICE = {
    "apiVersion": API_VERSION,
    "kind": KIND,
    "metadata": {"name": NEW_NAME},
    "spec": {
        "pluginID": PY,
        "pluginType": "datasource",
        "group": "matrix-new.datasource.grafana.app",
        "version": "v0alpha1",
        "services": [{"type": "query"}],
    },
}
# Created when the matrix's bridge starts, so that reading an existing object has a row.
EXISTING_NAME = "v0alpha1.matrix-existing.datasource.grafana.app"
EXISTING_SERVICE = {
    "apiVersion": API_VERSION,
    "kind": KIND,
    "metadata": {"name": EXISTING_NAME},
    "spec": {
        "pluginID": PY,
        "pluginType": "datasource",
        "group": "matrix-existing.datasource.grafana.app",
        "version": "v0alpha1",
        "services": [{"type": "query"}],
    },
}
# An update names the version it replaces (Kubernetes refuses one without: 422).
UPDATED_SERVICE = {**NEW_SERVICE, "metadata": {"name": NEW_NAME, "resourceVersion": "1"}}
QUERY = {
    "from": "now-1h",
    "to": "now",
    "queries": [{"refId": "A", "datasource": {"type": PY, "uid": "py"}}],
}

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("query", "POST", f"{DS}/query", body=QUERY),
    Endpoint("resource", "GET", f"{DS}/resource/echo"),
    Endpoint("resource (write method)", "POST", f"{DS}/resource/echo", body={"a": 1}),
    Endpoint(
        "route (app, custom path)", "GET", f"/apis/{APP_GROUP}/{VERSION}/namespaces/default/echo"
    ),
    Endpoint("health", "GET", f"{DS}/health"),
    Endpoint(
        "stream (SSE)",
        "GET",
        f"{DS}/stream/ticks/matrix",
        headers={"Accept": "text/event-stream"},
        sse=True,
    ),
    Endpoint("stream (WebSocket)", "GET", f"{DS}/stream/ticks/matrix-ws", websocket=True),
    Endpoint("stream publish", "POST", f"{DS}/stream/ticks/matrix", body={"published": 1}),
    Endpoint("datasource-proxy, reqRole Viewer", "GET", f"{DS}/proxy/api/x"),
    Endpoint("datasource-proxy, reqRole Admin", "GET", f"{DS}/proxy/admin/x"),
    Endpoint(
        "admission validate",
        "POST",
        f"/apis/{PY_GROUP}/{VERSION}/admission/validate",
        body=admission_review("default"),
    ),
    Endpoint(
        "admission mutate",
        "POST",
        f"/apis/{PY_GROUP}/{VERSION}/admission/mutate",
        body=admission_review("default"),
    ),
    Endpoint(
        "conversion", "POST", f"/apis/{PY_GROUP}/{VERSION}/conversion", body=CONVERSION_REVIEW
    ),
    Endpoint("DataPlaneService list", "GET", DPS),
    Endpoint("DataPlaneService get", "GET", f"{DPS}/v0alpha1.nothing.example"),
    Endpoint("DataPlaneService get (existing)", "GET", f"{DPS}/{EXISTING_NAME}"),
    Endpoint("DataPlaneService create (dry run)", "POST", f"{DPS}?dryRun=All", body=NEW_SERVICE),
    Endpoint("DataPlaneService delete", "DELETE", f"{DPS}/v0alpha1.nothing.example"),
    Endpoint("DataPlaneService watch", "GET", f"{DPS}?watch=true", sse=True),
    Endpoint(
        "DataPlaneService update (dry run)",
        "PUT",
        f"{DPS}/{NEW_NAME}?dryRun=All",
        body=UPDATED_SERVICE,
    ),
    Endpoint(
        "DataPlaneService patch (dry run)",
        "PATCH",
        f"{DPS}/{NEW_NAME}?dryRun=All",
        body={"metadata": {"labels": {"x": "y"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    ),
    Endpoint(
        "DataPlaneService status update (dry run)",
        "PUT",
        f"{DPS}/{NEW_NAME}/status?dryRun=All",
        body=UPDATED_SERVICE,
    ),
    Endpoint(
        "DataPlaneService delete collection (dry run, selects none)",
        "DELETE",
        f"{DPS}?dryRun=All&labelSelector=matrix%3Dnone",
    ),
    Endpoint("API discovery (/apis/aggregation.grafana.app/v0alpha1)", "GET", DPS_VERSION),
    Endpoint("/apis", "GET", "/apis"),
    Endpoint("/version", "GET", "/version"),
    Endpoint("/openapi/v2", "GET", "/openapi/v2"),
    Endpoint("/livez", "GET", "/livez"),
    Endpoint("/metrics", "GET", "/metrics"),
    Endpoint("/metrics/plugins/{id}", "GET", f"/metrics/plugins/{PY}"),
    Endpoint("/readyz", "GET", "/readyz"),
    Endpoint("/healthz", "GET", "/healthz"),
    Endpoint("delegated (Grafana decides)", "GET", "/api/dashboards/uid/abc"),
)

# endpoint → status per caller, in CALLERS order:
#          anonymous viewer editor admin server-admin other-org other-org-admin
MATRIX: Mapping[str, tuple[int, ...]] = {
    "query": (401, 200, 200, 200, 200, 403, 403),
    "resource": (401, 200, 200, 200, 200, 403, 403),
    # As in Grafana, a resource call needs only a role in the org, whatever the method: what a
    # write means is the plugin's business.
    "resource (write method)": (401, 200, 200, 200, 200, 403, 403),
    "route (app, custom path)": (401, 200, 200, 200, 200, 403, 403),
    "health": (401, 200, 200, 200, 200, 403, 403),
    "stream (SSE)": (401, 200, 200, 200, 200, 403, 403),
    # Refused before the upgrade, with a Status; a permitted caller is upgraded (101).
    "stream (WebSocket)": (401, 101, 101, 101, 101, 403, 403),
    "stream publish": (401, 200, 200, 200, 200, 403, 403),
    "datasource-proxy, reqRole Viewer": (401, 200, 200, 200, 200, 403, 403),
    "datasource-proxy, reqRole Admin": (401, 403, 403, 200, 200, 403, 403),
    "admission validate": (401, 200, 200, 200, 200, 403, 403),
    "admission mutate": (401, 200, 200, 200, 200, 403, 403),
    # No namespace in a ConversionReview: it runs in the caller's own org.
    "conversion": (401, 200, 200, 200, 200, 200, 200),
    # DataPlaneServices are cluster-scoped: every signed-in caller may read them.
    "DataPlaneService list": (401, 200, 200, 200, 200, 200, 200),
    "DataPlaneService get": (401, 404, 404, 404, 404, 404, 404),
    "DataPlaneService get (existing)": (401, 200, 200, 200, 200, 200, 200),
    "DataPlaneService create (dry run)": (401, 403, 403, 201, 201, 403, 403),
    "DataPlaneService delete": (401, 403, 403, 404, 404, 403, 403),
    # The bridge's own operational endpoints are unauthenticated, as Grafana's /metrics is.
    "/metrics": (200, 200, 200, 200, 200, 200, 200),
    "/metrics/plugins/{id}": (200, 200, 200, 200, 200, 200, 200),
    "/readyz": (200, 200, 200, 200, 200, 200, 200),
    "/healthz": (200, 200, 200, 200, 200, 200, 200),
    # Passed on with the caller's credentials; the stand-in Grafana answers 200 to all.
    "delegated (Grafana decides)": (200, 200, 200, 200, 200, 200, 200),
    "DataPlaneService watch": (401, 200, 200, 200, 200, 200, 200),
    # Writes to a cluster-wide object: a server admin or an Admin of org 1 (may_write); the
    # object does not exist, so a permitted caller learns 404, everyone else 403 first.
    "DataPlaneService update (dry run)": (401, 403, 403, 404, 404, 403, 403),
    "DataPlaneService patch (dry run)": (401, 403, 403, 404, 404, 403, 403),
    "DataPlaneService status update (dry run)": (401, 403, 403, 404, 404, 403, 403),
    "DataPlaneService delete collection (dry run, selects none)": (
        401,
        403,
        403,
        200,
        200,
        403,
        403,
    ),
    # Discovery and OpenAPI need any signed-in caller (Kubernetes' system:discovery is bound
    # to system:authenticated); /version is public (system:public-info-viewer).
    "API discovery (/apis/aggregation.grafana.app/v0alpha1)": (401, 200, 200, 200, 200, 200, 200),
    "/apis": (401, 200, 200, 200, 200, 200, 200),
    "/version": (200, 200, 200, 200, 200, 200, 200),
    "/openapi/v2": (401, 200, 200, 200, 200, 200, 200),
    "/livez": (200, 200, 200, 200, 200, 200, 200),
}


@dataclass
class Matrix:
    door: FrontDoor
    grafana: StandInGrafana


# What a datasource's provisioning may hold that must never become a request header
# (CVE-2022-35957; tests/bridge/test_pitfalls.py).
IDENTITY_HEADER = {"jsonData": {"httpHeaderName1": "X-WEBAUTH-USER"}}
IDENTITY_SECRET = {"httpHeaderValue1": "admin"}


@asynccontextmanager
async def matrix_scene(root: Path) -> AsyncIterator[Matrix]:
    """The bridge of this module (tests/bridge/test_pitfalls.py runs against one too)."""
    plugins = root / "plugins"
    python_fixture_as(plugins, APP)
    async with stand_in_grafana() as (grafana, url):
        # Proxy routes render to {{.JsonData.url}}/<route>: under /routed, so a request that
        # used a route is told apart from one that went to the datasource's own URL.
        json_data = {"url": f"{url}/routed", **IDENTITY_HEADER["jsonData"]}
        write_datasources(
            root / "provisioning",
            {
                **datasource(PY, "py", json_data=json_data),
                "url": url,
                "secureJsonData": IDENTITY_SECRET,
            },
            {**datasource(PY, "py2", org_id=2, json_data={"url": f"{url}/routed"}), "url": url},
        )
        write_manifest(
            root / "dataplane",
            "services.yaml",
            dataplane_service(PY, PY_GROUP, services=ALL_SERVICES),
            dataplane_service(
                APP,
                APP_GROUP,
                plugin_type="app",
                services=({"type": "route", "path": "/echo", "method": "GET"},),
            ),
        )
        config = bridge_config(
            root,
            plugin_dirs=(FIXTURE_PLUGINS, plugins),
            allow_unsigned=(PY, APP),
            delegate=url,
            overrides={"auth.users": {k: dict(v) for k, v in GRANTS.items()}},
        )
        # The token file lists the conftest users; these add the server admin and org-2 admin.
        tokens = root / "tokens.csv"
        tokens.write_text("".join(f"token-of-{name},{name},uid-{name}\n" for name in GRANTS))
        async with front_door(config) as door:
            yield Matrix(door, grafana)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def matrix(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Matrix]:
    async with matrix_scene(tmp_path_factory.mktemp("authorization-matrix")) as running:
        created = await running.door.call("POST", DPS, user="admin", body=EXISTING_SERVICE)
        assert created.status == 201, created.text
        yield running


WEBSOCKET_HANDSHAKE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def status_of(door: FrontDoor, endpoint: Endpoint, user: str | None) -> tuple[int, Any]:
    headers = {**auth_headers(user), **endpoint.headers}
    if endpoint.websocket:
        headers.update(WEBSOCKET_HANDSHAKE)
    data = None
    if endpoint.body is not None:
        data = json.dumps(endpoint.body).encode()
        headers.setdefault("Content-Type", "application/json")
    async with door.session.request(
        endpoint.method, door.target(endpoint.path), data=data, headers=headers
    ) as response:
        if endpoint.sse and response.status == 200:
            return 200, None  # the stream stays open; closing the response unsubscribes
        if endpoint.websocket and response.status == 101:
            assert response.headers["Upgrade"].lower() == "websocket"
            return 101, None  # closing the response drops the socket, which unsubscribes
        body = await response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, None


def test_the_matrix_covers_every_endpoint_kind_and_caller() -> None:
    assert set(MATRIX) == {e.name for e in ENDPOINTS}
    assert all(len(row) == len(CALLERS) for row in MATRIX.values())


CASES = [
    pytest.param(endpoint, caller, id=f"{endpoint.name}-{caller}")
    for endpoint in ENDPOINTS
    for caller in CALLERS
]


@pytest.mark.parametrize(("endpoint", "caller"), CASES)
@ASYNC
async def test_authorization_matrix(matrix: Matrix, endpoint: Endpoint, caller: str) -> None:
    expected = MATRIX[endpoint.name][CALLERS.index(caller)]
    seen_before = len(matrix.grafana.seen)
    code, body = await status_of(matrix.door, endpoint, TOKEN_USER[caller])
    assert code == expected, body
    if code in (401, 403):
        # A refusal is a Status, and nothing was passed on to Grafana or to an upstream.
        assert isinstance(body, dict) and body.get("kind") == "Status", body
        assert body["code"] == code
        assert len(matrix.grafana.seen) == seen_before
    if endpoint.name.startswith("delegated"):
        seen = matrix.grafana.seen[-1]
        assert seen.raw_path == endpoint.path
        user = TOKEN_USER[caller]
        assert seen.headers.get("Authorization") == auth_headers(user).get("Authorization")


# -- namespace and org -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "namespace", "uid", "code", "message"),
    [
        ("viewer", "org-2", "py2", 403, "belongs to org 2, but user 'viewer' works in org 1"),
        ("other", "default", "py", 403, "belongs to org 1, but user 'other' works in org 2"),
        ("otheradmin", "default", "py", 403, "belongs to org 1"),
        ("serveradmin", "org-2", "py2", 403, "belongs to org 2"),
        ("other", "org-2", "py2", 200, ""),
        ("otheradmin", "org-2", "py2", 200, ""),
        ("other", "org-1", "py", 400, "org 1 is the 'default' namespace"),
        ("viewer", "stacks-x", "py", 400, "invalid namespace 'stacks-x'"),
    ],
)
@ASYNC
async def test_namespace_must_be_the_callers_org(
    matrix: Matrix, user: str, namespace: str, uid: str, code: int, message: str
) -> None:
    path = f"/apis/{PY_GROUP}/{VERSION}/namespaces/{namespace}/datasources/{uid}/health"
    answer = await matrix.door.call("GET", path, user=user)
    if code == 200:
        assert answer.status == 200, answer.text
        return
    assert answer.status == code, answer.text
    assert answer.json()["kind"] == "Status"
    assert message in answer.json()["message"]


@ASYNC
async def test_another_orgs_datasource_is_not_reachable_by_uid(matrix: Matrix) -> None:
    """py2 lives in org 2: asked for from org 1's namespace it does not exist there."""
    answer = await matrix.door.call("GET", f"{DS}2/health", user="admin")
    assert answer.status == 404, answer.text
    assert answer.json()["kind"] == "Status"


@ASYNC
async def test_org_header_cannot_select_an_org_the_caller_is_not_in(matrix: Matrix) -> None:
    answer = await matrix.door.call(
        "GET", f"{DS}/health", user="other", headers={"X-Grafana-Org-Id": "1"}
    )
    assert answer.status in (401, 403), answer.text
    assert answer.json()["kind"] == "Status"


@pytest.mark.parametrize(
    ("user", "route", "code"),
    [
        ("viewer", "api", 200),
        ("viewer", "admin", 403),
        ("editor", "admin", 403),
        ("admin", "admin", 200),
        ("serveradmin", "admin", 200),
        ("viewer", "nope", 200),  # no route matches: the datasource URL, as Grafana does
    ],
)
@ASYNC
async def test_proxy_route_req_role(matrix: Matrix, user: str, route: str, code: int) -> None:
    seen = len(matrix.grafana.seen)
    answer = await matrix.door.call("GET", f"{DS}/proxy/{route}/thing", user=user)
    assert answer.status == code, answer.text
    if code == 200:
        routed = "" if route == "nope" else "/routed"
        assert matrix.grafana.seen[-1].raw_path.startswith(f"{routed}/{route}/thing")
    else:
        assert answer.json()["kind"] == "Status"
        assert len(matrix.grafana.seen) == seen


def render_matrix() -> str:
    """The table as docs/security.md shows it (checked by the next test)."""
    lines = ["| Endpoint | " + " | ".join(CALLERS) + " |", "|---|" + "---|" * len(CALLERS)]
    for endpoint in ENDPOINTS:
        codes = " | ".join(str(c) for c in MATRIX[endpoint.name])
        lines.append(f"| {endpoint.name} (`{endpoint.method}`) | {codes} |")
    return "\n".join(lines)


def test_docs_show_this_matrix() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "security.md"
    assert render_matrix() in docs.read_text(), "re-render the matrix into docs/security.md"
