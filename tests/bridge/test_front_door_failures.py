"""Plugins that fail, and clients that leave: what the front door answers, and that it recovers.

One bridge runs the Python fixture under several plugin ids, each told to misbehave in one way
(``FIXTURE_BEHAVIOUR``): serving only diagnostics, hanging in every call, exiting before the
handshake; another is killed by the test. ``plugins.call_timeout`` is short, and the restart
policy turns the second failure in a row into a long crash-loop wait.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from plugin_host.supervisor import PluginState
from tests.bridge.conftest import (
    GO,
    GO_GROUP,
    PY,
    PY_GROUP,
    VERSION,
    WAIT,
    Answer,
    FrontDoor,
    PluginStates,
    assert_status,
    auth_headers,
    bridge_config,
    dataplane_service,
    datasource,
    eventually,
    front_door,
    plugin_log,
    python_fixture_as,
    sample,
    token_for,
    write_datasources,
    write_manifest,
)
from tests.conftest import FIXTURE_PLUGINS

pytestmark = [pytest.mark.go, pytest.mark.asyncio(loop_scope="module")]

CALL_TIMEOUT = 1.0
CRASH_LOOP_WAIT = 30.0  # longer than this module runs: once crash-looping, it stays so
DIAG = "bridge-pydiag-datasource"
HANG = "bridge-pyhang-datasource"
CRASH = "bridge-pycrash-datasource"
KILL = "bridge-pykill-datasource"
BEHAVIOURS = {DIAG: "only=diagnostics", HANG: "hang", CRASH: "exit_before_handshake"}


def group(plugin_id: str) -> str:
    return f"{plugin_id.removeprefix('bridge-').removesuffix('-datasource')}.datasource.grafana.app"


def path(plugin_id: str, uid: str, rest: str) -> str:
    return f"/apis/{group(plugin_id)}/{VERSION}/namespaces/default/datasources/{uid}/{rest}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(
    tmp_path_factory: pytest.TempPathFactory, go_fixture_binary: Path
) -> AsyncIterator[FrontDoor]:
    root = tmp_path_factory.mktemp("front-door-failures")
    plugins = root / "plugins"
    for plugin_id in (DIAG, HANG, CRASH, KILL):
        python_fixture_as(plugins, plugin_id)
    write_datasources(
        root / "provisioning",
        datasource(PY, "py"),
        datasource(GO, "go"),
        datasource(DIAG, "diag"),
        datasource(CRASH, "crash"),
        datasource(KILL, "kill"),
        *(datasource(HANG, uid) for uid in ("hang-timeout", "hang-query", "hang-resource")),
    )
    write_manifest(
        root / "dataplane",
        "services.yaml",
        dataplane_service(PY, PY_GROUP),
        dataplane_service(GO, GO_GROUP),
        *(dataplane_service(p, group(p)) for p in (DIAG, HANG, CRASH, KILL)),
    )
    config = bridge_config(
        root,
        plugin_dirs=(FIXTURE_PLUGINS, plugins),
        allow_unsigned=(PY, GO, DIAG, HANG, CRASH, KILL),
        overrides={
            "plugins.call_timeout": CALL_TIMEOUT,
            "plugins.env": {p: {"FIXTURE_BEHAVIOUR": b} for p, b in BEHAVIOURS.items()},
            "plugins.restart": {
                "initial_backoff": 0.5,
                "multiplier": CRASH_LOOP_WAIT / 0.5,
                "max_backoff": CRASH_LOOP_WAIT,
                "jitter": 0,
                "crash_loop_threshold": 2,
            },
        },
    )
    async with front_door(config) as running:
        yield running


def query_for(plugin_id: str, uid: str) -> dict[str, Any]:
    return {
        "from": "now-1h",
        "to": "now",
        "queries": [{"refId": "A", "points": 1, "datasource": {"type": plugin_id, "uid": uid}}],
    }


@dataclass(frozen=True)
class Call:
    """One request to a plugin's datasource: a query, or a resource GET."""

    name: str
    plugin_id: str
    uid: str
    endpoint: str  # the pluginv2 call it makes, as the bridge's metrics name it

    @property
    def method(self) -> str:
        return "POST" if self.endpoint == "queryData" else "GET"

    @property
    def path(self) -> str:
        rest = "query" if self.endpoint == "queryData" else "resource/echo"
        return path(self.plugin_id, self.uid, rest)

    @property
    def body(self) -> bytes:
        if self.endpoint != "queryData":
            return b""
        return json.dumps(query_for(self.plugin_id, self.uid)).encode()

    async def send(self, door: FrontDoor) -> Answer:
        return await door.call(
            self.method,
            self.path,
            data=self.body or None,
            headers={"Content-Type": "application/json"},
        )


# -- the plugin cannot answer ----------------------------------------------------------------

