"""``stream`` → Grafana Live streams: WebSocket or Server-Sent Events, and HTTP publish.

``GET`` with ``Upgrade: websocket`` subscribes over a WebSocket: frames arrive as text
messages, messages sent go to ``PublishStream``. Any other ``GET`` subscribes as an SSE
stream. ``POST`` publishes its body once. Each subscriber is authorised by ``SubscribeStream``
on its own; the plugin's ``RunStream`` is shared (bridge/streams.py). See docs/streams.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import WSMsgType, web

from bridge.apis import PluginType
from bridge.handlers.base import Call, Deps
from bridge.status import StatusError
from bridge.streams import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NOT_FOUND,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    HubClosed,
    Notice,
    StreamEnd,
    StreamFull,
    StreamHub,
    StreamKey,
    StreamStart,
    Subscriber,
)
from plugin_host.errors import PluginError
from protos.pluginv2 import backend_pb2 as pb

log = logging.getLogger(__name__)

# Grafana Live's channel path alphabet; the route table already refuses "..", "//" and "%2F".
_PATH = re.compile(r"[A-Za-z0-9_\-=./]+")
# RFC 6455 §5.5: a control frame's payload is at most 125 bytes, 2 of them the close code.
_MAX_REASON = 123
_SUBSCRIBE = pb.SubscribeStreamResponse
_PUBLISH = pb.PublishStreamResponse


async def handle_stream(call: Call, deps: Deps) -> web.StreamResponse:
    hub = deps.streams
    if hub is None:
        raise StatusError(503, "streams are not served by this bridge")
    request = call.request
    if request.method not in ("GET", "POST"):
        raise StatusError(
            405,
            f"method {request.method} is not allowed on a stream; use GET or POST",
            headers=(("Allow", "GET, POST"),),
        )
    path = call.params.get("path", "")
    if not _PATH.fullmatch(path):
        raise StatusError(400, f"invalid stream path {path!r}: use letters, digits and _ - = . /")
    service = call.match.service
    uid = call.params.get("uid", "") if service.plugin_type is PluginType.DATASOURCE else ""
    key = StreamKey(service.plugin_id, call.org_id, uid, path)

    def context() -> pb.PluginContext:
        if uid:
            return deps.contexts.for_datasource(call, uid)
        return deps.contexts.for_app(call)

    first = context()  # an unknown datasource is a 404 here, before any upgrade
    headers = deps.contexts.forwarded_headers(call, first)
    limit = hub.settings.max_message_bytes
    if request.method == "POST":
        return await _publish_http(
            call, deps, hub=hub, key=key, context=first, headers=headers, limit=limit
        )
    data = _subscribe_data(request, limit)
    start = StreamStart(context=context, data=data, headers=headers)
    ws = web.WebSocketResponse(max_msg_size=limit, heartbeat=hub.settings.ws_ping, autoping=True)
    if ws.can_prepare(request).ok:
        return await _websocket(call, deps, hub=hub, ws=ws, key=key, context=first, start=start)
    return await _sse(call, deps, hub=hub, key=key, context=first, start=start)


def _subscribe_data(request: web.Request, limit: int) -> bytes:
    """``?data=<JSON>``: the subscriber's request data, as a Live client's subscribe data."""
    raw = request.query.get("data")
    if raw is None:
        return b""
    encoded = raw.encode()
    if len(encoded) > limit:
        raise StatusError(413, f"stream data is {len(encoded)} bytes; the limit is {limit}")
    try:
        json.loads(encoded)
    except ValueError as exc:
        raise StatusError(400, f"stream data is not valid JSON: {exc}") from None
    return encoded


async def _subscribe(
    deps: Deps, key: StreamKey, context: pb.PluginContext, start: StreamStart
) -> pb.SubscribeStreamResponse:
    with deps.metrics.plugin_call(key.plugin_id, "subscribeStream"):
        return await deps.client(key.plugin_id).subscribe_stream(
            pb.SubscribeStreamRequest(
                pluginContext=context, path=key.path, data=start.data, headers=start.headers
            ),
            timeout=deps.call_timeout,
        )


def _refusal(key: StreamKey, status: int) -> tuple[int, int, str] | None:
    """(HTTP code, close code, reason) for a SubscribeStream/PublishStream status."""
    if status == _SUBSCRIBE.NOT_FOUND:
        return 404, CLOSE_NOT_FOUND, f"stream {key.channel} not found"
    if status == _SUBSCRIBE.PERMISSION_DENIED:
        return 403, CLOSE_POLICY, f"permission denied for stream {key.channel}"
    if status != _SUBSCRIBE.OK:
        return 502, CLOSE_INTERNAL, f"plugin answered with unknown stream status {status}"
    return None


# -- WebSocket ---------------------------------------------------------------------------------


async def _websocket(
    call: Call,
    deps: Deps,
    *,
    hub: StreamHub,
    ws: web.WebSocketResponse,
    key: StreamKey,
    context: pb.PluginContext,
    start: StreamStart,
) -> web.StreamResponse:
    await ws.prepare(call.request)
    subscriber: Subscriber | None = None
    writer: asyncio.Task[None] | None = None
    try:
        try:
            answer = await _subscribe(deps, key, context, start)
        except PluginError as exc:
            log.warning("stream %s: SubscribeStream failed: %s", key.channel, exc)
            await _close(ws, CLOSE_INTERNAL, str(exc))
            return ws
        refused = _refusal(key, answer.status)
        if refused is not None:
            log.info("stream %s refused: %s", key.channel, refused[2])
            await _close(ws, refused[1], refused[2])
            return ws
        try:
            subscriber = hub.join(key, start)
        except StreamFull as exc:
            log.warning("%s", exc)
            await _close(ws, CLOSE_TRY_AGAIN, str(exc))
            return ws
        except HubClosed as exc:
            await _close(ws, CLOSE_GOING_AWAY, str(exc))
            return ws
        subscriber.on_stuck = _aborter(call.request)
        if answer.data:
            await ws.send_str(answer.data.decode("utf-8", "replace"))
        writer = asyncio.create_task(_pump_ws(ws, subscriber), name=f"ws {key.channel}")
        async for message in ws:
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                data = message.data if isinstance(message.data, bytes) else message.data.encode()
                end = await _publish_ws(deps, hub, key, start, data)
                if end is not None:
                    await _close(ws, end.code, end.reason)
                    break
            elif message.type is WSMsgType.ERROR:
                # aiohttp has already closed with 1009 (too big) or 1002 (protocol error).
                log.info("stream %s: client WebSocket error: %s", key.channel, ws.exception())
                break
    except ConnectionError:
        pass  # the client went away mid-write; the subscription is cleaned up below
    except Exception:
        # The socket is upgraded: a Status answer cannot be sent any more (it would be written
        # into the WebSocket stream). Log it once and close with 1011 instead.
        log.exception("stream %s: unexpected failure; closing the WebSocket", key.channel)
        if not ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await _close(ws, CLOSE_INTERNAL, "internal error in the bridge")
    except asyncio.CancelledError:
        # The client went away, or the server is stopping: say goodbye if the socket is open.
        if not ws.closed:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1):
                    await _close(ws, CLOSE_GOING_AWAY, "the bridge is shutting down")
        raise
    finally:
        if subscriber is not None:
            subscriber.leave()
        if writer is not None:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    return ws


async def _pump_ws(ws: web.WebSocketResponse, subscriber: Subscriber) -> None:
    """Buffered frames to the client, one text message each; the end closes the socket."""
    try:
        while True:
            items = await subscriber.next_batch()
            if not items:
                break
            for item in items:
                if isinstance(item, bytes):
                    await ws.send_str(item.decode("utf-8", "replace"))
        end = subscriber.end or StreamEnd(CLOSE_INTERNAL, "stream ended")
        await _close(ws, end.code, end.reason)
    except ConnectionError:
        return  # the client is gone; the handler's read loop sees it and cleans up
    except Exception:
        # Never a silent subscriber: closing ends the handler's read loop, which cleans up.
        log.exception("stream %s: sending to a subscriber failed", subscriber.key.channel)
        with contextlib.suppress(Exception):
            await _close(ws, CLOSE_INTERNAL, "internal error in the bridge")


async def _publish_ws(
    deps: Deps, hub: StreamHub, key: StreamKey, start: StreamStart, data: bytes
) -> StreamEnd | None:
    """One client message → PublishStream; a refusal ends the connection."""
    try:
        answer = await _publish(deps, key, start.context(), data, start.headers)
    except (PluginError, StatusError) as exc:
        # Not fatal: the subscription outlives a plugin restart; the message is lost.
        log.warning("stream %s: PublishStream failed, message dropped: %s", key.channel, exc)
        return None
    refused = _refusal(key, answer.status)
    if refused is not None:
        log.info("stream %s: publish refused: %s", key.channel, refused[2])
        return StreamEnd(refused[1], "publish refused: " + refused[2])
    if answer.data:
        hub.publish(key, answer.data)
    return None


def _aborter(request: web.Request) -> Callable[[], None]:
    """Drops the connection at once (a close would wait for a client that stopped reading)."""

    def abort() -> None:
        if request.transport is not None:
            request.transport.abort()

    return abort


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    encoded = reason.encode()
    if len(encoded) > _MAX_REASON:
        encoded = encoded[: _MAX_REASON - 3].decode("utf-8", "ignore").encode() + b"..."
    await ws.close(code=code, message=encoded)


# -- Server-Sent Events ------------------------------------------------------------------------


async def _sse(
    call: Call,
    deps: Deps,
    *,
    hub: StreamHub,
    key: StreamKey,
    context: pb.PluginContext,
    start: StreamStart,
) -> web.StreamResponse:
    answer = await _subscribe(deps, key, context, start)
    refused = _refusal(key, answer.status)
    if refused is not None:
        raise StatusError(refused[0], refused[2])
    try:
        subscriber = hub.join(key, start)
    except StreamFull as exc:
        log.warning("%s", exc)
        raise StatusError(429, str(exc), retry_after=1.0) from None
    except HubClosed as exc:
        raise StatusError(503, str(exc), retry_after=1.0) from None
    subscriber.on_stuck = _aborter(call.request)
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Content-Type-Options": "nosniff",
            }
        )
        await response.prepare(call.request)
        heartbeat = hub.settings.heartbeat
        write = _bounded_writer(response, call.request, hub.settings.write_timeout)
        try:
            if answer.data:
                await write(_event(answer.data))
            while True:
                items = await subscriber.next_batch(timeout=heartbeat)
                if items:
                    await write(b"".join(_item_event(item) for item in items))
                elif subscriber.end is not None:
                    break
                else:
                    await write(b": heartbeat\n\n")
            end = subscriber.end
            if end is not None:
                body = {"code": end.code, "reason": end.reason}
                await write(_event(json.dumps(body).encode(), name="end"))
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; leaving below cancels the stream if it was the last
        except TimeoutError:
            # The client stopped reading: its socket buffers are full and nothing more can be
            # sent, not even an end event. Drop the connection so the slot (and, if it was the
            # last subscriber, the plugin's RunStream) is freed, as a WebSocket's ping would.
            log.warning(
                "stream %s: an SSE subscriber read nothing for %ss (streams.write_timeout); "
                "dropping it",
                key.channel,
                hub.settings.write_timeout,
            )
            _aborter(call.request)()
        return response
    finally:
        subscriber.leave()


def _bounded_writer(
    response: web.StreamResponse, request: web.Request, timeout: float
) -> Callable[[bytes], Awaitable[None]]:
    """``response.write`` that raises ``TimeoutError`` once the client has not taken the bytes
    for ``timeout`` seconds.

    Two checks, because aiohttp awaits the transport's drain only every 64 KiB written: a write
    that does wait is bounded by ``timeout``, and after every write the transport's own buffer
    is looked at, so bytes that have sat unsent for longer than ``timeout`` end it too. Bytes that
    still fit in the kernel's socket buffers are not seen by either: a client that stops
    reading a quiet stream (heartbeats only) is noticed once those are full.
    """
    loop = asyncio.get_running_loop()
    unsent_since: float | None = None

    async def write(data: bytes) -> None:
        nonlocal unsent_since
        async with asyncio.timeout(timeout):
            await response.write(data)
        transport = request.transport
        if transport is None or not transport.get_write_buffer_size():
            unsent_since = None
        elif unsent_since is None:
            unsent_since = loop.time()
        elif loop.time() - unsent_since > timeout:
            raise TimeoutError

    return write


def _item_event(item: bytes | Notice) -> bytes:
    if isinstance(item, Notice):
        return _event(json.dumps(dict(item.data)).encode(), name=item.event)
    return _event(item)


def _event(data: bytes, *, name: str | None = None) -> bytes:
    """One SSE event; a line break inside the data continues it on another ``data:`` line."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    head = b"event: " + name.encode() + b"\n" if name else b""
    return head + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


