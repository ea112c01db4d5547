"""``query`` → ``QueryData``: the SDK's query body in, Grafana's ``{"results": …}`` out."""

from __future__ import annotations

from aiohttp import web

from bridge.frames import FrameError, write_query_response
from bridge.handlers.base import Call, Deps
from bridge.query import parse_query_body
from bridge.status import StatusError
from protos.pluginv2 import backend_pb2 as pb


async def handle_query(call: Call, deps: Deps) -> web.StreamResponse:
    service = call.match.service
    uid = call.params["uid"]
    parsed = parse_query_body(await call.request.read())
    ref = parsed.datasource
    if ref is None:
        raise StatusError(
            400,
            'missing datasource reference: queries[0].datasource must be {"type": '
            f'"{service.plugin_id}", "uid": "{uid}"}}',
        )
    if ref.type and ref.type != service.plugin_id:
        raise StatusError(
            400,
            f"invalid datasource type {ref.type!r}: {service.name} serves plugin "
            f"{service.plugin_id!r}",
        )
    if ref.uid != uid:
        raise StatusError(
            400, f"invalid datasource UID {ref.uid!r}: the request path names datasource {uid!r}"
        )
    context = deps.contexts.for_datasource(call, uid)
    request = pb.QueryDataRequest(
        pluginContext=context,
        headers=deps.contexts.forwarded_headers(call, context),
        queries=parsed.queries,
        format=pb.JSON,
    )
    client = deps.client(service.plugin_id)
    with deps.metrics.plugin_call(service.plugin_id, "queryData"):
        answer = await client.query_data(request, timeout=deps.call_timeout)
    # Each frame is converted and written as it goes, so a large answer is not held twice.
    try:
        return await write_query_response(call.request, answer.responses)
    except FrameError as exc:
        raise StatusError(
            502, f"plugin {service.plugin_id} sent a data frame that cannot be read: {exc}"
        ) from None
