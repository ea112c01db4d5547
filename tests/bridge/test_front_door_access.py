"""Who gets in, which paths are refused, and what goes to the delegate Grafana, over HTTP.

Against the standard scene (tests/bridge/conftest.py). Authentication is token mode; the
stand-in Grafana records every request that reaches it. One row per behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from bridge.apiserver import api_group
from tests.bridge.conftest import (
    DELEGATE_GROUPS,
    PY,
    PY_GROUP,
    VERSION,
    WAIT,
    Answer,
    Scene,
    assert_status,
    auth_headers,
    bridge_config,
    free_port,
    front_door,
    sample,
    standard_scene,
    token_for,
)

pytestmark = [pytest.mark.go, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scene(
    tmp_path_factory: pytest.TempPathFactory, go_fixture_binary: Path
) -> AsyncIterator[Scene]:
    async with standard_scene(tmp_path_factory.mktemp("front-door-access")) as running:
        yield running


def under(namespace: str, rest: str, *, group: str = PY_GROUP) -> str:
    return f"/apis/{group}/{VERSION}/namespaces/{namespace}/{rest}"


Check = Callable[[Answer], None]


def status(code: int, reason: str, message: str) -> Check:
    return lambda answer: assert_status(answer, code, reason, message)


# -- authentication and authorisation --------------------------------------------------------


@dataclass(frozen=True)
class AuthRow:
    name: str
    path: str
    headers: Mapping[str, str]
    status: int
    check: Check


def frames_for(ref_id: str) -> Check:
    def check(answer: Answer) -> None:
        (frame,) = answer.json()["results"][ref_id]["frames"]
        assert frame["schema"]["refId"] == ref_id

    return check


def query(uid: str) -> dict[str, Any]:
    return {
        "from": "now-1h",
        "to": "now",
        "queries": [{"refId": "A", "points": 2, "datasource": {"type": PY, "uid": uid}}],
    }


AUTH_ROWS = [
    AuthRow(
        "no credentials",
        under("default", "datasources/py/query"),
        {},
        401,
        status(401, "Unauthorized", "authentication required: send Authorization: Bearer"),
    ),
    AuthRow(
        "a token not in the token file",
        under("default", "datasources/py/query"),
        {"Authorization": "Bearer not-a-token"},
        401,
        status(401, "Unauthorized", "the bearer token is not in the token file"),
    ),
    AuthRow(
        "basic auth in token mode",
        under("default", "datasources/py/query"),
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        401,
        status(401, "Unauthorized", "token mode accepts only Authorization: Bearer"),
    ),
    AuthRow(
        "a user whose role is None",
        under("default", "datasources/py/query"),
        auth_headers("nobody"),
        403,
        status(403, "Forbidden", "user 'nobody' has no role in org 1"),
    ),
    AuthRow(
        "an org-2 user in org 1's namespace",
        under("default", "datasources/py/query"),
        auth_headers("other"),
        403,
        status(403, "Forbidden", "namespace 'default' belongs to org 1, but user 'other'"),
    ),
    AuthRow(
        "org-1 spelled as a namespace",
        under("org-1", "datasources/py/query"),
        auth_headers("admin"),
        400,
        status(400, "BadRequest", "invalid namespace 'org-1'"),
    ),
    AuthRow(
        "an org-1 user in org 2's namespace",
        under("org-2", "datasources/py2/query"),
        auth_headers("admin"),
        403,
        status(403, "Forbidden", "namespace 'org-2' belongs to org 2, but user 'admin'"),
    ),
    AuthRow(
        "an editor may query",
        under("default", "datasources/py/query"),
        auth_headers("editor"),
        200,
        frames_for("A"),
    ),
    AuthRow(
        "a viewer may query",
        under("default", "datasources/py/query"),
        auth_headers("viewer"),
        200,
        frames_for("A"),
    ),
    AuthRow(
        "an org-2 user queries org 2's datasource",
        under("org-2", "datasources/py2/query"),
        auth_headers("other"),
        200,
        frames_for("A"),
    ),
    AuthRow(
        "an org-2 user cannot reach org 1's datasource from org 2",
        under("org-2", "datasources/py/query"),
        auth_headers("other"),
        404,
        status(404, "NotFound", "datasource 'py' not found in org 2"),
    ),
]


@pytest.mark.parametrize("row", AUTH_ROWS, ids=[r.name for r in AUTH_ROWS])
async def test_auth(scene: Scene, row: AuthRow) -> None:
    uid = row.path.split("/datasources/")[1].split("/")[0]
    answer = await scene.door.call(
        "POST", row.path, user=None, headers=row.headers, body=query(uid)
    )
    assert answer.status == row.status, answer.text
    row.check(answer)


# -- paths that are refused before anything is called ----------------------------------------

DOT = "the path contains a . or .. segment"
EMPTY = "the path contains an empty segment (//)"
ENCODED = "the path contains an encoded /, \\ or control character"

HOSTILE = [
    ("dot-dot segment", "datasources/py/resource/../../../../api/admin/users", DOT),
    ("encoded dot-dot", "datasources/py/resource/%2e%2e/%2E%2E/x", DOT),
    ("dot segment", "datasources/py/resource/./echo", DOT),
    ("dot-dot before the datasource", "datasources/../datasources/py/resource/echo", DOT),
    ("empty segment", "datasources/py/resource//echo", EMPTY),
    ("empty segment in the query path", "datasources/py//query", EMPTY),
    ("encoded slash", "datasources/py/resource/a%2Fecho", ENCODED),
    ("encoded backslash", "datasources/py/resource/a%5Cecho", ENCODED),
    ("encoded NUL", "datasources/py/resource/echo%00", ENCODED),
    ("not UTF-8 once decoded", "datasources/py/resource/%ff", "the path is not valid UTF-8"),
]


@pytest.mark.parametrize(("name", "rest", "why"), HOSTILE, ids=[row[0] for row in HOSTILE])
async def test_hostile_path_is_refused_and_nothing_is_called(
    scene: Scene, name: str, rest: str, why: str
) -> None:
    door = scene.door
    calls = await door.plugin_calls(PY, "callResource")
    delegated = len(scene.grafana.seen)

    answer = await door.call("GET", under("default", rest))
    assert_status(answer, 400, "BadRequest", f"invalid request path: {why}")

    assert await door.plugin_calls(PY, "callResource") == calls
    assert len(scene.grafana.seen) == delegated


# -- delegation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DelegateRow:
    name: str
    method: str
    path: str
    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    data: bytes = b""


DELEGATE_ROWS = [
    DelegateRow(
        "a Grafana API path, query and headers intact",
        "GET",
        "/api/dashboards/uid/x?orgId=1&from=now-1h",
        200,
        headers={"X-Custom": "yes", "Accept": "application/json"},
    ),
    DelegateRow(
        "an API group the bridge does not serve, with a body",
        "POST",
        "/apis/other.grafana.app/v1/namespaces/default/things?dryRun=All",
        201,
        headers={"Content-Type": "application/json"},
        data=b'{"spec": {"title": "x"}}',
    ),
    DelegateRow(
        "a path under a mounted group that is no service of it",
        "GET",
        under("default", "datasources/py"),
        200,
    ),
    DelegateRow(
        "a mounted group's own root (discovery)", "GET", f"/apis/{PY_GROUP}/{VERSION}", 200
    ),
    DelegateRow(
        "the delegate's error status passes back",
        "DELETE",
        "/api/dashboards/uid/x",
        409,
    ),
]


@pytest.mark.parametrize("row", DELEGATE_ROWS, ids=[r.name for r in DELEGATE_ROWS])
async def test_delegated(scene: Scene, row: DelegateRow) -> None:
    target = row.path + ("&" if "?" in row.path else "?") + f"status={row.status}"
    answer = await scene.door.call(row.method, target, headers=row.headers, data=row.data or None)

    assert answer.status == row.status, answer.text
    assert answer.headers["X-Stand-In"] == "grafana"
    assert answer.json() == {
        "grafana": "stand-in",
        "method": row.method,
        "path": target,
        "body": row.data.decode(),
    }
    seen = scene.grafana.seen[-1]
    assert (seen.method, seen.raw_path, seen.body) == (row.method, target, row.data)
    # The caller's own credentials go to Grafana, which decides about them.
    assert seen.headers["Authorization"] == f"Bearer {token_for('admin')}"
    for name, value in row.headers.items():
        assert seen.headers[name] == value
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"


async def test_websocket_is_relayed_to_the_delegate(scene: Scene) -> None:
    door = scene.door
    async with door.session.ws_connect(
        door.target("/api/live/ws"), headers=auth_headers("admin")
    ) as ws:
        await ws.send_str("hello")
        reply = await ws.receive(timeout=WAIT)
        assert (reply.type, reply.data) == (aiohttp.WSMsgType.TEXT, "grafana echoes hello")
        await ws.close()
    assert scene.grafana.seen[-1].raw_path == "/api/live/ws"


async def test_apis_lists_the_delegates_groups(scene: Scene) -> None:
    """The bridge's own group (the DataPlaneService API) first, then Grafana's."""
    answer = await scene.door.call("GET", "/apis")
    assert answer.status == 200, answer.text
    assert answer.json() == {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [api_group(), *DELEGATE_GROUPS],
    }


async def test_delegated_requests_are_counted(scene: Scene) -> None:
    door = scene.door
    before = sample(await door.metrics(), "grafana_bridge_delegated_requests_total", method="PUT")
    answer = await door.call("PUT", "/api/folders/f?status=202", data=b"{}")
    assert answer.status == 202
    after = sample(await door.metrics(), "grafana_bridge_delegated_requests_total", method="PUT")
    assert (after or 0) - (before or 0) == 1


# -- without a working delegate --------------------------------------------------------------


def apis_list(groups: list[dict[str, Any]]) -> Check:
    def check(answer: Answer) -> None:
        assert answer.status == 200, answer.text
        assert answer.json() == {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    return check


NO_DELEGATE = [
    (
        "no delegate configured: a path for Grafana",
        None,
        "/api/dashboards/uid/x",
        status(
            404,
            "NotFound",
            "/api/dashboards/uid/x is not served by the bridge and no delegate is configured",
        ),
    ),
    (
        "no delegate configured: /apis has the bridge's groups only",
        None,
        "/apis",
        apis_list([api_group()]),
    ),
    (
        "delegate down: a path for Grafana",
        "down",
        "/api/dashboards/uid/x",
        status(503, "ServiceUnavailable", "the Grafana delegate could not be reached"),
    ),
    (
        "delegate down: /apis",
        "down",
        "/apis",
        status(503, "ServiceUnavailable", "the Grafana delegate could not be reached"),
    ),
]


@pytest.mark.parametrize(
    ("name", "delegate", "target", "check"), NO_DELEGATE, ids=[row[0] for row in NO_DELEGATE]
)
async def test_without_a_working_delegate(
    tmp_path: Path, name: str, delegate: str | None, target: str, check: Check
) -> None:
    (tmp_path / "no-plugins").mkdir()
    url = f"http://127.0.0.1:{free_port()}" if delegate == "down" else None
    config = bridge_config(tmp_path, plugin_dirs=(tmp_path / "no-plugins",), delegate=url)
    async with front_door(config) as door:
        check(await door.call("GET", target))
        # The bridge's own endpoints answer regardless.
        assert (await door.call("GET", "/livez", user=None)).text == "ok"
