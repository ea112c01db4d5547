"""The aiohttp application: health endpoints, plugin metrics, and error handling."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from bridge.config import BridgeConfig
from bridge.status import StatusError, from_plugin_error, status_response
from plugin_host.errors import PluginError
from plugin_host.host import PluginHost
from plugin_host.supervisor import PluginState
from protos.pluginv2 import backend_pb2 as pb

log = logging.getLogger(__name__)

CONFIG_KEY = web.AppKey("config", BridgeConfig)
HOST_KEY = web.AppKey("host", PluginHost)
READY_KEY = web.AppKey("ready", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a Kubernetes Status; nothing else reaches the client."""
    try:
        return await handler(request)
    except StatusError as exc:
        return status_response(exc)
    except PluginError as exc:
        return status_response(from_plugin_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return status_response(StatusError(exc.status, exc.reason))
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception(
            "unhandled error in %s %s (incident %s)", request.method, request.path, incident
        )
        return status_response(
            StatusError(500, f"internal error (incident {incident}; details are in the bridge log)")
        )


def build_app(config: BridgeConfig, host: PluginHost) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    app[CONFIG_KEY] = config
    app[HOST_KEY] = host
    app[READY_KEY] = {"plugins": False}
    app.router.add_get("/livez", livez)
    app.router.add_get("/healthz", readyz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics/plugins/{plugin_id}", plugin_metrics)
    app.cleanup_ctx.append(_plugins_context)
    return app


async def _plugins_context(app: web.Application) -> AsyncIterator[None]:
    host = app[HOST_KEY]
    await host.load()
    await host.start(wait=app[CONFIG_KEY].plugins.start_timeout + 5)
    app[READY_KEY]["plugins"] = True
    try:
        yield
    finally:
        await host.stop()


async def livez(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    """Ready once plugins were started; ``?verbose`` lists each check, as Kubernetes does."""
    host = request.app[HOST_KEY]
    checks: list[tuple[str, bool, str]] = [
        ("plugins-started", request.app[READY_KEY]["plugins"], ""),
    ]
    for status in host.registry.statuses():
        ok = status.state is PluginState.RUNNING
        checks.append((f"plugin-{status.plugin_id}", ok, "" if ok else str(status.state)))
    healthy = all(ok for _, ok, _ in checks)
    if "verbose" in request.query:
        lines = [
            f"[{'+' if ok else '-'}]{name} {'ok' if ok else 'failed: ' + why}"
            for name, ok, why in checks
        ]
        lines.append(f"{request.path[1:]} check {'passed' if healthy else 'failed'}")
        body = "\n".join(lines) + "\n"
    else:
        body = "ok" if healthy else "not ready"
    return web.Response(status=200 if healthy else 503, text=body)


async def plugin_metrics(request: web.Request) -> web.Response:
    """The plugin's own Prometheus metrics (``CollectMetrics``), passed on unchanged."""
    plugin_id = request.match_info["plugin_id"]
    client = request.app[HOST_KEY].registry.client(plugin_id)
    response = await client.collect_metrics(
        pb.CollectMetricsRequest(pluginContext=pb.PluginContext(pluginId=plugin_id))
    )
    return web.Response(
        body=response.metrics.prometheus,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )
