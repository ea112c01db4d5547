"""The aiohttp application: the bridge's own endpoints, the front door, and error handling."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import io
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.apiserver import register_routes
from bridge.limits import limits_middleware, server_kwargs
from bridge.server import Bridge
from bridge.status import StatusError, from_plugin_error, status_response
from plugin_host.errors import PluginError
from plugin_host.supervisor import PluginState
from protos.pluginv2 import backend_pb2 as pb

log = logging.getLogger(__name__)

BRIDGE_KEY = web.AppKey("bridge", Bridge)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Set by on_response_prepare: the handler has sent its status line and headers.
RESPONSE_STARTED = web.RequestKey("response-started", bool)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes a Kubernetes Status; nothing else reaches the client.

    A failure after the handler started its own response (a stream, a WebSocket) cannot be
    answered with a Status any more: a second status line would land in the body or the
    upgraded socket. Such a connection is closed instead, which the client sees as a
    truncated answer.
    """
    try:
        return await handler(request)
    except StatusError as exc:
        return _answer(request, exc)
    except PluginError as exc:
        return _answer(request, from_plugin_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _answer(request, StatusError(exc.status, exc.reason))
    except Exception:
        incident = uuid.uuid4().hex[:12]
        log.exception(
            "unhandled error in %s %s (incident %s)", request.method, request.path, incident
        )
        return _answer(
            request,
            StatusError(
                500, f"internal error (incident {incident}; details are in the bridge log)"
            ),
        )


def _answer(request: web.Request, error: StatusError) -> web.StreamResponse:
    if not request.get(RESPONSE_STARTED, False):
        return status_response(error)
    log.info(
        "closing the connection for %s %s: it failed after its answer began (%s %s)",
        request.method,
        request.path,
        error.code,
        error.message,
    )
    if request.transport is not None:
        request.transport.close()
    # aiohttp's attempt to send this on the closed transport ends as a client disconnect.
    return web.Response(status=error.code)


async def mark_response_started(request: web.Request, _: web.StreamResponse) -> None:
    request[RESPONSE_STARTED] = True


def build_app(bridge: Bridge) -> web.Application:
    limits = bridge.config.limits
    checks = limits_middleware(
        max_url_bytes=limits.max_url_bytes,
        max_header_bytes=limits.max_header_bytes,
        max_headers=limits.max_headers,
    )
    app = web.Application(
        middlewares=[errors_middleware, checks], client_max_size=limits.max_body_bytes
    )
    app[BRIDGE_KEY] = bridge
    app.on_response_prepare.append(mark_response_started)
    own: dict[str, Handler] = {
        "/livez": livez,
        "/healthz": readyz,
        "/readyz": readyz,
        "/metrics": metrics,
        "/metrics/plugins/{plugin_id}": plugin_metrics,
        "/apis": api_groups,
        "/apis/": api_groups,
    }
    for path, handler in own.items():
        app.router.add_get(path, handler)
        app.router.add_route("*", path, _read_only)
    register_routes(app.router, bridge.api)
    app.router.add_route("*", "/{tail:.*}", front_door)
    app.cleanup_ctx.append(_bridge_context)
    # Shutdown runs before aiohttp waits for in-flight handlers: stream subscribers are told
    # 1001 now, instead of being cut off when server.shutdown_grace runs out.
    app.on_shutdown.append(_close_streams)
    return app


async def _close_streams(app: web.Application) -> None:
    await app[BRIDGE_KEY].streams.close()


def handler_kwargs(bridge: Bridge) -> dict[str, Any]:
    """aiohttp request-handler options for this bridge (its parser backstops), for the runner."""
    limits = bridge.config.limits
    return server_kwargs(
        max_url_bytes=limits.max_url_bytes,
        max_header_bytes=limits.max_header_bytes,
        max_headers=limits.max_headers,
    )


async def _bridge_context(app: web.Application) -> AsyncIterator[None]:
    bridge = app[BRIDGE_KEY]
    loop = asyncio.get_running_loop()
    # `kill -USR1 <pid>`: every asyncio task's stack in the log, as Go's SIGQUIT dumps its
    # goroutines — for a bridge that seems stuck, without stopping it.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGUSR1, log_task_stacks)
    await bridge.start()  # stops what it started if it fails or is cancelled
    try:
        yield
    finally:
        await bridge.stop()


def _awaiting_frames(awaitable: object, limit: int = 40) -> list[Any]:
    """The frames of a coroutine and of everything it is awaiting, outermost first (what
    ``Task.get_stack`` leaves out: frames inside async generators and awaited coroutines)."""
    frames: list[Any] = []
    while awaitable is not None and len(frames) < limit:
        frame = next(
            (
                getattr(awaitable, name)
                for name in ("cr_frame", "ag_frame", "gi_frame")
                if getattr(awaitable, name, None) is not None
            ),
            None,
        )
        if frame is not None:
            frames.append(frame)
        awaitable = next(
            (
                getattr(awaitable, name)
                for name in ("cr_await", "ag_await", "gi_yieldfrom")
                if getattr(awaitable, name, None) is not None
            ),
            None,
        ) or (None if frame is not None else _generator_behind(awaitable))
    return frames


def _generator_behind(awaitable: object) -> object:
    """The async generator an ``async for`` step (``async_generator_asend``) belongs to; it
    exposes no attribute for it, only a reference the garbage collector can see."""
    if type(awaitable).__name__ not in ("async_generator_asend", "async_generator_athrow"):
        return None
    return next(
        (ref for ref in gc.get_referents(awaitable) if inspect.isasyncgen(ref)),
        None,
    )


def log_task_stacks() -> None:
    """Log the stack of every asyncio task of the running loop, at warning level."""
    tasks = asyncio.all_tasks()
    out = io.StringIO()
    for task in sorted(tasks, key=lambda t: t.get_name()):
        out.write(f"--- task {task.get_name()} ({'done' if task.done() else 'pending'})\n")
        for frame in _awaiting_frames(task.get_coro()):
            code = frame.f_code
            out.write(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}\n")
    log.warning("asyncio task stacks (%d tasks, SIGUSR1):\n%s", len(tasks), out.getvalue())


async def _read_only(request: web.Request) -> web.StreamResponse:
    raise StatusError(405, f"{request.path} only answers GET", headers=(("Allow", "GET, HEAD"),))


async def front_door(request: web.Request) -> web.StreamResponse:
    return await request.app[BRIDGE_KEY].dispatch(request)


async def api_groups(request: web.Request) -> web.StreamResponse:
    return await request.app[BRIDGE_KEY].api_groups(request)


async def livez(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def readyz(request: web.Request) -> web.Response:
    """Ready once plugins were started and routes loaded; ``?verbose`` lists each check.

    A single plugin that is down does not make the bridge unready (the delegate and the other
    plugins still serve); its line says so, marked ``(not counted)``.
    """
    bridge = request.app[BRIDGE_KEY]
    checks: list[tuple[str, bool, str, bool]] = [
        ("plugins-started", bridge.ready["plugins"], "plugins are still starting", True),
        ("routes-loaded", bridge.ready["routes"], "DataPlaneServices not loaded yet", True),
    ]
    for status in bridge.host.registry.statuses():
        ok = status.state is PluginState.RUNNING
        checks.append((f"plugin-{status.plugin_id}", ok, str(status.state), False))
    healthy = all(ok for _, ok, _, counted in checks if counted)
    if "verbose" in request.query:
        lines = []
        for name, ok, why, counted in checks:
            note = "" if counted else " (not counted)"
            lines.append(f"[{'+' if ok else '-'}]{name} {'ok' if ok else 'failed: ' + why + note}")
        lines.append(f"{request.path[1:]} check {'passed' if healthy else 'failed'}")
        body = "\n".join(lines) + "\n"
    else:
        body = "ok" if healthy else "not ready"
    return web.Response(status=200 if healthy else 503, text=body)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[BRIDGE_KEY].metrics.registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def plugin_metrics(request: web.Request) -> web.Response:
    """The plugin's own Prometheus metrics (``CollectMetrics``), passed on unchanged."""
    plugin_id = request.match_info["plugin_id"]
    bridge = request.app[BRIDGE_KEY]
    client = bridge.host.registry.client(plugin_id)
    with bridge.metrics.plugin_call(plugin_id, "collectMetrics"):
        response = await client.collect_metrics(
            pb.CollectMetricsRequest(pluginContext=pb.PluginContext(pluginId=plugin_id))
        )
    result = web.Response(body=response.metrics.prometheus)
    result.headers["Content-Type"] = CONTENT_TYPE_LATEST
    result.headers["X-Content-Type-Options"] = "nosniff"
    return result
