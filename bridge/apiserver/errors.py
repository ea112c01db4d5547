"""The ``Status`` errors of the DataPlaneService API, worded as kube-apiserver words them.

Every failure of this API is one of these constructors; the storage tree is mapped onto them
in :func:`from_store_error`, the one place it meets HTTP. kubectl reads ``reason`` and
``details`` (``Error from server (NotFound): dataplaneservices.aggregation.grafana.app "x" not
found``; an ``Invalid`` answer's causes become its ``* field: message`` lines).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bridge.apis import GROUP, KIND, RESOURCE, Cause
from bridge.identity import Identity
from bridge.status import StatusError
from bridge.storage import (
    AlreadyExists,
    Conflict,
    Expired,
    NotFound,
    StoreError,
    Unavailable,
)

GROUP_RESOURCE = f"{RESOURCE}.{GROUP}"


def _details(name: str | None, *, kind: str = RESOURCE, **extra: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"group": GROUP, "kind": kind}
    if name:
        details["name"] = name
    details.update(extra)
    return details


def not_found(name: str) -> StatusError:
    return StatusError(
        404, f'{GROUP_RESOURCE} "{name}" not found', "NotFound", details=_details(name)
    )


def already_exists(name: str) -> StatusError:
    return StatusError(
        409, f'{GROUP_RESOURCE} "{name}" already exists', "AlreadyExists", details=_details(name)
    )


def conflict(name: str, why: str) -> StatusError:
    return StatusError(
        409,
        f'Operation cannot be fulfilled on {GROUP_RESOURCE} "{name}": {why}',
        "Conflict",
        details=_details(name),
    )


def modified(name: str) -> StatusError:
    return conflict(
        name,
        "the object has been modified; please apply your changes to the latest version "
        "and try again",
    )


def invalid(name: str, causes: Sequence[Cause]) -> StatusError:
    """422 ``Invalid`` with one ``details.causes`` entry per bad field, as kube reports them."""
    listed = [f"{c.field}: {c.message}" for c in causes]
    summary = listed[0] if len(listed) == 1 else f"[{', '.join(listed)}]"
    return StatusError(
        422,
        f'{KIND}.{GROUP} "{name}" is invalid: {summary}',
        "Invalid",
        details=_details(
            name,
            kind=KIND,
            causes=[{"reason": c.reason, "message": c.message, "field": c.field} for c in causes],
        ),
    )


def bad_request(message: str) -> StatusError:
    return StatusError(400, message, "BadRequest")


def not_acceptable(supported: Sequence[str]) -> StatusError:
    return StatusError(
        406,
        f"only the following media types are accepted: {', '.join(supported)}",
        "NotAcceptable",
    )


def unsupported_media_type(content_type: str, supported: Sequence[str]) -> StatusError:
    return StatusError(
        415,
        f"the body of the request was in an unknown format ({content_type or 'none'}) - "
        f"accepted media types include: {', '.join(supported)}",
        "UnsupportedMediaType",
    )


def method_not_allowed(method: str, path: str, allowed: Sequence[str]) -> StatusError:
    return StatusError(
        405,
        f"the server does not allow this method on the requested resource ({method} {path})",
        "MethodNotAllowed",
        headers=(("Allow", ", ".join(allowed)),),
    )


def forbidden(
    identity: Identity, verb: str, *, name: str | None, subresource: str | None, why: str
) -> StatusError:
    resource = f"{RESOURCE}/{subresource}" if subresource else RESOURCE
    who = "system:anonymous" if identity.is_anonymous else identity.login
    target = f'{GROUP_RESOURCE} "{name}"' if name else GROUP_RESOURCE
    return StatusError(
        403,
        f'{target} is forbidden: User "{who}" cannot {verb} resource "{resource}" in API group '
        f'"{GROUP}" at the cluster scope: {why}',
        "Forbidden",
        details=_details(name),
    )


def expired(message: str) -> StatusError:
    return StatusError(410, message, "Expired")


def too_large_resource_version(requested: int, current: int) -> StatusError:
    """What kube answers a read at a resource version it has not reached (after its wait)."""
    return StatusError(
        504,
        f"Too large resource version: {requested}, current: {current}",
        "Timeout",
        retry_after=1.0,
        details={
            "causes": [
                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
            ],
            "retryAfterSeconds": 1,
        },
    )


def from_store_error(error: StoreError, name: str = "") -> StatusError:
    """The storage error tree as HTTP (docs/dataplaneservice-api.md lists the mapping)."""
    subject = name or error.name
    if isinstance(error, NotFound):
        return not_found(subject)
    if isinstance(error, AlreadyExists):
        return already_exists(subject)
    if isinstance(error, Conflict):
        return modified(subject)
    if isinstance(error, Expired):
        return expired(error.message)
    if isinstance(error, Unavailable):
        return StatusError(503, f"storage is unavailable: {error.message}", retry_after=1.0)
    return StatusError(500, f"storage failed: {error.message}")
