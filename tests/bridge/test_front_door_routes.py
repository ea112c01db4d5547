"""The front door's ``resource``, custom ``route``, ``health`` and metrics endpoints over HTTP.

Against the standard scene (tests/bridge/conftest.py): the Python and Go fixture plugins, a
Python fixture that reports itself unhealthy, an app-type DataPlaneService with a custom
route, and a stand-in Grafana as the delegate. One row per behaviour.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.bridge.conftest import (
    APP_GROUP,
    GO,
    GO_GROUP,
    PY,
    PY_GROUP,
    SICK,
    SICK_GROUP,
    STANDARD_SERVICES,
    VERSION,
    Answer,
    Scene,
    assert_status,
    auth_headers,
    plugin_log,
    sample,
    standard_scene,
)

pytestmark = [pytest.mark.go, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scene(
    tmp_path_factory: pytest.TempPathFactory, go_fixture_binary: Path
) -> AsyncIterator[Scene]:
    async with standard_scene(tmp_path_factory.mktemp("front-door-routes")) as running:
        yield running


def datasource_path(group: str, uid: str, rest: str) -> str:
    return f"/apis/{group}/{VERSION}/namespaces/default/datasources/{uid}/{rest}"


Check = Callable[[Answer], None]


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    path: str
    status: int
    check: Check
    user: str = "admin"
    headers: Mapping[str, str] = field(default_factory=dict)
    data: bytes | None = None


# -- resource and route ----------------------------------------------------------------------

# What a browser might send along: Grafana's session, other cookies, a header of its own, and
# a forged user name.
SENT = {
    "Cookie": "grafana_session=secret; keep=1; other=2",
    "X-Custom": "yes",
    "X-Grafana-User": "mallory",
}


def echoed(
    *,
    method: str,
    path: str,
    url: str,
    body: str = "",
    headers: Mapping[str, list[str] | None],
) -> Check:
    """The fixture's ``echo``: what CallResource carried (a header ``None`` was not sent)."""

    def check(answer: Answer) -> None:
        echo = answer.json()
        assert (echo["method"], echo["path"], echo["url"], echo["body"]) == (
            method,
            path,
            url,
            body,
        )
        sent = {name.lower(): values for name, values in echo["headers"].items()}
        for name, values in headers.items():
            assert sent.get(name.lower()) == values, (name, echo["headers"])

    return check


# Grafana's credentials never reach the plugin; X-Grafana-User is the caller, not the forgery.
STRIPPED: Mapping[str, list[str] | None] = {
    "Authorization": None,
    "Cookie": None,
    "X-Custom": ["yes"],
    "X-Grafana-User": ["admin"],
}


# Per-connection headers a client (or a proxy in front of the bridge) may send: none of them
# describes the message, so none reaches the plugin, including what ``Connection`` names.
HOP_SENT = {
    "x-lower-case": "1",
    "X-UPPER-CASE": "2",
    "Connection": "keep-alive, X-Hop-Secret",
    "X-Hop-Secret": "per-connection",
    "Keep-Alive": "timeout=5",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
}


def header_names(*, present: set[str], absent: set[str]) -> Check:
    """The exact header names the plugin saw: ``present`` all there, spelled as given."""

    def check(answer: Answer) -> None:
        names = set(answer.json()["headers"])
        assert present <= names, names
        assert not {name.lower() for name in names} & {name.lower() for name in absent}, names

    return check


GO_SPELLED = header_names(
    present={"X-Lower-Case", "X-Upper-Case"},
    absent={"Connection", "X-Hop-Secret", "Keep-Alive", "Proxy-Authorization"},
)


def plugin_answer(status: int, body: Mapping[str, object]) -> Check:
    """The plugin's own answer, passed on: not a Status the bridge wrote."""

    def check(answer: Answer) -> None:
        assert answer.status == status
        assert answer.json() == body
        assert answer.headers["X-Content-Type-Options"] == "nosniff"

    return check


def delegated(method: str, path: str) -> Check:
    def check(answer: Answer) -> None:
        assert answer.headers["X-Stand-In"] == "grafana"
        assert answer.json() == {"grafana": "stand-in", "method": method, "path": path, "body": ""}

    return check


