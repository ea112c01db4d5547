"""Delegation: every request the bridge does not own is passed to Grafana, streamed both ways.

The bridge sits first in the request path, so it is the proxy the client talks to. Grafana
(the "delegate", in kube-aggregator's words) gets the request with its method, path, query,
end-to-end headers and body unchanged, plus ``X-Forwarded-*``; the client gets Grafana's status,
headers and body back. Nothing is buffered: bodies move chunk by chunk in both directions and
WebSocket upgrades are relayed frame by frame.

Failures become ``Status`` bodies (``bridge.status``): 404 when no delegate is configured, 503
with ``Retry-After`` when Grafana cannot be reached (refused, reset, DNS), 502 when it answers
garbage or its TLS is refused, 504 when it does not answer (or stops reading the upload) in
time, 408 when the client stops sending its body. Messages name only
"the Grafana delegate"; the address and the underlying error go to the log, once, with a
request id. Limits: docs/delegation.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal
from urllib.parse import unquote

import aiohttp
from aiohttp import WSCloseCode, hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from bridge.hops import connection_tokens, end_to_end
from bridge.status import StatusError
from bridge.wsrelay import relay

log = logging.getLogger(__name__)

# The bridge already answered ``Expect: 100-continue`` itself (aiohttp does before the handler
# runs); passing it on would make the upstream client wait for a second 100.
_ANSWERED_HERE: Final = frozenset({"expect"})
_FORWARDED: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# aiohttp's client adds these when absent; a transparent proxy must not invent them.
_NO_AUTO_HEADERS: Final = (hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE)
# The codings aiohttp's server decodes by itself (http_parser: single token, exact match).
_SERVER_DECODED: Final = frozenset({"gzip", "deflate", "br", "zstd"})
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_MAX_JSON_BYTES: Final = 8 * 1024 * 1024
_WS_CLOSE_TIMEOUT: Final = 10.0
_UNREACHABLE_RETRY_AFTER: Final = 1.0

Observe = Callable[[str, int, float], None]
"""Metrics hook: ``observe(method, code, seconds)`` once per delegated request."""


class DelegateSettings(BaseModel):
    """Where Grafana is and how to talk to it: the ``delegate:`` section of the config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = None
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=300.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    # The largest delegated WebSocket message (aiohttp's default); a larger one closes the
    # socket it came from with 1009.
    max_ws_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    tls_verify: bool = True
    ca_file: Path | None = None
    preserve_host: bool = False

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # an empty env override switches delegation off
        value = value.strip()
        example = "e.g. http://127.0.0.1:3000 or https://grafana.example.com/sub/"
        try:
            url = URL(value)
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc}); expected {example}") from None
        if url.scheme not in ("http", "https"):
            raise ValueError(f"must be an http:// or https:// URL, {example}")
        if not url.host:
            raise ValueError(f"has no host; expected {example}")
        if url.user is not None or url.password is not None:
            raise ValueError("must not carry credentials; Grafana authenticates each request")
        if "?" in value or "#" in value:
            raise ValueError(f"must not have a query or fragment; a sub-path is fine, {example}")
        return value

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _ca_needs_verify(self) -> DelegateSettings:
        if self.ca_file is not None and not self.tls_verify:
            raise ValueError("ca_file has no effect with tls_verify: false; remove one of them")
        return self


