"""Errors as Kubernetes ``Status`` bodies: the one place the error tree meets HTTP."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from http import HTTPStatus

from aiohttp import web

from plugin_host.errors import (
    MessageTooLarge,
    NotImplementedByPlugin,
    PluginCallError,
    PluginError,
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


@dataclass(frozen=True, slots=True)
class StatusError(Exception):
    """An HTTP failure the bridge answers deliberately, rendered as a ``Status``."""

    code: int
    message: str
    reason: str | None = None
    retry_after: float | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{self.code} {self.message}"


def status_body(code: int, message: str, reason: str | None = None) -> dict[str, object]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, HTTPStatus(code).phrase.replace(" ", "")),
        "code": code,
    }


def status_response(error: StatusError) -> web.Response:
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return web.Response(
        status=error.code,
        text=json.dumps(status_body(error.code, error.message, error.reason)),
        content_type="application/json",
        headers=headers,
    )


def from_plugin_error(error: PluginError) -> StatusError:
    """Map the plugin host's exception tree onto HTTP codes."""
    if isinstance(error, PluginNotFound):
        return StatusError(404, str(error))
    if isinstance(error, PluginUnavailable):
        return StatusError(503, str(error), retry_after=error.retry_after or 1.0)
    if isinstance(error, PluginTimeout):
        return StatusError(504, str(error))
    if isinstance(error, NotImplementedByPlugin):
        return StatusError(501, str(error))
    if isinstance(error, MessageTooLarge):
        return StatusError(502, str(error))
    if isinstance(error, PluginCallError):
        return StatusError(502, str(error))
    return StatusError(503, str(error), retry_after=1.0)