def text(expected: str) -> Check:
    def check(answer: Answer) -> None:
        assert answer.text == expected

    return check


APP_THINGS = f"/apis/{APP_GROUP}/{VERSION}/namespaces/default/things/x"

RESOURCE_ROWS = [
    Row(
        "python GET echo: method, path, url and headers as Grafana passes them",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/echo?x=1"),
        200,
        echoed(method="GET", path="echo", url="echo?x=1", headers=STRIPPED),
        headers=SENT,
    ),
    Row(
        "python POST echo: the body too",
        "POST",
        datasource_path(PY_GROUP, "py", "resource/echo?x=1&y=2"),
        200,
        echoed(method="POST", path="echo", url="echo?x=1&y=2", body='{"a": 1}', headers=STRIPPED),
        headers=SENT,
        data=b'{"a": 1}',
    ),
    Row(
        "go GET echo",
        "GET",
        datasource_path(GO_GROUP, "go", "resource/echo?x=1"),
        200,
        echoed(method="GET", path="echo", url="echo?x=1", headers=STRIPPED),
        headers=SENT,
    ),
    Row(
        "go POST echo",
        "POST",
        datasource_path(GO_GROUP, "go", "resource/echo"),
        200,
        echoed(method="POST", path="echo", url="echo", body="payload", headers=STRIPPED),
        headers=SENT,
        data=b"payload",
    ),
    Row(
        "go echo: names as Go's net/http spells them, per-connection headers dropped",
        "GET",
        datasource_path(GO_GROUP, "go", "resource/echo"),
        200,
        GO_SPELLED,
        headers=HOP_SENT,
    ),
    Row(
        "python echo: the same names, the same headers dropped",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/echo"),
        200,
        GO_SPELLED,
        headers=HOP_SENT,
    ),
    Row(
        "cookies the datasource keeps (jsonData.keepCookies), never the session",
        "GET",
        datasource_path(PY_GROUP, "py-cookies", "resource/echo"),
        200,
        echoed(method="GET", path="echo", url="echo", headers={"Cookie": ["keep=1"]}),
        headers=SENT,
    ),
    Row(
        "X-Grafana-User names the caller",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/echo"),
        200,
        echoed(method="GET", path="echo", url="echo", headers={"X-Grafana-User": ["viewer"]}),
        user="viewer",
        headers=SENT,
    ),
    Row(
        "X-Grafana-Org-Id names the request's org, whatever the caller sent",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/echo"),
        200,
        echoed(method="GET", path="echo", url="echo", headers={"X-Grafana-Org-Id": ["1"]}),
        headers={"X-Grafana-Org-Id": "5"},
    ),
    Row(
        "the plugin's status code",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/status/418"),
        418,
        plugin_answer(418, {"status": 418}),
    ),
    Row(
        "the plugin's 404 for a path it does not know",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/no/such"),
        404,
        plugin_answer(404, {"message": "no such resource: no/such"}),
    ),
    Row(
        "a status code outside HTTP's range: 502",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/status/600"),
        502,
        lambda answer: assert_status(
            answer, 502, "BadGateway", f"plugin {PY} answered with invalid status code 600"
        ),
    ),
    Row(
        "an informational status as the final answer: 502",
        "GET",
        datasource_path(PY_GROUP, "py", "resource/status/100"),
        502,
        lambda answer: assert_status(
            answer, 502, "BadGateway", f"plugin {PY} answered with invalid status code 100"
        ),
    ),
    Row(
        "go stream: every chunk",
        "GET",
        datasource_path(GO_GROUP, "go", "resource/stream"),
        200,
        text("chunk 0\nchunk 1\nchunk 2\nchunk 3\n"),
    ),
    Row(
        "custom app route: CallResource with the path under the namespace",
        "GET",
        APP_THINGS,
        404,
        plugin_answer(404, {"message": "no such resource: things/x"}),
    ),
    Row(
        "custom app route, method it does not declare: the delegate's",
        "POST",
        APP_THINGS,
        200,
        delegated("POST", APP_THINGS),
    ),
]