class Delegate:
    """The reverse proxy to Grafana, with one connection pool for the bridge's lifetime."""

    def __init__(
        self,
        settings: DelegateSettings,
        *,
        observe: Observe | None = None,
        request_bodies_decoded: bool = True,
        watch_interval: float = 1.0,
    ) -> None:
        """``request_bodies_decoded`` must match the server's ``auto_decompress`` (aiohttp's
        default is on): then ``request.content`` holds the decoded body of a gzip/deflate/br/
        zstd request, and it is forwarded without its Content-Encoding and Content-Length.
        ``watch_interval`` is how often a request in flight checks that its client is still
        connected and its upload still moving."""
        self.settings = settings
        self.observe = observe  # settable, so metrics can be wired after construction
        self._bodies_decoded = request_bodies_decoded
        self._watch_interval = watch_interval
        self._session: aiohttp.ClientSession | None = None
        # aiohttp refuses a message of exactly max_msg_size bytes; the setting is the largest
        # message that passes.
        self._ws_max_msg_size = settings.max_ws_message_bytes + 1
        self._origin = ""
        self._prefix = ""
        if settings.url is not None:
            url = URL(settings.url)
            self._origin = str(url.origin())
            # "http://grafana/sub/" serves Grafana from /sub; requests keep their own leading "/".
            self._prefix = url.raw_path.rstrip("/")

    @property
    def configured(self) -> bool:
        return self.settings.url is not None

    async def start(self) -> None:
        if self._session is not None or not self.configured:
            return
        settings = self.settings
        tls: ssl.SSLContext | bool = True
        if self._origin.startswith("https:"):
            if not settings.tls_verify:
                tls = False
            else:
                try:
                    tls = ssl.create_default_context(
                        cafile=str(settings.ca_file) if settings.ca_file else None
                    )
                except (OSError, ssl.SSLError) as exc:
                    raise ValueError(f"delegate.ca_file: cannot load: {exc}") from None
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            ssl=tls,
            socket_factory=functools.partial(_open_socket, unacked_limit=settings.read_timeout),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Grafana's cookies belong to the browser; a shared jar would leak one user's
            # session into another user's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=settings.connect_timeout,
                sock_connect=settings.connect_timeout,
                sock_read=settings.read_timeout,
            ),
            trust_env=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Delegate:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- proxying --------------------------------------------------------------------------

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Pass ``request`` to Grafana and stream its answer back."""
        if not self.configured:
            raise StatusError(
                404, f"{request.path} is not served by the bridge and no delegate is configured"
            )
        session = self._require_session()
        started = time.monotonic()
        code = 499
        try:
            _check_framing(request)
            target = self._target(request)
            if _wants_websocket(request):
                response = await self._proxy_websocket(request, session, target)
                code = response.status
            else:
                response, code = await self._proxy_http(request, session, target)
            return response
        except StatusError as exc:
            code = exc.code
            raise
        except Exception:
            code = 500  # errors_middleware answers it
            raise
        finally:
            self._report(request.method, code, time.monotonic() - started)

    async def _proxy_http(
        self, request: web.Request, session: aiohttp.ClientSession, target: URL
    ) -> tuple[web.StreamResponse, int]:
        timeout = self.settings.read_timeout
        headers = self._upstream_headers(request, websocket=False)
        body = _TimedBody(request.content, timeout) if request.body_exists else None
        response: web.StreamResponse | None = None
        with _Watchdog(request, body, interval=self._watch_interval, timeout=timeout) as watchdog:
            try:
                upstream = await session.request(
                    request.method,
                    target,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    skip_auto_headers=_NO_AUTO_HEADERS,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if _client_gone(request):
                    # The upload failed because the client left; nobody is waiting for a 502.
                    return _client_closed(), 499
                if isinstance(exc.__cause__, _StalledUpload):
                    raise StatusError(408, f"the request body stalled for {timeout:g}s") from None
                raise self._failure(request, exc) from None
            # From here on aiohttp's own read timeout covers Grafana; an upload still running
            # next to the response is Grafana's business.
            watchdog.body = None
            complete = False
            try:
                response = web.StreamResponse(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=_downstream_headers(upstream.headers),
                )
                try:
                    await response.prepare(request)
                except ConnectionError:
                    return response, 499
                complete = await self._copy_body(request, upstream, response)
            finally:
                if complete:
                    upstream.release()
                else:
                    upstream.close()  # a half-read connection must not go back to the pool
            return response, upstream.status
        # Only reached when the watchdog cancelled the work above.
        if watchdog.fired == "upload":
            raise self._failure(
                request, TimeoutError(f"Grafana stopped reading the request body for {timeout:g}s")
            )
        if response is not None and response.prepared:
            return response, response.status  # the status that went out before the client left
        return _client_closed(), 499

    async def _copy_body(
        self, request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse
    ) -> bool:
        """Stream Grafana's body to the client; False if either side broke off."""
        try:
            async for chunk in upstream.content.iter_any():
                try:
                    # A client that stops reading would otherwise park this write forever.
                    async with asyncio.timeout(self.settings.read_timeout):
                        await response.write(chunk)
                except (ConnectionError, TimeoutError):
                    _drop_client(request, flush=False)
                    return False
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            rid = _request_id(request)
            log.warning(
                "delegate: %s %s: Grafana's response broke off after the headers "
                "(request id %s): %s",
                request.method,
                request.path,
                rid,
                _describe(exc),
                extra={"request_id": rid},
            )
            # The status line is gone already; closing the connection is the only way left to
            # tell the client that the body is incomplete.
            _drop_client(request, flush=True)
            return False
        return True

    async def _proxy_websocket(
        self, request: web.Request, session: aiohttp.ClientSession, target: URL
    ) -> web.StreamResponse:
        offered = _offered_protocols(request)
        # Offering the client's own protocols keeps can_prepare from warning about a mismatch.
        if not web.WebSocketResponse(protocols=offered).can_prepare(request).ok:
            raise StatusError(400, "invalid WebSocket handshake")
        try:
            upstream = await session.ws_connect(
                target,
                method=request.method,
                headers=self._upstream_headers(request, websocket=True),
                protocols=offered,
                # Both sides relay close and ping frames themselves, so each end sees the
                # other's codes and payloads rather than aiohttp's automatic answers.
                autoclose=False,
                autoping=False,
                timeout=aiohttp.ClientWSTimeout(ws_close=_WS_CLOSE_TIMEOUT),
                max_msg_size=self._ws_max_msg_size,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status >= 400:
                raise StatusError(
                    exc.status, f"the Grafana delegate refused the WebSocket upgrade ({exc.status})"
                ) from None
            raise StatusError(
                502, "the Grafana delegate did not upgrade the connection to a WebSocket"
            ) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._failure(request, exc) from None
        client = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoclose=False,
            autoping=False,
            timeout=_WS_CLOSE_TIMEOUT,
            max_msg_size=self._ws_max_msg_size,
            # No permessage-deflate on either leg (ws_connect offers none by default): aiohttp
            # measures a compressed message's size differently (one byte looser), and the relay
            # gains nothing from inflating and deflating again.
            compress=False,
        )
        try:
            await client.prepare(request)
            await relay(client, upstream)
        finally:
            if not upstream.closed:
                await upstream.close(code=WSCloseCode.GOING_AWAY)
        return client

    # -- internal calls --------------------------------------------------------------------

    async def fetch_json(
        self, path: str, *, headers: Mapping[str, str], timeout: float
    ) -> tuple[int, Any]:
        """GET ``path`` from Grafana for the bridge's own use: ``(status, decoded JSON)``.

        The JSON is ``None`` when the body is empty or not JSON. ``headers`` usually carry the
        caller's credentials; hop-by-hop ones are dropped. Raises ``StatusError`` 404 (no
        delegate), 503 (unreachable), 502 (an invalid answer, or a body over 8 MiB) and 504
        (``timeout`` passed).
        """
        if not self.configured:
            raise StatusError(404, "no delegate is configured")
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/': {path!r}")
        session = self._require_session()
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in end_to_end(headers.items()):
            if name.lower() not in (
                "content-length",
                "content-type",
                "accept-encoding",
                "host",
                *_ANSWERED_HERE,
            ):
                out.add(name, value)
        out.setdefault(hdrs.ACCEPT, "application/json")
        url = URL(self._origin + self._prefix + path, encoded=True)
        try:
            async with asyncio.timeout(timeout):
                async with session.get(
                    url, headers=out, allow_redirects=False, auto_decompress=True
                ) as response:
                    status = response.status
                    body = await _read_capped(response, _MAX_JSON_BYTES)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._failure(None, exc, what=f"GET {path}") from None
        if body is None:
            raise StatusError(502, "the Grafana delegate's answer is too large")
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None

    async def merged_api_groups(
        self,
        own: list[dict[str, Any]],
        request_headers: Mapping[str, str],
        *,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """The legacy ``/apis`` discovery document: the bridge's groups, then Grafana's.

        As upstream's ``RootDiscoveryHandler``: a non-200 answer from the delegate is passed
        on with its code. Delegate groups whose name the bridge serves are left out.
        """
        groups = [dict(group) for group in own]
        if not self.configured:
            return _group_list(groups)
        # Upstream asks its delegate for JSON whatever the client accepts (kubectl asks for
        # aggregated discovery first), since only the legacy list can be merged here.
        headers: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in request_headers.items() if name.lower() != "accept"
        )
        headers[hdrs.ACCEPT] = "application/json"
        status, body = await self.fetch_json("/apis", headers=headers, timeout=timeout)
        if status != 200:
            detail = ""
            if isinstance(body, dict) and isinstance(body.get("message"), str):
                detail = f": {body['message']}"
            message = f"the Grafana delegate answered /apis with {status}{detail}"
            raise StatusError(status if status >= 400 else 502, message)
        theirs = body.get("groups") if isinstance(body, dict) else None
        if not isinstance(theirs, list):
            raise StatusError(502, "the Grafana delegate's /apis answer is not an APIGroupList")
        served = {group.get("name") for group in groups}
        groups.extend(
            group for group in theirs if isinstance(group, dict) and group.get("name") not in served
        )
        return _group_list(groups)

    # -- helpers ---------------------------------------------------------------------------

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Delegate.start() must be awaited before use")
        return self._session

    def _target(self, request: web.Request) -> URL:
        raw = request.raw_path
        if not raw.startswith("/"):
            # absolute-form ("GET http://host/path"): keep only what Grafana routes on
            raw = request.rel_url.raw_path_qs
            if not raw.startswith("/"):
                raise StatusError(400, "the request target must be a path")
        if self._prefix and _has_dot_segment(raw):
            # Grafana cleans "/sub/../x" to "/x", which would leave the configured sub-path.
            raise StatusError(400, "dot segments are not allowed in a path that is delegated")
        # encoded=True: the path and query reach Grafana byte for byte, never re-quoted.
        return URL(self._origin + self._prefix + raw, encoded=True)

    def _upstream_headers(self, request: web.Request, *, websocket: bool) -> CIMultiDict[str]:
        out: CIMultiDict[str] = CIMultiDict()
        forwarded_for: list[str] = []
        for name, value in end_to_end(request.headers.items()):
            key = name.lower()
            if key in _ANSWERED_HERE:
                continue
            if key == "host" and not self.settings.preserve_host:
                continue
            if websocket and key.startswith("sec-websocket-"):
                continue  # the upstream handshake has its own key, version and extensions
            if key == "x-forwarded-for":
                forwarded_for.append(value)
            elif key not in _FORWARDED:
                out.add(name, value)
        if self._bodies_decoded and request.body_exists and _decoded_by_server(request):
            # request.content yields the decoded bytes; the old length and coding would lie.
            out.popall(hdrs.CONTENT_ENCODING, None)
            out.popall(hdrs.CONTENT_LENGTH, None)
        if request.remote:
            forwarded_for.append(request.remote)
        if forwarded_for:
            out[hdrs.X_FORWARDED_FOR] = ", ".join(forwarded_for)
        # The bridge is the first hop, so what a client claims here is replaced, not trusted.
        out[hdrs.X_FORWARDED_PROTO] = request.scheme
        out[hdrs.X_FORWARDED_HOST] = request.host
        return out

    def _failure(
        self, request: web.Request | None, exc: BaseException, *, what: str = ""
    ) -> StatusError:
        """Map a client error to 502/503/504 and log it once, with the address, for operators."""
        rid = _request_id(request) if request is not None else uuid.uuid4().hex[:12]
        what = what or (f"{request.method} {request.path}" if request is not None else "")
        log.warning(
            "delegate %s: %s: %s (request id %s)",
            self._origin + self._prefix,
            what,
            _describe(exc),
            rid,
            extra={"request_id": rid},
        )
        suffix = f"(request id {rid}; details are in the bridge log)"
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return StatusError(
                504,
                f"could not connect to the Grafana delegate within "
                f"{self.settings.connect_timeout:g}s {suffix}",
            )
        if isinstance(exc, TimeoutError):
            return StatusError(504, f"the Grafana delegate did not answer in time {suffix}")
        if isinstance(exc, aiohttp.ClientSSLError):
            # Grafana answered, but not with a TLS session the bridge accepts: retrying will not
            # help until someone fixes a certificate or delegate.ca_file.
            return StatusError(502, f"the TLS handshake with the Grafana delegate failed {suffix}")
        not_sent = isinstance(exc, aiohttp.ClientConnectorError) or (
            isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError)
        )
        if not_sent:
            # Refused, or the name did not resolve: nothing reached Grafana, which is down or
            # restarting. kube-aggregator answers 503 for an unreachable backend too.
            return StatusError(
                503,
                f"the Grafana delegate could not be reached {suffix}",
                retry_after=_UNREACHABLE_RETRY_AFTER,
            )
        if isinstance(exc, aiohttp.ClientConnectionError):
            # Reset or closed after the request went out, before any answer. Grafana may have
            # acted on it: only a request that is safe to repeat (RFC 9110 §9.2.2) is told to
            # come back; for the others the client must find out what happened.
            method = request.method if request is not None else "GET"
            if method in _IDEMPOTENT:
                return StatusError(
                    503,
                    f"the connection to the Grafana delegate broke before it answered {suffix}",
                    retry_after=_UNREACHABLE_RETRY_AFTER,
                )
            return StatusError(
                502, f"the connection to the Grafana delegate broke before it answered {suffix}"
            )
        return StatusError(502, f"the Grafana delegate sent an invalid response {suffix}")

    def _report(self, method: str, code: int, seconds: float) -> None:
        if self.observe is None:
            return
        # Methods are free-form tokens; unknown ones share a label to bound cardinality.
        label = method if method in _METHODS else "OTHER"
        try:
            self.observe(label, code, seconds)
        except Exception:
            log.exception("delegate: the metrics hook failed")


