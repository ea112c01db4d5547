"""Delegation to Grafana, end to end: a real aiohttp server plays Grafana on a loopback port and
the bridge's proxy runs in its own aiohttp server in front of it, with the app's error
middleware. One row per behaviour, as in kube-aggregator's ``handler_proxy_test.go``."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import select
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict
from pydantic import ValidationError
from yarl import URL

from bridge.app import errors_middleware
from bridge.delegate import Delegate, DelegateSettings
from bridge.status import StatusError

WAIT = 10.0  # upper bound for anything awaited; the tests finish far sooner


# -- a stand-in Grafana --------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class FakeGrafana:
    """Grafana's role: records what reached it and plays the behaviour a path asks for."""

    url: str = ""
    runner: web.AppRunner | None = None
    seen: list[Seen] = field(default_factory=list)
    first_upload_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    release_stream: asyncio.Event = field(default_factory=asyncio.Event)
    handler_started: asyncio.Event = field(default_factory=asyncio.Event)
    handler_ended: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    ws_closed: asyncio.Future[tuple[int | None, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    apis: tuple[int, Any] = (200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    def app(self) -> web.Application:
        app = web.Application()
        add = app.router.add_route
        add("*", "/status/{code}", self.status)
        add("*", "/cookies", self.cookies)
        add("GET", "/gzip", self.gzipped)
        add("POST", "/upload", self.upload)
        add("GET", "/stream", self.stream)
        add("GET", "/stream-forever", self.stream_forever)
        add("*", "/hang", self.hang)
        add("GET", "/ws", self.websocket)
        add("GET", "/ws-denied", self.ws_denied)
        add("GET", "/apis", self.discovery)
        add("GET", "/api/user", self.user)
        add("GET", "/not-json", self.not_json)
        add("GET", "/hop", self.hop)
        add("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            Seen(request.method, request.raw_path, list(request.headers.items()), body)
        )
        return web.json_response({"method": request.method, "path": request.raw_path})

    async def status(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.raw_path, [], b""))
        code = int(request.match_info["code"])
        body = None if code in (204, 304) else b"grafana says %d" % code
        return web.Response(status=code, body=body, headers={"X-Grafana": "yes"})

    async def cookies(self, request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "grafana_session=abc; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "grafana_session_expiry=123; Path=/")
        return response

    async def hop(self, request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Hop-Response",
                "X-Hop-Response": "1",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-End-To-End": "kept",
            },
        )

    async def gzipped(self, request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"compressed " * 100),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def upload(self, request: web.Request) -> web.Response:
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                self.first_upload_chunk.set()
        except asyncio.CancelledError:
            self._ended("cancelled")
            raise
        except (ConnectionError, aiohttp.ClientPayloadError):
            self._ended("connection closed")
            raise
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()), b""))
        return web.json_response({"bytes": size})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first;")
        await asyncio.wait_for(self.release_stream.wait(), WAIT)
        await response.write(b"last")
        await response.write_eof()
        return response

    async def stream_forever(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        self.handler_started.set()
        try:
            while True:
                await response.write(b"x" * 65536)
        except asyncio.CancelledError:
            self._ended("cancelled")
            raise
        except ConnectionError:
            self._ended("connection closed")
        return response

    async def hang(self, request: web.Request) -> web.Response:
        self.handler_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self._ended("cancelled")
            raise
        raise AssertionError("unreachable")

    def _ended(self, how: str) -> None:
        if not self.handler_ended.done():
            self.handler_ended.set_result(how)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        # autoclose off: the reply to a client's close is 4003, so the test can tell it apart
        ws = web.WebSocketResponse(protocols=("grafana-live",), autoclose=False)
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT and message.data == "close-me":
                await ws.close(code=4002, message=b"done")
            elif message.type is WSMsgType.TEXT and message.data.startswith("send-me:"):
                await ws.send_bytes(b"g" * int(message.data.removeprefix("send-me:")))
            elif message.type is WSMsgType.TEXT:
                await ws.send_str(message.data)
            elif message.type is WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        received = ws.close_code
        await ws.close(code=4003)
        if not self.ws_closed.done():
            self.ws_closed.set_result((received, request.headers.get("Origin", "")))
        return ws

    async def ws_denied(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="forbidden")

    async def discovery(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()), b""))
        code, body = self.apis
        return web.json_response(body, status=code)

    async def user(self, request: web.Request) -> web.Response:
        return web.json_response({"login": "admin", "auth": request.headers.get("Authorization")})

    async def not_json(self, request: web.Request) -> web.Response:
        return web.Response(text="<html>login</html>", content_type="text/html")


# -- wiring ----------------------------------------------------------------------------------


@asynccontextmanager
async def serve(
    app: web.Application, *, tls: ssl.SSLContext | None = None, **kwargs: Any
) -> AsyncIterator[tuple[str, web.AppRunner]]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0, **kwargs)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}", runner
    finally:
        await runner.cleanup()


