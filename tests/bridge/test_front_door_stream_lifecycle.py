"""Streams with settings of their own: ``streams.overflow: disconnect``, a stalled SSE client
under ``drop_oldest`` and ``streams.write_timeout``, restart backoff, and shutdown.

Each test runs its own bridge with the Python fixture only; the clients are real (aiohttp
WebSocket and SSE clients, and a raw socket that stops reading after its handshake).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
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
    sse,
    stalled_sse,
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


async def test_a_stalled_sse_subscriber_loses_messages_then_is_dropped(tmp_path: Path) -> None:
    """drop_oldest keeps a stalled SSE client subscribed, losing messages; once one write has
    waited streams.write_timeout it is dropped, and its slot and the stream go on without it."""
    write_timeout = 2.0
    config = stream_config(tmp_path, **{"streams.write_timeout": write_timeout})
    path = stream_path("py", "ticks/flood", data={"intervalMs": 2, "pad": 16000})
    async with front_door(config) as door:
        slow = await stalled_sse(door, path)
        try:
            fast = await connect(door, path)
            got: list[int] = []

            async def subscribers() -> float:
                return sample(await door.metrics(), "grafana_bridge_stream_subscribers") or 0.0

            async def overflowed() -> bool:
                got.extend(await ticks(fast, 10))
                text = await door.metrics()
                dropped = sample(
                    text, "grafana_bridge_stream_dropped_messages_total", reason="buffer_full"
                )
                return bool(dropped)

            await eventually(overflowed, what="the stalled SSE subscriber's buffer overflowed")
            # Dropping messages, not the subscriber: until write_timeout it is still there.
            overflowed_at = time.monotonic()
            assert await subscribers() == 2

            async def dropped() -> bool:
                got.extend(await ticks(fast, 10))
                return await subscribers() == 1

            await eventually(dropped, what="the stalled SSE subscriber was dropped")
            assert time.monotonic() - overflowed_at < write_timeout + 5
            # Its connection was aborted: what the kernel holds is readable, then it ends.
            await _read_to_the_end(slow)
            # The other subscriber got every packet in order throughout, and still does.
            got.extend(await ticks(fast, 20))
            assert got == list(range(got[0], got[0] + len(got)))
            await fast.close()
        finally:
            slow.close()
        await no_streams_left(door)


async def _read_to_the_end(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(WAIT):
            while await loop.sock_recv(sock, 65536):
                pass


async def test_restart_backoff_doubles_up_to_its_maximum(tmp_path: Path) -> None:
    """While the plugin is down every RunStream fails at once; the waits between the attempts
    (the `in` of SSE `restarting` events) double from restart_backoff to restart_max_backoff."""
    first, cap = 0.05, 0.2
    config = stream_config(
        tmp_path,
        **{
            "streams.restart_backoff": first,
            "streams.restart_max_backoff": cap,
            # The plugin stays down for 3 s: time for a dozen failed starts.
            "plugins.restart.initial_backoff": 3.0,
        },
    )
    path = stream_path("py", "ticks/backoff", data={"intervalMs": 20})
    async with front_door(config) as door, sse(door, path) as events:
        assert await events.next_of("message") == {"path": "ticks/backoff"}
        assert (await events.next_of("message"))["tick"] == 0
        pid = door.bridge.host.registry.status(PY).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        waits = [(await events.next_of("restarting"))["in"] for _ in range(7)]
        expected = [min(first * 2**n, cap) for n in range(7)]  # .05 .1 .2 .2 .2 .2 .2
        for got, want in zip(waits, expected, strict=True):
            assert want * 0.8 <= got <= want * 1.2, (waits, expected)  # ±20 % jitter
        # Once the plugin is back the stream delivers again.
        async with asyncio.timeout(WAIT):
            while "tick" not in await events.next_of("message"):
                pass


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
