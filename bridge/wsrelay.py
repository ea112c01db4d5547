"""Relaying one WebSocket to another, frame for frame, until either end closes.

The delegate uses it for WebSockets it hands to Grafana (Grafana Live, for one). Text, binary,
ping and pong frames go through unchanged; a close from either end is passed on and its echo
passed back (RFC 6455 §5.5.1); an end that vanishes without a close makes the relay tell the
other end why, with the code a gateway uses for it.
"""

from __future__ import annotations

import asyncio
from typing import Literal, NamedTuple, Protocol

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

__all__ = ["relay"]


class _WebSocket(Protocol):
    """What the relay needs from either end: aiohttp's client and server sockets both fit."""

    @property
    def closed(self) -> bool: ...

    @property
    def close_code(self) -> int | None: ...

    async def receive(self, timeout: float | None = None) -> aiohttp.WSMessage: ...

    async def send_str(self, data: str, compress: int | None = None) -> None: ...

    async def send_bytes(self, data: bytes, compress: int | None = None) -> None: ...

    async def ping(self, message: bytes = b"") -> None: ...

    async def pong(self, message: bytes = b"") -> None: ...

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"") -> bool: ...


class _End(NamedTuple):
    """How one direction of the relay ended."""

    how: Literal["closed", "source_broken", "target_broken"]
    code: int = 0
    reason: str = ""


async def _pump(source: _WebSocket, target: _WebSocket) -> _End:
    while True:
        message = await source.receive()
        try:
            if message.type is WSMsgType.TEXT:
                await target.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await target.send_bytes(message.data)
            elif message.type is WSMsgType.PING:
                await target.ping(message.data)
            elif message.type is WSMsgType.PONG:
                await target.pong(message.data)
            elif message.type is WSMsgType.CLOSE:
                return _End("closed", int(message.data or 0), message.extra or "")
            else:  # CLOSING (we are closing it), CLOSED or ERROR (the peer vanished or misbehaved)
                return _End("source_broken")
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            return _End("target_broken")


async def relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Relay frames both ways until either end closes, then close the other end too."""
    to_upstream = asyncio.create_task(_pump(client, upstream))
    to_client = asyncio.create_task(_pump(upstream, client))
    try:
        done, _ = await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
        if to_upstream in done:
            # The other pump is parked in upstream.receive(); upstream.close() wakes it through
            # aiohttp's own CLOSING message. Cancelling it instead would make aiohttp record
            # 1006 and skip reading Grafana's reply, losing the code to echo.
            await _finish(client, upstream, to_upstream.result(), source_is_client=True)
        else:
            # The reverse: WebSocketResponse.close() racing a parked receive() gives up on the
            # client's reply, while cancelling that receive() leaves no state behind.
            to_upstream.cancel()
            await asyncio.gather(to_upstream, return_exceptions=True)
            await _finish(upstream, client, to_client.result(), source_is_client=False)
    finally:
        for task in (to_upstream, to_client):
            task.cancel()
        await asyncio.gather(to_upstream, to_client, return_exceptions=True)
        if not client.closed:
            await client.close(code=WSCloseCode.GOING_AWAY)


async def _finish(
    source: _WebSocket, target: _WebSocket, end: _End, *, source_is_client: bool
) -> None:
    # What each side is told when the other vanished: the browser learns that the gateway's
    # upstream failed (1014); Grafana learns that its client went away (1001).
    lost_client, lost_upstream = WSCloseCode.GOING_AWAY, WSCloseCode.BAD_GATEWAY
    if end.how == "closed":
        await target.close(code=_sendable(end.code), message=end.reason.encode())
        # RFC 6455 §5.5.1: the close is echoed; pass back the code the far end replied with.
        reply = target.close_code
        await source.close(code=_sendable(reply if reply else end.code))
    elif end.how == "source_broken":
        await target.close(code=lost_client if source_is_client else lost_upstream)
        await source.close()
    else:
        await source.close(code=lost_upstream if source_is_client else lost_client)
        await target.close()


def _sendable(code: int) -> int:
    """A close code that may go on the wire (1005, 1006 and 1015 are reserved for reporting)."""
    if 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999:
        return code
    return int(WSCloseCode.OK)