@dataclass
class Bridge:
    url: str
    port: int
    delegate: Delegate
    observed: asyncio.Queue[tuple[str, int, float]]


@asynccontextmanager
async def bridge(
    settings: DelegateSettings, *, server: dict[str, Any] | None = None, **options: Any
) -> AsyncIterator[Bridge]:
    """The proxy as the bridge mounts it: a catch-all behind ``errors_middleware``."""
    observed: asyncio.Queue[tuple[str, int, float]] = asyncio.Queue()
    options.setdefault("watch_interval", 0.05)
    delegate = Delegate(settings, observe=lambda m, c, s: observed.put_nowait((m, c, s)), **options)
    app = web.Application(middlewares=[errors_middleware])
    app.router.add_route("*", "/{tail:.*}", delegate.proxy)
    async with delegate, serve(app, **(server or {})) as (url, _):
        yield Bridge(url, URL(url).port or 0, delegate, observed)


def settings_for(grafana: FakeGrafana, **overrides: Any) -> DelegateSettings:
    return DelegateSettings(**{"url": grafana.url, "read_timeout": 5.0, **overrides})


@pytest.fixture
async def grafana() -> AsyncIterator[FakeGrafana]:
    fake = FakeGrafana()
    # handler_cancellation: Grafana's handlers see it when the bridge drops the connection.
    # auto_decompress off: the bodies it records are the bytes on the wire.
    async with serve(fake.app(), handler_cancellation=True, auto_decompress=False) as (
        url,
        runner,
    ):
        fake.url, fake.runner = url, runner
        yield fake


