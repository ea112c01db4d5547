"""``health`` → ``CheckHealth``: Grafana's ``{status, message, details}``, 200 only when OK."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from bridge.apis import PluginType
from bridge.handlers.base import Call, Deps
from protos.pluginv2 import backend_pb2 as pb

_STATUS_NAMES = {
    pb.CheckHealthResponse.OK: "OK",
    pb.CheckHealthResponse.ERROR: "ERROR",
    pb.CheckHealthResponse.UNKNOWN: "UNKNOWN",
}


async def handle_health(call: Call, deps: Deps) -> web.StreamResponse:
    service = call.match.service
    if service.plugin_type is PluginType.DATASOURCE:
        context = deps.contexts.for_datasource(call, call.params["uid"])
    else:
        context = deps.contexts.for_app(call)
    client = deps.client(service.plugin_id)
    with deps.metrics.plugin_call(service.plugin_id, "checkHealth"):
        answer = await client.check_health(
            pb.CheckHealthRequest(
                pluginContext=context, headers=deps.contexts.forwarded_headers(call, context)
            ),
            timeout=deps.call_timeout,
        )
    body: dict[str, Any] = {
        "status": _STATUS_NAMES.get(answer.status, "UNKNOWN"),
        "message": answer.message,
    }
    if answer.jsonDetails:
        try:
            body["details"] = json.loads(answer.jsonDetails)
        except ValueError:
            body["details"] = answer.jsonDetails.decode("utf-8", "replace")
    ok = answer.status == pb.CheckHealthResponse.OK
    # Grafana answers a failed check with 400: the request was fine, the datasource is not.
    return web.json_response(body, status=200 if ok else 400)
