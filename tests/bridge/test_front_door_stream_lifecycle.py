"""Streams under ``streams.overflow: disconnect``, and when the bridge shuts down.

Each test runs its own bridge with the Python fixture only; the clients are real (aiohttp
WebSocket and SSE clients, and a raw socket that stops reading after its handshake).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from bridge.app import build_app
from bridge.server import Bridge
from tests.bridge.conftest import (
    PY,
    WAIT,
    FrontDoor,
    auth_headers,
    eventually,
    front_door,
    sample,
)
from tests.bridge.test_front_door_stream import (
    connect,
    no_streams_left,
    stalled_websocket,
    stream_config,
    stream_path,
    ticks,
)


async def test_a_slow_subscriber_is_disconnected_and_the_others_go_on(tmp_path: Path) -> None:
    config = stream_config(
        tmp_path, **{"streams.overflow": "disconnect", "streams.buffer_size": 32}
    )
    path = stream_path("py", "ticks/flood", data={"intervalMs": 2, "pad": 16000})
    async with front_door(config) as door:
        slow = await stalled_websocket(door, path)
        try:
            fast = await connect(door, path)

            async def disconnected() -> bool:
                await ticks(fast, 10)
                text = await door.metrics()
                dropped = sample(
                    text, "grafana_bridge_stream_dropped_messages_total", reason="disconnect"
                )
                subscribers = sample(text, "grafana_bridge_stream_subscribers", plugin_id=PY)
                return bool(dropped) and subscribers == 1

            await eventually(disconnected, what="the slow subscriber was disconnected")
            # The bridge dropped the stalled connection; the fast subscriber still streams.
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(WAIT):
                while await loop.sock_recv(slow, 65536):
                    pass
            got = await ticks(fast, 20)
            assert got == list(range(got[0], got[0] + 20))
            await fast.close()
        finally:
            slow.close()
        await no_streams_left(door)


async def subscribe_both(
    session: aiohttp.ClientSession, door: FrontDoor, path: str
) -> tuple[aiohttp.ClientWebSocketResponse, aiohttp.ClientResponse, asyncio.Task[Any]]:
    """A WebSocket and an SSE subscriber of ``path``, and the hub's RunStream task."""
    ws = await connect(door, path, session=session)
    assert await ticks(ws, 1) == [0]
    headers = {**auth_headers("admin"), "Accept": "text/event-stream"}
    events = await session.get(door.target(path), headers=headers)
    assert events.status == 200
    assert await events.content.readline() == b'data: {"path":"ticks/shutdown"}\n'
    runner = next(t for t in asyncio.all_tasks() if t.get_name() == "stream ds/py/ticks/shutdown")
    return ws, events, runner


async def last_message(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    message = await ws.receive(timeout=WAIT)
    while message.type is WSMsgType.TEXT:
        message = await ws.receive(timeout=WAIT)
    return message


def stream_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(("stream ", "ws "))]


async def test_shutdown_says_goodbye_at_once(tmp_path: Path) -> None:
    """build_app closes the hub on aiohttp's ``on_shutdown``, before handlers are awaited."""
    path = stream_path("py", "ticks/shutdown", data={"intervalMs": 50})
    bridge = Bridge(stream_config(tmp_path))
    app = build_app(bridge)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=10)
    await runner.setup()
    async with aiohttp.ClientSession() as session:
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            door = FrontDoor(bridge, f"http://{host}:{port}", session)
            ws, events, stream = await subscribe_both(session, door, path)
        finally:
            started = time.monotonic()
            await runner.cleanup()
        # Well inside the 10 s grace: the subscribers were closed, not waited for.
        assert time.monotonic() - started < 5
        message = await last_message(ws)
        assert (message.type, message.data, message.extra) == (
            WSMsgType.CLOSE,
            1001,
            "the bridge is shutting down",
        )
        body = await asyncio.wait_for(events.content.read(), WAIT)
        assert body.endswith(
            b'event: end\ndata: {"code": 1001, "reason": "the bridge is shutting down"}\n\n'
        ), body
        events.release()
    assert stream.done()
    assert bridge.streams.channels() == []
    assert stream_tasks() == []