@pytest.fixture
async def proxy(grafana: FakeGrafana) -> AsyncIterator[Bridge]:
    async with bridge(settings_for(grafana)) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    """Send bytes exactly as given and read the whole answer (requests carry Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def listener_that_never_accepts() -> Iterator[int]:
    """A loopback port that is listened on but whose accept queue is full, so a new connection
    never completes: the kernel drops its SYNs and the dialler waits until its own timeout.

    ``listen(0)`` leaves room for one connection that nobody accepts; filler connections take
    it, and the first one left hanging shows that the queue is full.
    """
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        for _ in range(16):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with suppress(BlockingIOError):  # in progress: select says when it completed
                filler.connect(("127.0.0.1", port))
            _, connected, _ = select.select([], [filler], [], 0.2)
            if not connected:
                break
        else:
            raise AssertionError(f"the accept queue of port {port} never filled up")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def assert_status(body: Any, code: int) -> None:
    assert body["kind"] == "Status"
    assert body["status"] == "Failure"
    assert body["code"] == code


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://grafana", "http:// or https://"),
        ("http:///path", "has no host"),
        ("http://grafana:99999", "not a valid URL"),
        ("http://user:secret@grafana", "credentials"),
        ("http://grafana/?orgId=1", "query or fragment"),
        ("http://grafana/#x", "query or fragment"),
        ("grafana:3000", "http:// or https://"),
    ],
)
def test_settings_reject_bad_urls(url: str, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        DelegateSettings(url=url)


@pytest.mark.parametrize(
    "url",
    [None, "", "http://127.0.0.1:3000", "https://grafana.example.com/sub/", "http://[::1]:3000"],
)
def test_settings_accept_good_urls(url: str | None) -> None:
    settings = DelegateSettings(url=url)
    assert settings.url == (url or None)
    assert settings.connect_timeout == 5 and settings.read_timeout == 300
    assert settings.max_connections == 256 and settings.tls_verify and not settings.preserve_host


def test_settings_are_strict() -> None:
    with pytest.raises(ValidationError):
        DelegateSettings(url="http://g", unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="no such file"):
        DelegateSettings(url="https://g", ca_file="/nonexistent/ca.pem")
    with pytest.raises(ValidationError, match="tls_verify"):
        DelegateSettings(url="https://g", tls_verify=False, ca_file=__file__)


# -- requests pass through unchanged -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        pytest.param("GET", "/api/search?query=a%2Fb&tag=x+y&name=%C3%A9t%C3%A9", b"", id="get"),
        pytest.param("POST", "/api/ds/query?from=now-1h&to=now", b'{"queries":[]}', id="post"),
        pytest.param("PUT", "/api/dashboards/uid/a%2Fb%20c?overwrite=true", b"{}", id="put"),
        pytest.param("DELETE", "/api/folders/%E2%9C%93?forceDeleteRules=false", b"", id="delete"),
        pytest.param("PATCH", "/api/x?a=1&a=2&empty=&flag", b"patch", id="patch-repeated-query"),
        pytest.param("GET", "/public/../api?q=%2e%2e", b"", id="dot-segments-kept-without-prefix"),
    ],
)
async def test_request_passes_through_unchanged(
    proxy: Bridge, grafana: FakeGrafana, method: str, target: str, body: bytes
) -> None:
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: bridge.example\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\nX-Custom: kept\r\n\r\n"
    ).encode() + body
    status, _, _ = await raw_exchange(proxy.port, request)
    assert status == 200
    (seen,) = grafana.seen
    assert (seen.method, seen.raw_path, seen.body) == (method, target, body)
    assert seen.header("X-Custom") == "kept"
    # aiohttp's client must not add headers the browser never sent
    for added in ("User-Agent", "Accept", "Accept-Encoding", "Content-Type"):
        assert seen.header(added) is None


async def test_sub_path_delegate(grafana: FakeGrafana, client: aiohttp.ClientSession) -> None:
    async with bridge(DelegateSettings(url=grafana.url + "/grafana/")) as running:
        target = URL(running.url + "/api/a%2Fb?x=%2F+", encoded=True)
        async with client.get(target) as response:
            assert response.status == 200
        escape = URL(running.url + "/public/..%2F..%2Fadmin", encoded=True)
        async with client.get(escape) as response:
            assert response.status == 400
            assert_status(await response.json(), 400)
    assert [s.raw_path for s in grafana.seen] == ["/grafana/api/a%2Fb?x=%2F+"]


async def test_hop_by_hop_headers_dropped_and_forwarded_headers_added(
    proxy: Bridge, grafana: FakeGrafana
) -> None:
    request = (
        b"GET /api/health HTTP/1.1\r\nHost: bridge.example:8443\r\n"
        b"Connection: close, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nTrailer: X-T\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: ftp\r\nX-Forwarded-Host: evil\r\n"
        b"Cookie: grafana_session=abc\r\nAuthorization: Bearer t\r\n\r\n"
    )
    status, _, _ = await raw_exchange(proxy.port, request)
    assert status == 200
    (seen,) = grafana.seen
    for dropped in (
        "X-Hop",
        "Keep-Alive",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Upgrade",
        "Trailer",
    ):
        assert seen.header(dropped) is None, dropped
    assert seen.header("Host") == URL(grafana.url).raw_authority
    assert seen.header("X-Forwarded-For") == "203.0.113.7, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "http"
    assert seen.header("X-Forwarded-Host") == "bridge.example:8443"
    assert seen.header("Cookie") == "grafana_session=abc"
    assert seen.header("Authorization") == "Bearer t"


async def test_expect_continue_is_answered_here_and_not_forwarded(
    proxy: Bridge, grafana: FakeGrafana
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        b"POST /api/x HTTP/1.1\r\nHost: b\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT) == (
        b"HTTP/1.1 100 Continue\r\n\r\n"
    )
    writer.write(b"hello")
    await writer.drain()
    assert (await asyncio.wait_for(reader.read(), WAIT)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    await writer.wait_closed()
    (seen,) = grafana.seen
    assert (seen.body, seen.header("Expect")) == (b"hello", None)


async def test_unknown_method_passes_and_is_counted_as_other(
    proxy: Bridge, grafana: FakeGrafana
) -> None:
    status, _, _ = await raw_exchange(
        proxy.port, b"PROPFIND /dav HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert grafana.seen[0].method == "PROPFIND"
    method, code, _ = await proxy.observed.get()
    assert (method, code) == ("OTHER", 200)  # free-form methods must not grow metric labels


async def test_preserve_host(grafana: FakeGrafana) -> None:
    async with bridge(settings_for(grafana, preserve_host=True)) as running:
        request = b"GET / HTTP/1.1\r\nHost: grafana.example\r\nConnection: close\r\n\r\n"
        await raw_exchange(running.port, request)
    assert grafana.seen[0].header("Host") == "grafana.example"


@pytest.mark.parametrize(
    ("server_decodes", "delegate_option", "expect_encoding"),
    [
        pytest.param(True, True, None, id="aiohttp-decodes-then-forwarded-decoded"),
        pytest.param(False, False, "gzip", id="byte-exact-when-server-does-not-decode"),
    ],
)
async def test_compressed_request_body(
    grafana: FakeGrafana, server_decodes: bool, delegate_option: bool, expect_encoding: str | None
) -> None:
    plain = b"query " * 1000
    packed = gzip.compress(plain)
    async with bridge(
        settings_for(grafana),
        server={"auto_decompress": server_decodes},
        request_bodies_decoded=delegate_option,
    ) as running:
        request = (
            f"POST /api/ds/query HTTP/1.1\r\nHost: b\r\nConnection: close\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(packed)}\r\n\r\n"
        ).encode() + packed
        status, _, _ = await raw_exchange(running.port, request)
    assert status == 200
    (seen,) = grafana.seen
    assert seen.header("Content-Encoding") == expect_encoding
    assert seen.body == (plain if expect_encoding is None else packed)


# -- responses pass back unchanged -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "code", "body"),
    [
        ("GET", 200, b"grafana says 200"),
        ("GET", 204, b""),
        ("GET", 304, b""),
        ("GET", 404, b"grafana says 404"),
        ("POST", 500, b"grafana says 500"),
        ("HEAD", 200, b""),
    ],
)
async def test_status_codes_pass_through(
    proxy: Bridge, client: aiohttp.ClientSession, method: str, code: int, body: bytes
) -> None:
    async with client.request(method, f"{proxy.url}/status/{code}") as response:
        assert response.status == code
        assert response.headers["X-Grafana"] == "yes"
        assert await response.read() == body
        if method == "HEAD":
            assert response.headers["Content-Length"] == str(len(b"grafana says 200"))
    observed_method, observed_code, seconds = await proxy.observed.get()
    assert (observed_method, observed_code) == (method, code)
    assert 0 <= seconds < WAIT


async def test_multiple_set_cookie_headers_kept(
    proxy: Bridge, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/cookies") as response:
        assert response.headers.getall("Set-Cookie") == [
            "grafana_session=abc; Path=/; HttpOnly",
            "grafana_session_expiry=123; Path=/",
        ]


async def test_response_hop_by_hop_headers_dropped(proxy: Bridge) -> None:
    _, headers, _ = await raw_exchange(
        proxy.port, b"GET /hop HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )
    assert "x-hop-response" not in headers
    assert "keep-alive" not in headers
    assert "proxy-authenticate" not in headers
    assert headers["x-end-to-end"] == ["kept"]


async def test_gzip_body_passes_compressed(proxy: Bridge, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{proxy.url}/gzip") as response:
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(raw))
        assert gzip.decompress(raw) == b"compressed " * 100


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_request_body_is_streamed(
    proxy: Bridge, grafana: FakeGrafana, client: aiohttp.ClientSession, framing: str
) -> None:
    chunk = b"\0" * (1 << 20)
    total = 50

    async def body() -> AsyncIterator[bytes]:
        for index in range(total):
            if index == 4:
                # Grafana must see bytes while most of the 50 MB are still unsent;
                # a buffering proxy would never get here.
                await asyncio.wait_for(grafana.first_upload_chunk.wait(), WAIT)
            yield chunk

    headers = {"Content-Length": str(total * len(chunk))} if framing == "content-length" else {}
    async with client.post(f"{proxy.url}/upload", data=body(), headers=headers) as response:
        assert response.status == 200
        assert await response.json() == {"bytes": total * len(chunk)}
    (seen,) = grafana.seen
    if framing == "content-length":
        assert seen.header("Content-Length") == str(total * len(chunk))
    else:
        assert seen.header("Transfer-Encoding") == "chunked"


async def test_response_is_streamed(
    proxy: Bridge, grafana: FakeGrafana, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.url}/stream") as response:
        first = await asyncio.wait_for(response.content.readany(), WAIT)
        assert first == b"first;"  # arrived while Grafana still holds back the rest
        grafana.release_stream.set()
        assert await response.content.read() == b"last"


@pytest.mark.parametrize(
    ("answer", "code", "length", "body"),
    [
        # aiohttp's response parser refuses ambiguous framing: no length is ever re-emitted
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            502,
            None,
            None,
            id="length-and-chunked",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
            502,
            None,
            None,
            id="two-lengths",
        ),
        pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", 502, None, None, id="bad-status-line"),
        # the body breaks off after the headers: the client sees the connection end short
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
            200,
            ["10"],
            b"hello",
            id="short-body",
        ),
    ],
)
async def test_broken_answers_from_grafana(
    answer: bytes, code: int, length: list[str] | None, body: bytes | None
) -> None:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(reply, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with bridge(DelegateSettings(url=f"http://127.0.0.1:{port}")) as running:
            status, headers, received = await raw_exchange(
                running.port, b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
            )
    finally:
        server.close()
        await server.wait_closed()
    assert status == code
    if body is None:
        assert_status(json.loads(received), code)
        assert "invalid response" in json.loads(received)["message"]
    else:
        assert headers.get("content-length") == length
        assert received == body


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: Grafana behind TLS with a private CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.parametrize(
    ("options", "code"),
    [
        pytest.param({"ca_file": "CERT"}, 200, id="verified-with-ca-file"),
        pytest.param({}, 502, id="unknown-ca-refused"),
        pytest.param({"tls_verify": False}, 200, id="verification-off"),
    ],
)
async def test_tls_delegate(
    certificate: tuple[Path, Path],
    client: aiohttp.ClientSession,
    options: dict[str, Any],
    code: int,
) -> None:
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    options = {k: cert if v == "CERT" else v for k, v in options.items()}
    async with (
        serve(FakeGrafana().app(), tls=tls) as (url, _),
        bridge(DelegateSettings(url=url, **options)) as running,
        client.get(f"{running.url}/api/health") as response,
    ):
        assert response.status == code
        if code == 502:
            message = (await response.json())["message"]
            assert "the TLS handshake with the Grafana delegate failed" in message
            assert "127.0.0.1" not in message  # a certificate is not retried: 502, not 503


# -- failures ----------------------------------------------------------------------------------


async def test_no_delegate_is_404_status(client: aiohttp.ClientSession) -> None:
    async with (
        bridge(DelegateSettings()) as running,
        client.get(f"{running.url}/api/health") as response,
    ):
        assert response.status == 404
        body = await response.json()
    assert_status(body, 404)
    assert "no delegate is configured" in body["message"]


@asynccontextmanager
async def unreachable(how: str) -> AsyncIterator[str]:
    """A delegate URL at which Grafana cannot be reached, in the way ``how`` names."""
    if how == "refused":
        yield f"http://127.0.0.1:{free_port()}"
        return
    if how == "dns":
        yield "http://grafana.invalid:3000"  # RFC 6761: never resolves
        return

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Grafana dying under the request: it reads the request, then the connection ends
        # without a byte of answer, politely (FIN) or abruptly (RST).
        await reader.readuntil(b"\r\n\r\n")
        if how == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("how", ["refused", "dns"])
async def test_unreachable_delegate_is_503_with_retry_after_quickly(
    client: aiohttp.ClientSession, how: str
) -> None:
    """As kube-aggregator answers for a backend it cannot reach: 503, try again shortly."""
    async with (
        unreachable(how.removesuffix("-before-answer")) as url,
        bridge(DelegateSettings(url=url)) as running,
    ):
        async with asyncio.timeout(3), client.post(f"{running.url}/x", data=b"{}") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            body = await response.json()
        method, code, seconds = await running.observed.get()
        assert (method, code) == ("POST", 503)
        assert seconds < 3
        # a WebSocket upgrade gets the same answer, before the client is upgraded
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await client.ws_connect(f"{running.url}/ws")
        assert caught.value.status == 503
    assert_status(body, 503)
    assert body["reason"] == "ServiceUnavailable"
    assert "the Grafana delegate could not be reached" in body["message"]
    address = URL(url)
    assert str(address.host) not in body["message"] and str(address.port) not in body["message"]


@pytest.mark.parametrize("how", ["closed", "reset"])
@pytest.mark.parametrize(("method", "code"), [("GET", 503), ("PUT", 503), ("POST", 502)])
async def test_grafana_hanging_up_under_a_request_is_retryable_only_when_safe(
    client: aiohttp.ClientSession, how: str, method: str, code: int
) -> None:
    """The request reached Grafana, which may have acted on it: 503 with Retry-After only for
    a method that is safe to repeat (RFC 9110 idempotent); a POST gets 502, no invitation."""
    async with unreachable(how) as url, bridge(DelegateSettings(url=url)) as running:
        async with (
            asyncio.timeout(3),
            client.request(method, f"{running.url}/x", data=b"{}") as response,
        ):
            assert response.status == code
            assert ("Retry-After" in response.headers) is (code == 503)
            body = await response.json()
        assert (await running.observed.get())[:2] == (method, code)
    assert_status(body, code)
    assert "the connection to the Grafana delegate broke before it answered" in body["message"]


async def test_delegate_hangs_is_504_within_read_timeout(
    grafana: FakeGrafana, client: aiohttp.ClientSession
) -> None:
    async with bridge(settings_for(grafana, read_timeout=0.3)) as running:
        async with asyncio.timeout(3):
            async with client.get(f"{running.url}/hang") as response:
                assert response.status == 504
                assert_status(await response.json(), 504)
    # the bridge dropped the connection, so Grafana's handler did not linger either
    assert await asyncio.wait_for(grafana.handler_ended, WAIT) == "cancelled"


async def test_stalled_upload_is_408_not_a_hang(grafana: FakeGrafana) -> None:
    async with bridge(settings_for(grafana, read_timeout=0.3)) as running:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: 1000\r\n\r\n12345")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 3)
        writer.close()
        await writer.wait_closed()
        assert status_line.startswith(b"HTTP/1.1 408 ")
        # Grafana's half-received request was dropped with the connection, not left waiting
        assert await asyncio.wait_for(grafana.handler_ended, WAIT) in (
            "cancelled",
            "connection closed",
        )


async def test_grafana_not_reading_an_upload_is_504_not_a_hang(
    grafana: FakeGrafana, client: aiohttp.ClientSession
) -> None:
    chunk = b"\0" * (1 << 20)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(200):  # far more than the socket buffers in between can hold
            yield chunk

    async with bridge(settings_for(grafana, read_timeout=0.3)) as running:
        async with asyncio.timeout(5):
            async with client.post(f"{running.url}/hang", data=body()) as response:
                assert response.status == 504
                assert_status(await response.json(), 504)
        # Grafana has stopped reading, so it cannot notice anything; the bridge's socket to it
        # must still go away rather than wait forever to flush (TCP_USER_TIMEOUT, Linux).
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            await _until(lambda: not sockets_to(grafana))


def sockets_to(grafana: FakeGrafana) -> list[Any]:
    port = URL(grafana.url).port
    return [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port]


async def _until(condition: Callable[[], bool]) -> None:
    """For kernel-side teardown, which has no event to await: look again every 50 ms."""
    async with asyncio.timeout(WAIT):
        for _ in itertools.count():
            if condition():
                return
            await asyncio.sleep(0.05)


async def test_connect_timeout_is_504_within_connect_timeout(
    client: aiohttp.ClientSession,
) -> None:
    """Grafana's host takes no new connection (accept queue full): 504 after connect_timeout,
    and the bridge keeps serving."""
    with listener_that_never_accepts() as port:
        settings = DelegateSettings(url=f"http://127.0.0.1:{port}", connect_timeout=0.3)
        async with bridge(settings) as running:
            for _ in range(2):  # the second request is not stuck behind the first
                async with asyncio.timeout(3), client.get(f"{running.url}/api/x") as response:
                    assert response.status == 504
                    body = await response.json()
                method, code, seconds = await running.observed.get()
                assert (method, code) == ("GET", 504)
                assert 0.3 <= seconds < 2
    assert_status(body, 504)
    assert "could not connect to the Grafana delegate within 0.3s" in body["message"]
    assert str(port) not in body["message"]


async def test_pool_exhaustion_is_504_not_a_hang(
    grafana: FakeGrafana, client: aiohttp.ClientSession
) -> None:
    settings = settings_for(grafana, max_connections=1, connect_timeout=0.3)
    async with bridge(settings) as running:
        hanging = asyncio.create_task(client.get(f"{running.url}/hang"))
        await asyncio.wait_for(grafana.handler_started.wait(), WAIT)
        async with asyncio.timeout(3):
            async with client.get(f"{running.url}/api/health") as response:
                assert response.status == 504
        hanging.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hanging


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_client_disconnect_while_waiting_cancels_upstream(
    grafana: FakeGrafana, handler_cancellation: bool
) -> None:
    server = {"handler_cancellation": handler_cancellation}
    # read_timeout far beyond the wait below: only noticing the disconnect can end it in time
    async with bridge(settings_for(grafana, read_timeout=60), server=server) as running:
        _, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: b\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(grafana.handler_started.wait(), WAIT)
        writer.close()
        await writer.wait_closed()
        assert await asyncio.wait_for(grafana.handler_ended, 3) == "cancelled"
        method, code, _ = await asyncio.wait_for(running.observed.get(), WAIT)
        assert (method, code) == ("GET", 499)
        # Grafana's handler is cancelled from connection_lost, so the bridge's connection to it
        # is already gone from Grafana's side: nothing leaked.
        assert grafana.runner is not None and grafana.runner.server is not None
        assert grafana.runner.server.connections == []


async def test_client_disconnect_mid_upload_closes_upstream(
    proxy: Bridge, grafana: FakeGrafana
) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: b\r\nContent-Length: 10000000\r\n\r\n")
    writer.write(b"\0" * 100_000)
    await writer.drain()
    await asyncio.wait_for(grafana.first_upload_chunk.wait(), WAIT)
    writer.transport.abort()
    assert await asyncio.wait_for(grafana.handler_ended, WAIT) in ("cancelled", "connection closed")
    _, code, _ = await asyncio.wait_for(proxy.observed.get(), WAIT)
    assert code == 499


async def test_client_disconnect_mid_stream_closes_upstream(
    proxy: Bridge, grafana: FakeGrafana
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"GET /stream-forever HTTP/1.1\r\nHost: b\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    await asyncio.wait_for(reader.read(1024), WAIT)
    writer.transport.abort()
    assert await asyncio.wait_for(grafana.handler_ended, WAIT) in ("cancelled", "connection closed")
    _, code, _ = await asyncio.wait_for(proxy.observed.get(), WAIT)
    assert code == 200  # the status line had gone out before the client left


# -- request smuggling -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_head", "code", "status_body"),
    [
        # aiohttp's own parser refuses these before any handler runs (plain-text 400)
        (b"POST /api HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400, False),
        (b"POST /api HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400, False),
        (b"POST /api HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n", 400, False),
        (b"POST /api HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n", 400, False),
        (b"POST /api HTTP/1.1\r\nTransfer-Encoding : chunked\r\n", 400, False),
        # aiohttp accepts these; the proxy refuses them
        (b"POST /api HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n", 501, True),
        (b"POST /api HTTP/1.0\r\nTransfer-Encoding: chunked\r\n", 400, True),
    ],
)
async def test_ambiguous_framing_is_rejected_and_never_forwarded(
    proxy: Bridge, grafana: FakeGrafana, request_head: bytes, code: int, status_body: bool
) -> None:
    request = request_head + b"Host: b\r\nConnection: close\r\n\r\n0\r\n\r\n"
    if not status_body:
        # what a smuggler hides behind the ambiguous body; aiohttp drops the connection
        request += b"GET /smuggled HTTP/1.1\r\nHost: b\r\n\r\n"
    status, _, body = await raw_exchange(proxy.port, request)
    assert status == code
    if status_body:
        assert_status(json.loads(body), code)
    assert grafana.seen == []


async def test_framing_check_is_a_second_line_of_defence(proxy: Bridge) -> None:
    """What aiohttp's parser would refuse, the proxy refuses too if a request ever carries it."""
    headers = CIMultiDict([("Content-Length", "5"), ("Transfer-Encoding", "chunked")])
    with pytest.raises(StatusError) as caught:
        await proxy.delegate.proxy(make_mocked_request("POST", "/api", headers=headers))
    assert caught.value.code == 400
    twice = CIMultiDict([("Content-Length", "5"), ("Content-Length", "6")])
    with pytest.raises(StatusError) as caught:
        await proxy.delegate.proxy(make_mocked_request("POST", "/api", headers=twice))
    assert caught.value.code == 400


