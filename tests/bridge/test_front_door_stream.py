"""The ``stream`` endpoint end to end: real WebSocket and SSE clients, real plugin processes.

One bridge (module scope) serves the Python fixture, the Go fixture and an app-type service
of the Python fixture, each with a ``stream`` service. The fixtures' streams are ``ticks…``
paths: the Python one sends ``{"tick": 0, "path": …}`` every ``intervalMs`` (from the
subscribe data), the Go one ``{"tick": 1}`` every 100 ms. The plugin's own call counters and
logs show what it saw: one RunStream per channel, and its cancellation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import WSMsgType

from plugin_host.supervisor import PluginState
from tests.bridge.conftest import (
    GO,
    GO_GROUP,
    PY,
    PY_GROUP,
    VERSION,
    WAIT,
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
    sample,
    write_datasources,
    write_manifest,
)

pytestmark = [pytest.mark.go, pytest.mark.asyncio(loop_scope="module")]

APP_GROUP = "pystream.app.grafana.app"
STREAM_SERVICES = ({"type": "query"}, {"type": "stream"})
MAX_SUBSCRIBERS = 10
MAX_CHANNELS = 4  # per plugin
MAX_MESSAGE = 1024
BUFFER = 256
HEARTBEAT = 0.5


def stream_path(uid: str | None, path: str, *, group: str = PY_GROUP, data: Any = None) -> str:
    base = f"/apis/{group}/{VERSION}/namespaces/default"
    where = f"{base}/datasources/{uid}/stream/{path}" if uid else f"{base}/stream/{path}"
    return where + (f"?data={quote(json.dumps(data))}" if data is not None else "")


def stream_config(root: Path, **overrides: Any) -> Any:
    write_datasources(root / "provisioning", datasource(PY, "py"), datasource(GO, "go"))
    write_manifest(
        root / "dataplane",
        "streams.yaml",
        dataplane_service(PY, PY_GROUP, services=STREAM_SERVICES),
        dataplane_service(GO, GO_GROUP, services=STREAM_SERVICES),
        dataplane_service(PY, APP_GROUP, plugin_type="app", services=({"type": "stream"},)),
    )
    settings = {
        "streams.max_subscribers": MAX_SUBSCRIBERS,
        "streams.max_channels_per_plugin": MAX_CHANNELS,
        "streams.max_message_bytes": MAX_MESSAGE,
        "streams.buffer_size": BUFFER,
        "streams.heartbeat": HEARTBEAT,
        "streams.ws_ping": 10.0,
        "streams.restart_backoff": 0.05,
        "plugins.restart.initial_backoff": 0.2,
        "plugins.restart.jitter": 0,
        **overrides,
    }
    return bridge_config(root, overrides=settings)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(
    tmp_path_factory: pytest.TempPathFactory, go_fixture_binary: Path
) -> AsyncIterator[FrontDoor]:
    async with front_door(stream_config(tmp_path_factory.mktemp("front-door-stream"))) as door:
        yield door


# -- clients -----------------------------------------------------------------------------------


async def connect(
    door: FrontDoor, path: str, *, user: str = "admin", session: aiohttp.ClientSession | None = None
) -> aiohttp.ClientWebSocketResponse:
    return await (session or door.session).ws_connect(
        door.target(path), headers=auth_headers(user), autoclose=False
    )


async def next_json(ws: aiohttp.ClientWebSocketResponse) -> Any:
    message = await ws.receive(timeout=WAIT)
    assert message.type is WSMsgType.TEXT, message
    return json.loads(message.data)


async def ticks(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[int]:
    got: list[int] = []
    while len(got) < count:
        value = await next_json(ws)
        if "tick" in value:
            got.append(value["tick"])
    return got


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    """The close code and reason the bridge ended the socket with (text frames skipped)."""
    while True:
        message = await ws.receive(timeout=WAIT)
        if message.type is WSMsgType.CLOSE:
            await ws.close()
            return message.data, message.extra or ""
        assert message.type is WSMsgType.TEXT, message


class SSE:
    """A minimal Server-Sent Events reader over an aiohttp response."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.comments: list[str] = []

    async def next_event(self) -> tuple[str, str]:
        """(event name, data) of the next event; comments are collected on the way."""
        name, data = "message", list[str]()
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), WAIT)
            assert raw, "the event stream ended"
            line = raw.decode().rstrip("\n")
            if line == "":
                if data:
                    return name, "\n".join(data)
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
            elif line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])

    async def next_comment(self) -> str:
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), WAIT)
            assert raw, "the event stream ended"
            if raw.startswith(b":"):
                return raw.decode()[1:].strip()

    async def next_of(self, event: str) -> Any:
        while True:
            name, data = await self.next_event()
            if name == event:
                return json.loads(data)


