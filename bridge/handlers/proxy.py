"""``datasource-proxy`` → the datasource's own HTTP API (bridge/dsproxy does the work)."""

from __future__ import annotations

from aiohttp import web

from bridge.handlers.base import Call, Deps
from bridge.status import StatusError


async def handle_proxy(call: Call, deps: Deps) -> web.StreamResponse:
    proxy = deps.datasource_proxy
    if proxy is None:
        raise StatusError(503, "the datasource proxy is not running", retry_after=1.0)
    return await proxy.serve(call)