# -- WebSocket ---------------------------------------------------------------------------------


async def test_websocket_round_trip_and_client_close_code(
    proxy: Bridge, grafana: FakeGrafana, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(
        f"{proxy.url}/ws", protocols=("grafana-live",), autoping=False, origin="http://b"
    ) as ws:
        assert ws.protocol == "grafana-live"
        await ws.send_str("héllo")
        assert (await ws.receive(timeout=WAIT)).data == "héllo"
        assert len(_relay_tasks()) == 2  # one pump per direction while the socket is open
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=WAIT)).data == b"\x00\x01"
        await ws.ping(b"are you there")
        pong = await ws.receive(timeout=WAIT)  # answered by Grafana, not by the bridge
        assert (pong.type, pong.data) == (WSMsgType.PONG, b"are you there")
        await ws.close(code=4001, message=b"bye")
        assert ws.close_code == 4003  # Grafana's reply, relayed back
    assert await asyncio.wait_for(grafana.ws_closed, WAIT) == (4001, "http://b")
    method, code, _ = await asyncio.wait_for(proxy.observed.get(), WAIT)
    assert (method, code) == ("GET", 101)
    assert _relay_tasks() == []


async def test_websocket_upstream_close_closes_client(
    proxy: Bridge, grafana: FakeGrafana, client: aiohttp.ClientSession
) -> None:
    async with client.ws_connect(f"{proxy.url}/ws", autoclose=False) as ws:
        await ws.send_str("close-me")
        message = await ws.receive(timeout=WAIT)
        assert (message.type, message.data, message.extra) == (WSMsgType.CLOSE, 4002, "done")
        await ws.close(code=4004)
    assert (await asyncio.wait_for(grafana.ws_closed, WAIT))[0] == 4004  # our reply reached Grafana
    await asyncio.wait_for(proxy.observed.get(), WAIT)
    assert _relay_tasks() == []


