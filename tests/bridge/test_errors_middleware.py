"""The error middleware over real sockets: a Status before the answer, a closed connection after."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import web

from bridge.app import errors_middleware, mark_response_started
from bridge.status import StatusError
from tests.helpers import serving_app


async def fails_before(_: web.Request) -> web.StreamResponse:
    raise StatusError(503, "plugin is restarting", retry_after=2)


async def fails_after(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b"first chunk\n")
    raise StatusError(502, "plugin went away mid-answer")


async def crashes_after(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"partial")
    raise RuntimeError("a bug after the answer began")


@pytest_asyncio.fixture
async def address() -> AsyncIterator[tuple[str, int]]:
    app = web.Application(middlewares=[errors_middleware])
    app.on_response_prepare.append(mark_response_started)
    app.router.add_get("/before", fails_before)
    app.router.add_get("/after", fails_after)
    app.router.add_get("/crash", crashes_after)
    async with serving_app(app) as address:
        yield address


async def exchange(address: tuple[str, int], path: str) -> bytes:
    """Everything the server sends for one keep-alive request, until it closes."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)  # must end: the server closes
    finally:
        writer.close()


async def test_a_failure_before_the_answer_is_a_status(address: tuple[str, int]) -> None:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(b"GET /before HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 503")
    assert b"Retry-After: 2" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = json.loads(await reader.readexactly(length))
    assert (body["kind"], body["code"], body["message"]) == ("Status", 503, "plugin is restarting")
    writer.close()


async def test_a_failure_after_the_answer_began_closes_the_connection(
    address: tuple[str, int],
) -> None:
    for path, started in (("/after", b"first chunk"), ("/crash", b"partial")):
        sent = await exchange(address, path)
        assert sent.startswith(b"HTTP/1.1 200")
        assert started in sent
        # No second status line or Status document inside the answer that had begun.
        assert sent.count(b"HTTP/1.1 ") == 1
        assert b'"kind"' not in sent
        # Chunked answers are left without their last chunk: the client sees them truncated.
        assert not sent.endswith(b"0\r\n\r\n")
