"""Request limits: URL length, header size and count, and concurrent calls per plugin.

Two layers, so that every over-limit request gets a precise answer and none can make the
bridge buffer without bound:

* the configured limits (``limits.max_url_bytes``, ``limits.max_header_bytes``,
  ``limits.max_headers``) are checked by :func:`limits_middleware` before routing, and
  answered with a Kubernetes Status: 414 for the URL, 431 for the headers;
* aiohttp's own HTTP parser gets a hard backstop at :data:`BACKSTOP_FACTOR` times those
  limits (:func:`server_kwargs`); beyond it the parser stops reading, answers a plain 400 and
  closes the connection, before any of the bridge's code runs.

Concurrent calls per plugin are counted, never queued: a call beyond the plugin's limit gets
429 with ``Retry-After`` at once (as the Kubernetes API server's max-in-flight filter does),
so a slow plugin cannot pile up waiting requests in the bridge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge

from bridge.status import StatusError

log = logging.getLogger(__name__)

BACKSTOP_FACTOR = 2
"""aiohttp's parser limits are this many times the configured ones (see the module doc)."""

RETRY_AFTER_SECONDS = 1

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_kwargs(*, max_url_bytes: int, max_header_bytes: int, max_headers: int) -> dict[str, Any]:
    """The keyword arguments for aiohttp's request handler (``AppRunner``/``run_app``)."""
    return {
        # The request line: method, target and version.
        "max_line_size": BACKSTOP_FACTOR * max_url_bytes + 64,
        "max_field_size": BACKSTOP_FACTOR * max_header_bytes,
        "max_headers": BACKSTOP_FACTOR * max_headers,
    }


def limits_middleware(*, max_url_bytes: int, max_header_bytes: int, max_headers: int) -> Middleware:
    """Answer 414/431 Status for requests over the configured limits, before routing."""

    @web.middleware
    async def check_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        target = len(request.raw_path.encode("utf-8", "surrogateescape"))
        if target > max_url_bytes:
            log.warning(
                "refused %s request: URL is %d bytes (limits.max_url_bytes is %d)",
                request.method,
                target,
                max_url_bytes,
            )
            raise StatusError(
                414,
                f"request URL is {target} bytes; the limit (limits.max_url_bytes) is "
                f"{max_url_bytes}",
                "RequestURITooLong",
            )
        raw = request.raw_headers
        if len(raw) > max_headers:
            log.warning(
                "refused %s request: %d header fields (limits.max_headers is %d)",
                request.method,
                len(raw),
                max_headers,
            )
            raise StatusError(
                431,
                f"request has {len(raw)} header fields; the limit (limits.max_headers) is "
                f"{max_headers}",
                "RequestHeaderFieldsTooLarge",
            )
        for name, value in raw:
            size = len(name) + 2 + len(value)
            if size > max_header_bytes:
                shown = name.decode("latin-1")[:64]
                log.warning(
                    "refused %s request: header %r is %d bytes (limits.max_header_bytes is %d)",
                    request.method,
                    shown,
                    size,
                    max_header_bytes,
                )
                raise StatusError(
                    431,
                    f"request header {shown!r} is {size} bytes; the limit "
                    f"(limits.max_header_bytes) is {max_header_bytes}",
                    "RequestHeaderFieldsTooLarge",
                )
        return await handler(request)

    return check_limits


class PluginConcurrency:
    """How many calls each plugin is serving now, and the refusal beyond its limit.

    No queue and no waiting: :meth:`slot` either takes a slot at once or raises a 429
    :class:`StatusError` with ``Retry-After``. Single-threaded (the event loop), so a plain
    counter is exact.
    """

    def __init__(
        self,
        default: int,
        per_plugin: Mapping[str, int] | None = None,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._default = default
        self._per_plugin = dict(per_plugin or {})
        self._in_flight: dict[str, int] = {}
        self.in_flight_gauge = Gauge(
            "grafana_bridge_plugin_calls_in_flight",
            "Calls the bridge is making to each plugin right now (limits.max_calls_per_plugin).",
            ("plugin_id",),
            registry=registry,
        )
        self.rejected = Counter(
            "grafana_bridge_plugin_calls_rejected",
            "Calls refused with 429 because the plugin had limits.max_calls_per_plugin in flight.",
            ("plugin_id",),
            registry=registry,
        )

    def limit(self, plugin_id: str) -> int:
        return self._per_plugin.get(plugin_id, self._default)

    def in_flight(self, plugin_id: str) -> int:
        return self._in_flight.get(plugin_id, 0)

    @contextmanager
    def slot(self, plugin_id: str) -> Iterator[None]:
        """Hold one of ``plugin_id``'s slots for the duration of the block."""
        limit = self.limit(plugin_id)
        current = self._in_flight.get(plugin_id, 0)
        if current >= limit:
            self.rejected.labels(plugin_id).inc()
            log.warning(
                "refused a call to plugin %s: %d calls in flight (limit %d)",
                plugin_id,
                current,
                limit,
            )
            raise StatusError(
                429,
                f"plugin {plugin_id} is serving its limit of {limit} concurrent calls; "
                f"retry after {RETRY_AFTER_SECONDS}s",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self._in_flight[plugin_id] = current + 1
        gauge = self.in_flight_gauge.labels(plugin_id)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()
            remaining = self._in_flight[plugin_id] - 1
            if remaining:
                self._in_flight[plugin_id] = remaining
            else:
                del self._in_flight[plugin_id]