async def run(scene: Scene, row: Row) -> Answer:
    return await scene.door.call(
        row.method, row.path, user=row.user, headers=row.headers, data=row.data
    )


@pytest.mark.parametrize("row", RESOURCE_ROWS, ids=[r.name for r in RESOURCE_ROWS])
async def test_resource(scene: Scene, row: Row) -> None:
    answer = await run(scene, row)
    assert answer.status == row.status, answer.text
    row.check(answer)


BODILESS = [
    ("HEAD", "resource/echo", 200),
    ("GET", "resource/status/204", 204),
    ("GET", "resource/status/304", 304),
]


@pytest.mark.parametrize(("method", "rest", "code"), BODILESS, ids=[r for _, r, _ in BODILESS])
async def test_answer_without_content_keeps_the_connection_in_step(
    scene: Scene, method: str, rest: str, code: int
) -> None:
    """The plugin sends a body anyway; written out, it would be read as the next response."""
    door = scene.door
    connector = aiohttp.TCPConnector(limit=1)  # both requests on one keep-alive connection
    async with aiohttp.ClientSession(connector=connector) as session:
        target = door.target(datasource_path(PY_GROUP, "py", rest))
        async with session.request(method, target, headers=auth_headers("admin")) as response:
            assert response.status == code
            assert await response.read() == b""
        target = door.target(datasource_path(PY_GROUP, "py", "resource/status/418"))
        async with session.get(target, headers=auth_headers("admin")) as response:
            assert response.status == 418
            assert await response.json() == {"status": 418}


async def test_resource_stream_reaches_the_client_as_it_is_produced(scene: Scene) -> None:
    """The first chunk arrives before the plugin has produced the last one."""
    door = scene.door
    path = datasource_path(PY_GROUP, "py-stream", "resource/stream?chunks=5&delay_ms=200")
    with plugin_log(PY) as log:
        async with door.session.get(door.target(path), headers=auth_headers("admin")) as response:
            assert response.status == 200
            assert response.headers["X-Chunks"] == "5"
            first = await response.content.readline()
            first_at = time.time()
            rest = await response.content.read()
        finished = await log.wait_for(
            "Plugin Request Completed", dsUid="py-stream", endpoint="callResource", status="ok"
        )
    assert first == b"chunk 0\n"
    assert rest == b"chunk 1\nchunk 2\nchunk 3\nchunk 4\n"
    # The plugin's own clock stamp of the end of the call, against ours for the first chunk.
    assert first_at < finished.created, (first_at, finished.created)


# -- health ----------------------------------------------------------------------------------


def health(status: str, message: str, **details: object) -> Check:
    def check(answer: Answer) -> None:
        body = answer.json()
        assert (body["status"], body["message"]) == (status, message)
        assert isinstance(body["details"], dict)
        assert isinstance(body["details"].get("pid"), int)
        for key, value in details.items():
            assert body["details"][key] == value

    return check


HEALTH_ROWS = [
    Row(
        "python datasource OK",
        "GET",
        datasource_path(PY_GROUP, "py", "health"),
        200,
        health("OK", "Data source is working"),
    ),
    Row(
        "go datasource OK, with the datasource in its plugin context",
        "GET",
        datasource_path(GO_GROUP, "go", "health"),
        200,
        health("OK", "go fixture is healthy", datasourceUid="go", orgId=1, pluginId=GO),
    ),
    Row(
        "unhealthy plugin: 400 with status ERROR",
        "GET",
        datasource_path(SICK_GROUP, "sick", "health"),
        400,
        health("ERROR", "fixture is unhealthy"),
    ),
    Row(
        "app plugin OK",
        "GET",
        f"/apis/{APP_GROUP}/{VERSION}/namespaces/default/health",
        200,
        health("OK", "Data source is working"),
    ),
    Row(
        "POST on health",
        "POST",
        datasource_path(PY_GROUP, "py", "health"),
        405,
        lambda answer: assert_status(answer, 405, "MethodNotAllowed", "use GET, HEAD"),
    ),
]