async def test_websocket_client_vanishing_closes_upstream(
    proxy: Bridge, grafana: FakeGrafana, client: aiohttp.ClientSession
) -> None:
    ws = await client.ws_connect(f"{proxy.url}/ws")
    await ws.send_str("ping")
    assert (await ws.receive(timeout=WAIT)).data == "ping"
    ws._response.connection.transport.abort()  # type: ignore[union-attr]  # a dead peer, no close frame
    code, _ = await asyncio.wait_for(grafana.ws_closed, WAIT)
    assert code == 1001
    await asyncio.wait_for(proxy.observed.get(), WAIT)
    assert _relay_tasks() == []
    await ws.close()


WS_LIMIT = 1024


@pytest.mark.parametrize("size", [WS_LIMIT, WS_LIMIT + 1])
async def test_websocket_message_limit_from_the_client(
    grafana: FakeGrafana, client: aiohttp.ClientSession, size: int
) -> None:
    async with (
        bridge(settings_for(grafana, max_ws_message_bytes=WS_LIMIT)) as running,
        client.ws_connect(f"{running.url}/ws", max_msg_size=0) as ws,
    ):
        await ws.send_bytes(b"c" * size)
        message = await ws.receive(timeout=WAIT)
        if size <= WS_LIMIT:
            assert (message.type, message.data) == (WSMsgType.BINARY, b"c" * size)
            return
        # the bridge refuses the frame it would have to buffer (1009) and tells Grafana that
        # its client went away; nothing of the frame reached Grafana
        assert (message.type, message.data) == (WSMsgType.CLOSE, WSCloseCode.MESSAGE_TOO_BIG)
        assert (await asyncio.wait_for(grafana.ws_closed, WAIT))[0] == WSCloseCode.GOING_AWAY
        await asyncio.wait_for(running.observed.get(), WAIT)
        assert _relay_tasks() == []


