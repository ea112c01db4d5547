"""``route`` → ``CallResource``: the request passed as Grafana passes it, the answer streamed."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web
from multidict import CIMultiDict

from bridge.apis import PluginType
from bridge.handlers.base import Call, Deps
from bridge.hops import end_to_end, go_header_name
from bridge.routing import Endpoint
from bridge.status import StatusError
from protos.pluginv2 import backend_pb2 as pb

log = logging.getLogger(__name__)

# Never passed to the plugin, on top of hop-by-hop headers: the caller's Grafana credentials
# (as Grafana strips them), X-Grafana-User (set below from the identity, never from the
# caller), and the length a streamed answer recomputes.
_DROP_REQUEST = frozenset(
    {
        "cookie",
        "authorization",
        "x-grafana-org-id",
        "x-grafana-user",
        "x-ds-authorization",
        "x-id-token",
        "host",
        "content-length",
    }
)
# Never passed from the plugin to the client, on top of hop-by-hop headers.
_DROP_RESPONSE = frozenset({"content-length"})


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
    # Names as Grafana's net/http hands them to a plugin: Go-canonical, values in order.
    headers: dict[str, pb.StringList] = {}
    for name, value in end_to_end(request.headers.items(), drop=_DROP_REQUEST):
        headers.setdefault(go_header_name(name), pb.StringList()).values.append(value)
    # Kept cookies and X-Grafana-User, decided as Grafana decides them for this datasource.
    for name, value in deps.contexts.forwarded_headers(call, context, prefixed=False).items():
        headers[go_header_name(name)] = pb.StringList(values=[value])
    message = pb.CallResourceRequest(
        pluginContext=context,
        path=path,
        method=request.method,
        url=url,
        headers=headers,
        body=await request.read(),
    )
    client = deps.client(service.plugin_id)
    try:
        with deps.metrics.plugin_call(service.plugin_id, "callResource"):
            stream = client.call_resource(message, timeout=deps.call_timeout)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise _Unusable(
                    f"plugin {service.plugin_id} sent an empty resource response"
                ) from None
            # A 1xx is never a final answer: sent as one, the client would take the next
            # response on the connection for this request's.
            if not 200 <= first.code <= 599:
                await stream.aclose()  # type: ignore[attr-defined]
                raise _Unusable(
                    f"plugin {service.plugin_id} answered with invalid status code {first.code}"
                )
            # RFC 9110 §6.4.1: no content after HEAD, 204 or 304. Written anyway it would be
            # read as the next response on the connection; Go's net/http drops it too.
            with_body = request.method != "HEAD" and first.code not in (204, 304)
            response = web.StreamResponse(
                status=first.code, headers=_response_headers(first.headers)
            )
            await response.prepare(request)
            if first.body and with_body:
                await response.write(first.body)
            # From here the status line is sent: a failure can only cut the body short.
            try:
                async for more in stream:
                    if more.body and with_body:
                        await response.write(more.body)
            except Exception as exc:
                log.warning(
                    "plugin %s failed mid-response for %s; closing the connection",
                    service.plugin_id,
                    path,
                    exc_info=True,
                )
                if request.transport is not None:
                    request.transport.close()
                raise _CutShort(response) from exc
            await response.write_eof()
            return response
    except _Unusable as exc:
        raise StatusError(502, str(exc)) from None
    except _CutShort as cut:
        return cut.response


class _Unusable(Exception):
    """The plugin's answer cannot be passed on (502).

    Not a StatusError: that is a frozen dataclass, and the metrics context manager (a
    ``@contextmanager``) sets ``__traceback__`` on the exception passing through it, which
    then fails with a TypeError and the client gets a 500.
    """


class _CutShort(Exception):
    """The answer broke off after its status line; the call counts as failed."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the resource response was cut short")
        self.response = response


def _response_headers(raw: Mapping[str, pb.StringList]) -> CIMultiDict[str]:
    pairs = ((name, value) for name, values in raw.items() for value in values.values)
    headers: CIMultiDict[str] = CIMultiDict(end_to_end(pairs, drop=_DROP_RESPONSE))
    headers.setdefault("X-Content-Type-Options", "nosniff")
    return headers
