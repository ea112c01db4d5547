"""``route`` → ``CallResource``: the request passed as Grafana passes it, the answer streamed."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from bridge.apis import PluginType
from bridge.handlers.base import Call, Deps
from bridge.routing import Endpoint
from bridge.status import StatusError
from protos.pluginv2 import backend_pb2 as pb

log = logging.getLogger(__name__)

# Never passed to the plugin: the caller's Grafana credentials (as Grafana strips them).
_DROP_REQUEST = frozenset(
    {"cookie", "authorization", "x-grafana-org-id", "x-ds-authorization", "x-id-token"}
)
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


def resource_path(call: Call) -> str:
    """The path relative to the plugin's resource root, without a leading slash."""
    if call.match.endpoint is Endpoint.RESOURCE:
        return call.params.get("path", "")
    # A custom route: everything after /apis/{group}/{version}/namespaces/{namespace}/.
    raw = call.request.rel_url.path
    marker = f"/namespaces/{call.namespace}/"
    return raw.split(marker, 1)[1] if marker in raw else raw.lstrip("/")


async def handle_resource(call: Call, deps: Deps) -> web.StreamResponse:
    service = call.match.service
    request = call.request
    path = resource_path(call)
    url = path + (
        f"?{request.rel_url.raw_query_string}" if request.rel_url.raw_query_string else ""
    )
    if service.plugin_type is PluginType.DATASOURCE and "uid" in call.params:
        context = deps.contexts.for_datasource(call, call.params["uid"])
    else:
        context = deps.contexts.for_app(call)
    headers: dict[str, pb.StringList] = {}
    for name in request.headers:
        lower = name.lower()
        if lower in _DROP_REQUEST or lower in _HOP_BY_HOP or lower == "x-grafana-user":
            continue
        if name not in headers:
            headers[name] = pb.StringList(values=request.headers.getall(name))
    # Kept cookies and X-Grafana-User, decided as Grafana decides them for this datasource.
    for name, value in deps.contexts.forwarded_headers(call, context, prefixed=False).items():
        headers[name] = pb.StringList(values=[value])
    message = pb.CallResourceRequest(
        pluginContext=context,
        path=path,
        method=request.method,
        url=url,
        headers=headers,
        body=await request.read(),
    )
    client = deps.client(service.plugin_id)
    with deps.metrics.plugin_call(service.plugin_id, "callResource"):
        stream = client.call_resource(message, timeout=deps.call_timeout)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise StatusError(
                502, f"plugin {service.plugin_id} sent an empty resource response"
            ) from None
        if not 100 <= first.code <= 599:
            await stream.aclose()  # type: ignore[attr-defined]
            raise StatusError(
                502, f"plugin {service.plugin_id} answered with invalid status code {first.code}"
            )
        response = web.StreamResponse(status=first.code, headers=_response_headers(first.headers))
        await response.prepare(request)
        if first.body:
            await response.write(first.body)
        # From here the status line is sent: a failure can only cut the body short.
        try:
            async for more in stream:
                if more.body:
                    await response.write(more.body)
        except Exception:
            log.warning(
                "plugin %s failed mid-response for %s; closing the connection",
                service.plugin_id,
                path,
                exc_info=True,
            )
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


def _response_headers(raw: Mapping[str, pb.StringList]) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, values in raw.items():
        if name.lower() in _HOP_BY_HOP:
            continue
        for value in values.values:
            headers.add(name, value)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    return headers