@pytest.mark.parametrize("size", [WS_LIMIT, WS_LIMIT + 1])
async def test_websocket_message_limit_from_grafana(
    grafana: FakeGrafana, client: aiohttp.ClientSession, size: int
) -> None:
    async with (
        bridge(settings_for(grafana, max_ws_message_bytes=WS_LIMIT)) as running,
        client.ws_connect(f"{running.url}/ws", max_msg_size=0) as ws,
    ):
        await ws.send_str(f"send-me:{size}")
        message = await ws.receive(timeout=WAIT)
        if size <= WS_LIMIT:
            assert (message.type, message.data) == (WSMsgType.BINARY, b"g" * size)
            return
        # Grafana is told its message was too big (1009); the browser that its gateway's
        # upstream failed (1014), and never sees a byte of the oversized message
        assert (await asyncio.wait_for(grafana.ws_closed, WAIT))[0] == WSCloseCode.MESSAGE_TOO_BIG
        assert (message.type, message.data) == (WSMsgType.CLOSE, WSCloseCode.BAD_GATEWAY)
        await asyncio.wait_for(running.observed.get(), WAIT)
        assert _relay_tasks() == []


def test_websocket_message_limit_is_configurable_and_bounded() -> None:
    assert DelegateSettings().max_ws_message_bytes == 4 * 1024 * 1024  # aiohttp's default
    assert DelegateSettings(max_ws_message_bytes=1).max_ws_message_bytes == 1
    with pytest.raises(ValidationError):
        DelegateSettings(max_ws_message_bytes=0)  # aiohttp reads 0 as "no limit"