@contextlib.asynccontextmanager
async def sse(door: FrontDoor, path: str, *, user: str = "admin") -> AsyncIterator[SSE]:
    headers = {**auth_headers(user), "Accept": "text/event-stream"}
    async with door.session.get(door.target(path), headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        yield SSE(response)


async def metric(door: FrontDoor, name: str, **labels: str) -> float:
    return sample(await door.metrics(), name, **labels) or 0.0


async def no_streams_left(door: FrontDoor) -> None:
    async def empty() -> bool:
        running = await metric(door, "grafana_bridge_streams_running")
        subscribed = await metric(door, "grafana_bridge_stream_subscribers")
        return not door.bridge.streams.channels() and running == 0 and subscribed == 0

    await eventually(empty, what="every stream was closed and its RunStream cancelled")


# -- fan-out, limits, cancellation -------------------------------------------------------------


async def test_subscribers_share_one_run_stream_until_the_last_leaves(door: FrontDoor) -> None:
    path = stream_path("py", "ticks/fanout", data={"intervalMs": 20})
    runs = await door.plugin_calls(PY, "runStream")
    subscribes = await door.plugin_calls(PY, "subscribeStream")
    sockets = []
    with plugin_log(PY) as log:
        for _ in range(MAX_SUBSCRIBERS):
            ws = await connect(door, path)
            # SubscribeStreamResponse.data goes to this subscriber first.
            assert await next_json(ws) == {"path": "ticks/fanout"}
            sockets.append(ws)
        assert door.bridge.streams.channels()[0].channel == "ds/py/ticks/fanout"
        received = await asyncio.gather(*(ticks(ws, 5) for ws in sockets))
        for got in received:
            assert got == list(range(got[0], got[0] + 5)), got
        # One RunStream for all of them; each subscriber authorised on its own.
        assert await door.plugin_calls(PY, "runStream") == runs + 1
        assert await door.plugin_calls(PY, "subscribeStream") == subscribes + MAX_SUBSCRIBERS
        assert await metric(door, "grafana_bridge_stream_subscribers", plugin_id=PY) == 10

        # One more is refused: 1013 on a WebSocket, 429 Status over SSE.
        extra = await connect(door, path)
        code, reason = await closed_with(extra)
        assert code == 1013
        assert "10 subscribers" in reason
        answer = await door.call("GET", path, headers={"Accept": "text/event-stream"})
        assert_status(answer, 429, "TooManyRequests", "streams.max_subscribers")

        # Still shared while any subscriber is left; cancelled when the last leaves.
        for ws in sockets[:-1]:
            await ws.close()
        assert (await ticks(sockets[-1], 2))[1] > received[-1][-1]
        await sockets[-1].close()
        await log.wait_for("Plugin Request Completed", endpoint="runStream", status="cancelled")
    await no_streams_left(door)


async def test_a_client_that_vanishes_is_cleaned_up(door: FrontDoor) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await connect(door, stream_path("py", "ticks/vanish"), session=session)
        assert await next_json(ws) == {"path": "ticks/vanish"}
        assert door.bridge.streams.subscriber_count(door.bridge.streams.channels()[0]) == 1
    # The session is gone without a close frame: the bridge notices and cancels the stream.
    await no_streams_left(door)


async def test_sse_sends_frames_and_heartbeats(door: FrontDoor) -> None:
    path = stream_path("py", "ticks/sse", data={"intervalMs": 60000})
    async with sse(door, path) as events:
        assert await events.next_of("message") == {"path": "ticks/sse"}
        first = await events.next_of("message")
        assert (first["tick"], first["path"]) == (0, "ticks/sse")
        # Nothing more for a minute: the heartbeat comment keeps the connection alive.
        assert await events.next_comment() == "heartbeat"
    await no_streams_left(door)


async def test_a_stream_the_plugin_ends_ends_for_its_subscribers(door: FrontDoor) -> None:
    path = stream_path("py", "ticks/short", data={"intervalMs": 300, "count": 2})
    ws = await connect(door, path)
    async with sse(door, path) as events:
        assert await ticks(ws, 2) == [0, 1]
        assert await closed_with(ws) == (1000, "stream ended")
        assert await events.next_of("end") == {"code": 1000, "reason": "stream ended"}
        assert await events.response.content.read() == b""
    await no_streams_left(door)


# -- refusals and limits -----------------------------------------------------------------------


async def test_subscribe_stream_decides_for_each_subscriber(door: FrontDoor) -> None:
    ws = await connect(door, stream_path("py", "nothing-here"))
    assert await closed_with(ws) == (4404, "stream ds/py/nothing-here not found")
    ws = await connect(door, stream_path("py", "denied"))
    assert await closed_with(ws) == (1008, "permission denied for stream ds/py/denied")

    sse_headers = {"Accept": "text/event-stream"}
    answer = await door.call("GET", stream_path("py", "nothing-here"), headers=sse_headers)
    assert_status(answer, 404, "NotFound", "stream ds/py/nothing-here not found")
    answer = await door.call("GET", stream_path("py", "denied"), headers=sse_headers)
    assert_status(answer, 403, "Forbidden", "permission denied for stream ds/py/denied")
    await no_streams_left(door)


@pytest.mark.parametrize(
    ("method", "path", "code", "reason", "message"),
    [
        ("GET", stream_path("nope", "ticks"), 404, "NotFound", "nope"),
        ("GET", stream_path("py", "ticks/a%20b"), 400, "BadRequest", "invalid stream path"),
        ("GET", stream_path("py", "ticks") + "?data=%7Bnot", 400, "BadRequest", "not valid JSON"),
        ("PUT", stream_path("py", "ticks"), 405, "MethodNotAllowed", "use GET or POST"),
        ("GET", stream_path("py", "ticks", data="x" * MAX_MESSAGE), 413, "", "limit is 1024"),
    ],
)
async def test_bad_requests_get_a_status(
    door: FrontDoor, method: str, path: str, code: int, reason: str, message: str
) -> None:
    answer = await door.call(method, path)
    assert_status(answer, code, reason or "RequestEntityTooLarge", message)


async def test_channels_per_plugin_are_limited(door: FrontDoor) -> None:
    """One caller opening ticks/1..N gets at most streams.max_channels_per_plugin RunStreams."""
    quiet = {"intervalMs": 60000}
    runs = await door.plugin_calls(PY, "runStream")
    refused = await metric(door, "grafana_bridge_stream_channels_refused_total", plugin_id=PY)
    sockets = []
    for n in range(MAX_CHANNELS):
        ws = await connect(door, stream_path("py", f"ticks/{n}", data=quiet))
        assert await next_json(ws) == {"path": f"ticks/{n}"}
        assert await ticks(ws, 1) == [0]  # the channel's RunStream is running
        sockets.append(ws)
    assert len(door.bridge.streams.channels()) == MAX_CHANNELS

    # One more path of the same plugin: 1013 on a WebSocket, 429 + Retry-After over SSE.
    extra = await connect(door, stream_path("py", "ticks/one-more", data=quiet))
    assert await closed_with(extra) == (
        1013,
        f"plugin {PY} has {MAX_CHANNELS} open streams (streams.max_channels_per_plugin)",
    )
    sse_headers = {"Accept": "text/event-stream"}
    answer = await door.call("GET", stream_path("py", "ticks/one-more"), headers=sse_headers)
    assert_status(answer, 429, "TooManyRequests", "streams.max_channels_per_plugin")
    assert answer.headers["Retry-After"] == "1"
    # The app-plugin endpoint of the same plugin counts too.
    app = await connect(door, stream_path(None, "ticks/app-more", group=APP_GROUP))
    assert (await closed_with(app))[0] == 1013
    assert (
        await metric(door, "grafana_bridge_stream_channels_refused_total", plugin_id=PY)
        == refused + 3
    )

    # Joining an open channel is not limited by it, and other plugins have their own count.
    joined = await connect(door, stream_path("py", "ticks/0", data=quiet))
    assert await next_json(joined) == {"path": "ticks/0"}
    go = await connect(door, stream_path("go", "ticks/go-more", group=GO_GROUP))
    assert len(await ticks(go, 1)) == 1
    await go.close()

    # A channel closed (its last subscriber left) frees its slot.
    await sockets.pop().close()

    async def freed() -> bool:
        return len(door.bridge.streams.channels()) == MAX_CHANNELS - 1

    await eventually(freed, what="the closed channel was forgotten")
    ws = await connect(door, stream_path("py", "ticks/one-more", data=quiet))
    assert await next_json(ws) == {"path": "ticks/one-more"}
    assert await ticks(ws, 1) == [0]
    sockets.append(ws)
    # Only the accepted channels ever reached the plugin's RunStream.
    assert await door.plugin_calls(PY, "runStream") == runs + MAX_CHANNELS + 1
    for ws in [*sockets, joined]:
        await ws.close()
    await no_streams_left(door)


async def test_messages_are_published_to_every_subscriber(door: FrontDoor) -> None:
    path = stream_path("py", "ticks/chat", data={"intervalMs": 60000})
    ws = await connect(door, path)
    assert await next_json(ws) == {"path": "ticks/chat"}
    assert (await next_json(ws))["tick"] == 0  # the stream's one packet for a minute
    other = await connect(door, path)
    async with sse(door, path) as events:
        assert await next_json(other) == {"path": "ticks/chat"}
        assert (await events.next_of("message")) == {"path": "ticks/chat"}

        # A WebSocket message goes to PublishStream; its answer to the whole channel.
        await ws.send_str('{"hello":"everyone"}')
        for client in (ws, other):
            assert await next_json(client) == {"hello": "everyone"}
        assert await events.next_of("message") == {"hello": "everyone"}

        # The same over HTTP POST.
        answer = await door.call("POST", path.split("?")[0], body={"from": "curl"})
        assert answer.status == 200, answer.text
        assert answer.json() == {"channel": "ds/py/ticks/chat", "subscribers": 3}
        assert await next_json(other) == {"from": "curl"}
        assert await events.next_of("message") == {"from": "curl"}

        denied = await door.call("POST", stream_path("py", "denied"), body={})
        assert_status(denied, 403, "Forbidden", "publish refused")
        big = await door.call("POST", path.split("?")[0], data=b"[" + b"1," * MAX_MESSAGE + b"1]")
        assert_status(big, 413, "RequestEntityTooLarge", "streams.max_message_bytes")

        # Past streams.max_message_bytes a WebSocket is closed with 1009 (message too big).
        await ws.send_str(json.dumps({"pad": "x" * MAX_MESSAGE}))
        code, _ = await closed_with(ws)
        assert code == 1009
        # The others stay subscribed.
        await door.call("POST", path.split("?")[0], body={"still": "here"})
        assert await next_json(other) == {"still": "here"}
        await other.close()
    await no_streams_left(door)


async def stalled_websocket(door: FrontDoor, path: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads.

    Its receive window is 4 KiB, so the bridge's writes back up after a few packets (an
    aiohttp client would keep reading into memory).
    """
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
    )
    return await _stalled(door, path, upgrade, b"HTTP/1.1 101")


async def stalled_sse(door: FrontDoor, path: str) -> socket.socket:
    """An SSE client that reads the response head and then never reads again (4 KiB window)."""
    return await _stalled(door, path, "Accept: text/event-stream\r\n", b"HTTP/1.1 200")


async def _stalled(door: FrontDoor, path: str, headers: str, expected: bytes) -> socket.socket:
    loop = asyncio.get_running_loop()
    host, port = door.target("/").host, door.target("/").port
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{headers}"
        f"Authorization: {auth_headers('admin')['Authorization']}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += await asyncio.wait_for(loop.sock_recv(sock, 1), WAIT)
    assert head.startswith(expected), head
    return sock


async def test_a_slow_subscriber_loses_its_oldest_messages_not_the_others(
    door: FrontDoor,
) -> None:
    path = stream_path("py", "ticks/flood", data={"intervalMs": 2, "pad": 16000})
    dropped = await metric(door, "grafana_bridge_stream_dropped_messages_total", plugin_id=PY)
    slow = await stalled_websocket(door, path)
    try:
        fast = await connect(door, path)
        got: list[int] = []

        async def overflowed() -> bool:
            got.extend(await ticks(fast, 20))
            now = await metric(door, "grafana_bridge_stream_dropped_messages_total", plugin_id=PY)
            return now > dropped

        await eventually(overflowed, what="the slow subscriber's buffer overflowed")
        # The fast subscriber got every packet, in order, while the slow one was dropping.
        assert got == list(range(got[0], got[0] + len(got)))
        assert len(got) > BUFFER
        await fast.close()
    finally:
        slow.close()
    await no_streams_left(door)


# -- failures and restarts ---------------------------------------------------------------------


async def test_a_failed_run_stream_is_started_again(door: FrontDoor) -> None:
    path = stream_path("py", "ticks/fail", data={"intervalMs": 10, "fail": True})
    restarts = await metric(door, "grafana_bridge_stream_restarts_total", plugin_id=PY)
    ws = await connect(door, path)
    async with sse(door, path) as events:
        assert await next_json(ws) == {"path": "ticks/fail"}
        # Each RunStream sends tick 0 and fails; the bridge starts it again, subscribers stay.
        assert await ticks(ws, 3) == [0, 0, 0]
        notice = await events.next_of("restarting")
        assert notice["channel"] == "ds/py/ticks/fail"
        assert "stream failed on purpose" in notice["error"]
    await ws.close()
    await no_streams_left(door)
    assert await metric(door, "grafana_bridge_stream_restarts_total", plugin_id=PY) > restarts


# -- the Go fixture and app plugins ------------------------------------------------------------


async def test_go_fixture_streams_over_websocket_and_sse(door: FrontDoor) -> None:
    path = stream_path("go", "ticks/go", group=GO_GROUP)
    with plugin_log(GO) as log:
        ws = await connect(door, path)
        async with sse(door, path) as events:
            first = await ticks(ws, 2)
            assert first[1] == first[0] + 1
            tick = (await events.next_of("message"))["tick"]
            assert tick >= 1
            await ws.send_str('{"from":"ws"}')
            published = await events.next_of("message")
            while "tick" in published:
                published = await events.next_of("message")
            assert published == {"from": "ws"}
        await ws.close()
        finished = await log.wait_for("stream finished", endpoint="runStream", path="ticks/go")
        assert finished.plugin_fields["reason"] == "context canceled"  # type: ignore[attr-defined]
    ws = await connect(door, stream_path("go", "nope", group=GO_GROUP))
    assert await closed_with(ws) == (4404, "stream ds/go/nope not found")
    await no_streams_left(door)


async def test_app_plugin_streams(door: FrontDoor) -> None:
    ws = await connect(door, stream_path(None, "ticks/app", group=APP_GROUP))
    assert await next_json(ws) == {"path": "ticks/app"}
    assert door.bridge.streams.channels()[0].channel == f"plugin/{PY}/ticks/app"
    assert (await ticks(ws, 1)) == [0]
    await ws.close()
    await no_streams_left(door)


# -- a plugin crash (last: it restarts the module's Python fixture) ----------------------------


async def test_plugin_crash_mid_stream_restarts_the_stream(door: FrontDoor) -> None:
    path = stream_path("py", "ticks/crash", data={"intervalMs": 20})
    states = PluginStates(door.bridge, PY)
    ws = await connect(door, path)
    async with sse(door, path) as events:
        assert await next_json(ws) == {"path": "ticks/crash"}
        await ticks(ws, 3)
        pid = door.bridge.host.registry.status(PY).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        notice = await events.next_of("restarting")
        assert notice["channel"] == "ds/py/ticks/crash"
        await states.reach(PluginState.RUNNING, PluginState.RUNNING)
        # The new process runs a new RunStream for the subscribers that stayed.
        await eventually(lambda: _restarted(ws), what="ticks from the restarted plugin's stream")
        assert (await events.next_of("message"))["tick"] >= 0
    await ws.close()
    await no_streams_left(door)


async def _restarted(ws: aiohttp.ClientWebSocketResponse) -> bool:
    return (await ticks(ws, 1)) == [0]
