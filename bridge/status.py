"""Errors as Kubernetes ``Status`` bodies: the one place the error tree meets HTTP."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web

from plugin_host.errors import (
    MessageTooLarge,
    NotImplementedByPlugin,
    PluginCallError,
    PluginError,
    PluginInternalError,
    PluginNotFound,
    PluginTimeout,
    PluginUnavailable,
)

# The Kubernetes StatusReason for each code the bridge answers with.
_REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    501: "NotImplemented",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class StatusError(Exception):
    """An HTTP failure the bridge answers deliberately, rendered as a ``Status``.

    A plain exception class (not a frozen dataclass): exceptions get attributes such as
    ``__traceback__`` set on their way up, e.g. through ``contextlib.contextmanager``.
    """

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        *,
        retry_after: float | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        self.retry_after = retry_after
        self.headers = headers
        self.details = details

    def __str__(self) -> str:
        return f"{self.code} {self.message}"


def status_body(
    code: int,
    message: str,
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, object]:
    body: dict[str, object] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, HTTPStatus(code).phrase.replace(" ", "")),
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


def status_response(error: StatusError) -> web.Response:
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return web.Response(
        status=error.code,
        text=json.dumps(status_body(error.code, error.message, error.reason, error.details)),
        content_type="application/json",
        headers=headers,
    )


# gRPC codes that say the connection went away rather than that the plugin answered: the
# client library reports a channel closed under a call as CANCELLED, which the bridge never
# asks for on a call it still waits on (a caller that leaves gets no answer at all).
_TRANSPORT_CODES = frozenset({"CANCELLED"})


def from_plugin_error(error: PluginError) -> StatusError:
    """Map the plugin host's exception tree onto HTTP codes, as kube-aggregator does.

    A plugin that cannot be reached (not running, restarting, died mid-call, its connection
    broke) is 503 with ``Retry-After``: the request may succeed once the supervisor has it back,
    as kube-aggregator answers 503 when its backend is unreachable. 502 is kept for a plugin
    that did answer, with an error or with something the bridge cannot pass on (a message over
    the size limit). A URL naming a plugin id that is not installed (``/metrics/plugins/x``) is
    404; a DataPlaneService whose plugin is not installed is refused earlier, with 503.
    """
    if isinstance(error, PluginNotFound):
        return StatusError(404, str(error))
    if isinstance(error, PluginUnavailable):
        return StatusError(503, str(error), retry_after=error.retry_after or 1.0)
    if isinstance(error, PluginTimeout):
        return StatusError(504, str(error))
    if isinstance(error, NotImplementedByPlugin):
        return StatusError(501, str(error))
    if isinstance(error, PluginInternalError) and error.grpc_code in _TRANSPORT_CODES:
        return StatusError(
            503,
            f"plugin {error.plugin_id}: {error.method}: the call was cancelled before the plugin "
            "answered (its connection closed or broke)",
            retry_after=1.0,
        )
    if isinstance(error, (MessageTooLarge, PluginCallError)):
        return StatusError(502, str(error))
    return StatusError(503, str(error), retry_after=1.0)