@pytest.mark.parametrize("row", HEALTH_ROWS, ids=[r.name for r in HEALTH_ROWS])
async def test_health(scene: Scene, row: Row) -> None:
    answer = await run(scene, row)
    assert answer.status == row.status, answer.text
    row.check(answer)


# -- metrics ---------------------------------------------------------------------------------

# The Python fixture's exposition, exactly as it writes it (counts vary with earlier calls).
PYTHON_METRICS = re.compile(
    r"# HELP pyfixture_calls_total Number of pluginv2 calls the fixture has served\.\n"
    r"# TYPE pyfixture_calls_total counter\n"
    r'(pyfixture_calls_total\{endpoint="[a-zA-Z]+"\} [0-9]+\n)+'
    r"# HELP pyfixture_up Always 1 while the fixture serves\.\n"
    r"# TYPE pyfixture_up gauge\n"
    r"pyfixture_up 1\n"
)
GO_METRICS = re.compile(
    r"# HELP gofixture_requests_total Number of pluginv2 requests served, by endpoint\.\n"
    r"# TYPE gofixture_requests_total counter\n"
    r'(gofixture_requests_total\{endpoint="[a-zA-Z]+"\} [0-9]+\n)*'
    r"# HELP gofixture_start_time_seconds Start time of the process since unix epoch in seconds\.\n"
    r"# TYPE gofixture_start_time_seconds gauge\n"
    r"gofixture_start_time_seconds [0-9]+\n"
)


def exposition(pattern: re.Pattern[str]) -> Check:
    """The plugin's text, unchanged (re-rendered, ``pyfixture_up 1`` would read ``1.0``)."""

    def check(answer: Answer) -> None:
        assert answer.headers["Content-Type"].startswith("text/plain")
        assert pattern.fullmatch(answer.text), answer.text

    return check


METRICS_ROWS = [
    Row(
        "python plugin's metrics", "GET", f"/metrics/plugins/{PY}", 200, exposition(PYTHON_METRICS)
    ),
    Row("go plugin's metrics", "GET", f"/metrics/plugins/{GO}", 200, exposition(GO_METRICS)),
    Row(
        "unknown plugin",
        "GET",
        "/metrics/plugins/no-such-plugin",
        404,
        lambda answer: assert_status(
            answer, 404, "NotFound", "plugin no-such-plugin: no such plugin is installed"
        ),
    ),
]


@pytest.mark.parametrize("row", METRICS_ROWS, ids=[r.name for r in METRICS_ROWS])
async def test_plugin_metrics(scene: Scene, row: Row) -> None:
    answer = await run(scene, row)
    assert answer.status == row.status, answer.text
    row.check(answer)


async def test_bridge_metrics_count_the_calls_just_made(scene: Scene) -> None:
    door = scene.door
    before = await door.metrics()
    for path in (
        datasource_path(PY_GROUP, "py", "resource/echo"),
        datasource_path(GO_GROUP, "go", "health"),
        datasource_path(SICK_GROUP, "sick", "health"),
    ):
        assert (await door.call("GET", path)).status in (200, 400)
    after = await door.metrics()

    names = {family.name for family in text_string_to_metric_families(after)}
    assert {"grafana_plugin_request", "grafana_bridge_plugin_state"} <= names
    for plugin_id, endpoint in ((PY, "callResource"), (GO, "checkHealth"), (SICK, "checkHealth")):
        labels = {"plugin_id": plugin_id, "endpoint": endpoint, "status": "ok", "target": "local"}
        grown = (sample(after, "grafana_plugin_request_total", **labels) or 0) - (
            sample(before, "grafana_plugin_request_total", **labels) or 0
        )
        assert grown == 1, (plugin_id, endpoint)
    for plugin_id in (PY, GO, SICK):
        assert (
            sample(after, "grafana_bridge_plugin_state", plugin_id=plugin_id, state="running") == 1
        )
        assert (
            sample(after, "grafana_bridge_plugin_state", plugin_id=plugin_id, state="crash-loop")
            == 0
        )
    assert sample(after, "grafana_bridge_route_table_services") == STANDARD_SERVICES