DELEGATE_KEY: Final = web.AppKey("delegate", Delegate)


def _open_socket(addr_info: aiohttp.AddrInfoType, *, unacked_limit: float) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
    if user_timeout is not None:
        # asyncio closes a plain TCP transport only after flushing it, so a Grafana that stops
        # reading would keep the socket open forever once the bridge gives up; the kernel drops
        # it instead when sent data sits unacknowledged (or unsendable) for read_timeout.
        sock.setsockopt(socket.IPPROTO_TCP, user_timeout, max(1, int(unacked_limit * 1000)))
    return sock


# -- request checks ------------------------------------------------------------------------


def _check_framing(request: web.Request) -> None:
    """Refuse a body whose length two parsers could read differently (request smuggling).

    aiohttp's parsers already reject Content-Length with Transfer-Encoding and duplicate
    lengths before the handler runs; this is the second line, for a lenient parser and for
    what aiohttp accepts but could not be forwarded faithfully.
    """
    lengths = request.headers.getall(hdrs.CONTENT_LENGTH, [])
    codings = request.headers.getall(hdrs.TRANSFER_ENCODING, [])
    if lengths and codings:
        raise StatusError(400, "a request must not carry both Content-Length and Transfer-Encoding")
    if len(lengths) > 1:
        raise StatusError(400, "a request must not carry more than one Content-Length")
    if codings:
        if request.version < aiohttp.HttpVersion11:
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
            raise StatusError(400, "Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if ",".join(codings).strip().lower() != "chunked":
            # aiohttp de-chunks "gzip, chunked" but leaves the gzip transfer coding in place.
            raise StatusError(501, "only the chunked transfer coding is supported")


def _wants_websocket(request: web.Request) -> bool:
    upgrade = request.headers.get(hdrs.UPGRADE, "").strip().lower()
    return upgrade == "websocket" and "upgrade" in connection_tokens(request.headers.items())


def _offered_protocols(request: web.Request) -> list[str]:
    return [
        token.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, [])
        for token in value.split(",")
        if token.strip()
    ]