async def test_websocket_refused_upgrade_passes_code(
    proxy: Bridge, client: aiohttp.ClientSession
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await client.ws_connect(f"{proxy.url}/ws-denied")
    assert caught.value.status == 403


def _relay_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__qualname__", "") == "_pump"
    ]


# -- discovery and internal calls --------------------------------------------------------------

OURS = [{"name": "aggregation.grafana.app", "versions": [], "preferredVersion": {}}]


async def test_merged_api_groups_without_delegate() -> None:
    async with Delegate(DelegateSettings()) as delegate:
        merged = await delegate.merged_api_groups(OURS, {})
    assert merged == {"kind": "APIGroupList", "apiVersion": "v1", "groups": OURS}


async def test_merged_api_groups_ours_first_then_grafanas(grafana: FakeGrafana) -> None:
    grafana.apis = (
        200,
        {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {"name": "aggregation.grafana.app", "versions": ["theirs"]},
                {"name": "dashboard.grafana.app", "versions": []},
            ],
        },
    )
    async with Delegate(settings_for(grafana)) as delegate:
        merged = await delegate.merged_api_groups(
            OURS, {"Authorization": "Bearer t", "Connection": "close", "Accept": "text/html"}
        )
    assert [g["name"] for g in merged["groups"]] == [
        "aggregation.grafana.app",
        "dashboard.grafana.app",
    ]
    assert merged["groups"][0] == OURS[0]
    (seen,) = grafana.seen
    assert seen.header("Authorization") == "Bearer t"
    assert seen.header("Accept") == "application/json"  # only the legacy list can be merged
    assert seen.header("Connection") is None


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ((403, {"kind": "Status", "message": "forbidden: user is not allowed"}), 403),
        ((500, "oops"), 500),
        ((200, {"kind": "Status"}), 502),
        ((204, None), 502),
    ],
)
async def test_merged_api_groups_passes_delegate_errors(
    grafana: FakeGrafana, answer: tuple[int, Any], code: int
) -> None:
    grafana.apis = answer
    async with Delegate(settings_for(grafana)) as delegate:
        with pytest.raises(StatusError) as caught:
            await delegate.merged_api_groups(OURS, {})
    assert caught.value.code == code
    if code == 403:
        assert "forbidden: user is not allowed" in caught.value.message


async def test_fetch_json(grafana: FakeGrafana) -> None:
    async with Delegate(settings_for(grafana)) as delegate:
        assert await delegate.fetch_json(
            "/api/user", headers={"Authorization": "Bearer t"}, timeout=5
        ) == (200, {"login": "admin", "auth": "Bearer t"})
        assert await delegate.fetch_json("/not-json", headers={}, timeout=5) == (200, None)
        with pytest.raises(StatusError) as caught:
            await delegate.fetch_json("/hang", headers={}, timeout=0.2)
        assert caught.value.code == 504
    async with Delegate(DelegateSettings(url=f"http://127.0.0.1:{free_port()}")) as down:
        with pytest.raises(StatusError) as caught:
            await down.fetch_json("/api/user", headers={}, timeout=5)
        assert (caught.value.code, caught.value.retry_after) == (503, 1.0)
    async with Delegate(DelegateSettings()) as none:
        with pytest.raises(StatusError) as caught:
            await none.fetch_json("/api/user", headers={}, timeout=5)
        assert caught.value.code == 404