# -- HTTP publish ------------------------------------------------------------------------------


async def _publish(
    deps: Deps,
    key: StreamKey,
    context: pb.PluginContext,
    data: bytes,
    headers: Mapping[str, str],
) -> pb.PublishStreamResponse:
    sent = dict(headers)
    with deps.metrics.plugin_call(key.plugin_id, "publishStream"):
        return await deps.client(key.plugin_id).publish_stream(
            pb.PublishStreamRequest(pluginContext=context, path=key.path, data=data, headers=sent),
            timeout=deps.call_timeout,
        )


async def _publish_http(
    call: Call,
    deps: Deps,
    *,
    hub: StreamHub,
    key: StreamKey,
    context: pb.PluginContext,
    headers: dict[str, str],
    limit: int,
) -> web.StreamResponse:
    body = await _read_limited(call.request, limit)
    try:
        json.loads(body)
    except ValueError as exc:
        raise StatusError(400, f"a stream message must be JSON: {exc}") from None
    answer = await _publish(deps, key, context, body, headers)
    refused = _refusal(key, answer.status)
    if refused is not None:
        raise StatusError(refused[0], "publish refused: " + refused[2])
    delivered = hub.publish(key, answer.data) if answer.data else 0
    return web.json_response({"channel": key.channel, "subscribers": delivered})


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise StatusError(
            413, f"a stream message is at most {limit} bytes (streams.max_message_bytes)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise StatusError(
                413, f"a stream message is at most {limit} bytes (streams.max_message_bytes)"
            )
        chunks.append(chunk)
    return b"".join(chunks)
