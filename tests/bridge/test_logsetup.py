"""Logging set-up: parser refusals become one warning line, never a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from aiohttp import web

from bridge.config import LoggingSettings
from bridge.logsetup import configure_logging
from tests.helpers import serving_app


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Records]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    server = logging.getLogger("aiohttp.server")
    saved_filters = server.filters[:]
    configure_logging(LoggingSettings(level="info"))
    records = Records()
    root.addHandler(records)
    try:
        yield records
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
        server.filters = saved_filters


async def test_a_request_the_parser_refuses_is_one_warning_without_traceback(
    captured: Records,
) -> None:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    async with serving_app(app) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    refusals = [r for r in captured.records if r.name == "aiohttp.server"]
    assert len(refusals) == 1
    [record] = refusals
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    message = record.getMessage()
    assert message.startswith("refused a malformed request from 127.0.0.1: ")
    assert "Transfer-Encoding" in message and "\n" not in message


def test_configuring_twice_installs_the_filter_once(captured: Records) -> None:
    configure_logging(LoggingSettings(level="info"))
    server = logging.getLogger("aiohttp.server")
    assert sum(type(f).__name__ == "MalformedRequestFilter" for f in server.filters) == 1