def _decoded_by_server(request: web.Request) -> bool:
    coding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    return coding.isascii() and coding.lower() in _SERVER_DECODED


def _has_dot_segment(raw: str) -> bool:
    path = unquote(raw.partition("?")[0])
    return any(segment in (".", "..") for segment in re.split(r"[/\\]", path))


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _drop_client(request: web.Request, *, flush: bool) -> None:
    transport = request.transport
    if transport is None:
        return
    if flush:
        transport.close()
    else:
        transport.abort()


def _client_closed() -> web.Response:
    # Never written (the socket is gone); aiohttp notices and logs a premature disconnect.
    return web.Response(status=499, reason="Client Closed Request")


def _describe(exc: BaseException) -> str:
    # Not repr(): a ClientResponseError's repr carries the request headers, credentials included.
    return f"{type(exc).__name__}: {exc}"


def _request_id(request: web.Request) -> str:
    supplied = request.headers.get("X-Request-Id", "")
    if _REQUEST_ID.fullmatch(supplied):
        return supplied
    return uuid.uuid4().hex[:12]


# -- headers ---------------------------------------------------------------------------------


def _downstream_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(end_to_end(upstream.items()))
    # aiohttp's response parser is lenient: with Transfer-Encoding, or with a repeated length,
    # the length it read by is not the one in the header. Re-emitting it would let the client
    # and Grafana disagree on where the body ends, so such answers go out chunked.
    framed = len(upstream.getall(hdrs.CONTENT_LENGTH, [])) == 1
    if not framed or hdrs.TRANSFER_ENCODING in upstream:
        out.popall(hdrs.CONTENT_LENGTH, None)
    return out


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _group_list(groups: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


# -- client disconnects and stalls -----------------------------------------------------------


class _StalledUpload(Exception):
    """The client sent no body bytes for ``read_timeout``."""


class _TimedBody:
    """The request body, read as it arrives, with the time each side takes kept in view.

    Waiting for the client's next bytes is bounded here (``_StalledUpload``); the time a chunk
    spends going to Grafana is exposed for the watchdog, since aiohttp's writer awaits it.
    """

    def __init__(self, content: aiohttp.StreamReader, timeout: float) -> None:
        self._content = content
        self._timeout = timeout
        self._handed_over: float | None = None  # when Grafana's side got the last chunk

    def __aiter__(self) -> _TimedBody:
        return self

    async def __anext__(self) -> bytes:
        self._handed_over = None
        try:
            async with asyncio.timeout(self._timeout):
                chunk = await self._content.readany()
        except TimeoutError:
            raise _StalledUpload from None
        if not chunk:
            raise StopAsyncIteration
        self._handed_over = asyncio.get_running_loop().time()
        return chunk

    def upstream_stalled(self, timeout: float) -> bool:
        handed_over = self._handed_over
        return handed_over is not None and asyncio.get_running_loop().time() - handed_over > timeout


class _Watchdog:
    """Cancels the enclosing work when the client leaves or the upload stops moving, then
    swallows that cancellation so the caller can answer.

    aiohttp cancels a handler on disconnect only when the server runs with
    ``handler_cancellation=True`` (off by default); without this a request waiting on a slow
    Grafana would hold an upstream connection until ``read_timeout`` with nobody left to
    answer. And aiohttp starts its upstream read timeout only after the body is sent, so a
    Grafana that stops reading an upload would park the request for good. There is no public
    connection-lost event to await, so both are checked on a timer: one handle per request.
    """

    def __init__(
        self, request: web.Request, body: _TimedBody | None, *, interval: float, timeout: float
    ) -> None:
        self.body = body
        self.fired: Literal["", "client", "upload"] = ""
        self._request = request
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def __enter__(self) -> _Watchdog:
        self._task = asyncio.current_task()
        self._schedule()
        return self

    def _schedule(self) -> None:
        self._handle = asyncio.get_running_loop().call_later(self._interval, self._check)

    def _check(self) -> None:
        if self._task is None or self._task.done():
            return
        if _client_gone(self._request):
            self.fired = "client"
        elif self.body is not None and self.body.upstream_stalled(self._timeout):
            self.fired = "upload"
        else:
            self._schedule()
            return
        self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        if not self.fired or self._task is None:
            return False
        # Anyone else's cancellation (server shutdown, handler_cancellation) still propagates.
        remaining = self._task.uncancel()
        return exc_type is asyncio.CancelledError and remaining == 0