NOT_SERVED = [
    (Call("query", DIAG, "diag", "queryData"), "QueryData is not implemented by the plugin"),
    (
        Call("resource", DIAG, "diag", "callResource"),
        "CallResource is not implemented by the plugin",
    ),
]


@pytest.mark.parametrize(("call", "message"), NOT_SERVED, ids=[c.name for c, _ in NOT_SERVED])
async def test_service_the_plugin_does_not_serve_is_501(
    door: FrontDoor, call: Call, message: str
) -> None:
    assert_status(await call.send(door), 501, "NotImplemented", message)


HUNG = [
    Call("query", HANG, "hang-timeout", "queryData"),
    Call("resource", HANG, "hang-timeout", "callResource"),
]


@pytest.mark.parametrize("call", HUNG, ids=[c.name for c in HUNG])
async def test_hung_plugin_is_504_after_the_call_timeout(door: FrontDoor, call: Call) -> None:
    started = time.monotonic()
    answer = await call.send(door)
    took = time.monotonic() - started
    assert_status(answer, 504, "Timeout", "no answer before the deadline")
    assert CALL_TIMEOUT <= took < CALL_TIMEOUT + 2, took


async def test_crash_looping_plugin_is_503_with_retry_after(door: FrontDoor) -> None:
    await PluginStates(door.bridge, CRASH).reach(PluginState.CRASH_LOOP)
    for call in (
        Call("query", CRASH, "crash", "queryData"),
        Call("resource", CRASH, "crash", "callResource"),
    ):
        answer = await call.send(door)
        assert_status(answer, 503, "ServiceUnavailable", "crash-looping")
        assert 1 <= int(answer.headers["Retry-After"]) <= CRASH_LOOP_WAIT, call.name
    answer = await door.call("GET", path(CRASH, "crash", "health"))
    assert_status(answer, 503, "ServiceUnavailable", "crash-looping")
    metrics = await door.metrics()
    assert sample(metrics, "grafana_bridge_plugin_state", plugin_id=CRASH, state="crash-loop") == 1


# -- the plugin goes away mid-answer ---------------------------------------------------------


async def test_plugin_killed_mid_stream_cuts_the_response_short(door: FrontDoor) -> None:
    bridge = door.bridge
    states = PluginStates(bridge, KILL)
    stream = path(KILL, "kill", "resource/stream?chunks=200&delay_ms=50")
    async with door.session.get(door.target(stream), headers=auth_headers("admin")) as response:
        assert response.status == 200
        assert await response.content.readline() == b"chunk 0\n"
        pid = bridge.host.registry.status(KILL).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(WAIT):
                await response.content.read()

    # Everything else is still served, and the killed plugin is back after its restart.
    assert (await door.call("GET", path(PY, "py", "resource/echo"))).status == 200
    assert (await door.call("GET", path(GO, "go", "resource/echo"))).status == 200
    await states.reach(PluginState.BACKING_OFF, PluginState.RUNNING)
    answer = await door.call("GET", path(KILL, "kill", "resource/status/418"))
    assert (answer.status, answer.json()) == (418, {"status": 418})

    metrics = await door.metrics()
    failed = {"plugin_id": KILL, "endpoint": "callResource", "target": "local"}
    assert sample(metrics, "grafana_plugin_request_total", status="error", **failed) == 1


# -- the client goes away mid-call -----------------------------------------------------------

LEFT = [
    Call("query", HANG, "hang-query", "queryData"),
    Call("resource", HANG, "hang-resource", "callResource"),
]


async def send_and_keep_open(door: FrontDoor, call: Call) -> asyncio.StreamWriter:
    """Send ``call`` on a connection of its own; the caller decides when to hang up."""
    host, port = door.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"{call.method} {call.path} HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token_for('admin')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(call.body)}\r\n\r\n"
    )
    writer.write(head.encode() + call.body)
    await writer.drain()
    return writer


@pytest.mark.parametrize("call", LEFT, ids=[c.name for c in LEFT])
async def test_client_leaving_cancels_the_plugin_call(door: FrontDoor, call: Call) -> None:
    labels = {"plugin_id": HANG, "endpoint": call.endpoint, "status": "cancelled"}
    before = sample(await door.metrics(), "grafana_plugin_request_total", **labels) or 0
    with plugin_log(HANG) as log:
        writer = await send_and_keep_open(door, call)
        hanging = await log.wait_for("hanging on purpose", dsUid=call.uid)
        writer.close()
        await writer.wait_closed()
        ended = await log.wait_for("Plugin Request Completed", dsUid=call.uid, status="cancelled")
    # Before the call's own deadline, which would cancel it too (and count as an error).
    assert ended.created - hanging.created < CALL_TIMEOUT

    async def counted() -> bool:
        after = sample(await door.metrics(), "grafana_plugin_request_total", **labels) or 0
        return after == before + 1

    await eventually(counted, what="the bridge counts the call as cancelled")
