"""OpenAPI for the DataPlaneService group: v3 for kubectl's validation and ``explain``, a bare v2.

kubectl's default ``--validate=strict`` first downloads ``/openapi/v2`` (as protobuf only)
and then asks ``/openapi/v3`` whether the type's PATCH operation takes the
``fieldValidation`` query parameter. We say it does, so kubectl leaves validation to the
server (``fieldValidation=Strict``), which checks unknown and duplicate fields and answers
422 for invalid ones: ``kubectl apply`` works without ``--validate=false``, unlike upstream,
which serves no OpenAPI at all. The v2 document is deliberately empty: client-side
validation skips types it has no schema for, and no kubectl path needs our v2 schema.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web

from bridge.apis import GROUP, RESOURCE, VERSION
from bridge.apiserver import errors, schema
from bridge.apiserver.negotiation import JSON, parse_accept

OPENAPI_V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
OPENAPI_V3_PROTOBUF = "application/com.github.proto-openapi.spec.v3@v1.0+protobuf"
TITLE = "Grafana Aggregator"
DOC_VERSION = "0.1"
V3_PATH = f"apis/{GROUP}/{VERSION}"
_BASE = f"/apis/{GROUP}/{VERSION}/{RESOURCE}"
PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
)


def _query(name: str, description: str, kind: str = "string") -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": kind, "uniqueItems": True},
    }


_PRETTY = _query("pretty", "If 'true', the output is pretty printed.")
_DRY_RUN = _query("dryRun", "When present (only All is valid), nothing is persisted.")
_FIELD_MANAGER = _query("fieldManager", "A name for the actor making the change.")
_FIELD_VALIDATION = _query(
    "fieldValidation",
    "How to treat unknown and duplicate fields: Ignore, Warn (default) or Strict.",
)
_FORCE = _query("force", "Server-side apply: take fields other managers own.", "boolean")
_LIST = [
    _query("labelSelector", "Only objects whose labels match (=, ==, !=, in, notin, exists)."),
    _query("fieldSelector", "Only objects whose fields match (metadata.name, metadata.namespace)."),
    _query("limit", "At most this many items; continue with metadata.continue.", "integer"),
    _query("continue", "The continue token from the previous page."),
    _query("resourceVersion", "Where a list or watch starts (see docs)."),
    _query("resourceVersionMatch", "How resourceVersion applies to a list: NotOlderThan, Exact."),
    _query("watch", "Stream changes instead of listing.", "boolean"),
    _query("allowWatchBookmarks", "Send BOOKMARK events while idle.", "boolean"),
    _query(
        "sendInitialEvents", "Begin a watch with the current objects, then a bookmark.", "boolean"
    ),
    _query("timeoutSeconds", "End a watch after this many seconds.", "integer"),
]
_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "name of the DataPlaneService",
    "schema": {"type": "string", "uniqueItems": True},
}


def _content(schema_name: str) -> dict[str, Any]:
    body = {"schema": schema.ref(schema_name)}
    return {JSON: body, "application/yaml": body}


def _operation(
    action: str,
    operation_id: str,
    description: str,
    *,
    response: str = schema.OBJECT,
    codes: tuple[str, ...] = ("200",),
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [f"aggregation{VERSION.capitalize()}"],
        "description": description,
        "operationId": operation_id,
        "parameters": parameters or [],
        "responses": {code: {"description": "OK", "content": _content(response)} for code in codes}
        | {"401": {"description": "Unauthorized"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": schema.GVK,
    }
    if body is not None:
        op["requestBody"] = body
    return op


def _write_body(schema_name: str = schema.OBJECT) -> dict[str, Any]:
    return {"content": _content(schema_name), "required": True}


def _patch_body() -> dict[str, Any]:
    return {
        "content": {kind: {"schema": schema.ref(schema.PATCH)} for kind in PATCH_TYPES},
        "required": True,
    }


def _item_operations(suffix: str, what: str) -> dict[str, Any]:
    ident = "DataPlaneService" + suffix
    writes = [_DRY_RUN, _FIELD_MANAGER, _FIELD_VALIDATION]
    return {
        "get": _operation("get", f"read{ident}", f"read the specified {what}"),
        "put": _operation(
            "put",
            f"replace{ident}",
            f"replace the specified {what} (metadata.resourceVersion is required)",
            codes=("200", "201"),
            parameters=writes,
            body=_write_body(),
        ),
        "patch": _operation(
            "patch",
            f"patch{ident}",
            f"partially update the specified {what}",
            codes=("200", "201"),
            parameters=[*writes, _FORCE],
            body=_patch_body(),
        ),
        "parameters": [_NAME, _PRETTY],
    }


def v3_document() -> dict[str, Any]:
    """The OpenAPI v3 document of ``aggregation.grafana.app/v0alpha1``."""
    collection = {
        "get": _operation(
            "list",
            "listDataPlaneService",
            "list or watch DataPlaneServices",
            response=schema.LIST,
            parameters=_LIST,
        ),
        "post": _operation(
            "post",
            "createDataPlaneService",
            "create a DataPlaneService",
            codes=("200", "201", "202"),
            parameters=[_DRY_RUN, _FIELD_MANAGER, _FIELD_VALIDATION],
            body=_write_body(),
        ),
        "delete": _operation(
            "deletecollection",
            "deleteCollectionDataPlaneService",
            "delete a collection of DataPlaneServices",
            response=schema.LIST,
            parameters=[*_LIST[:2], _DRY_RUN],
        ),
        "parameters": [_PRETTY],
    }
    item = _item_operations("", "DataPlaneService")
    item["delete"] = _operation(
        "delete",
        "deleteDataPlaneService",
        "delete a DataPlaneService",
        codes=("200", "202"),
        parameters=[_DRY_RUN],
        body={"content": _content(schema.DELETE_OPTIONS)},
    )
    return {
        "openapi": "3.0.0",
        "info": {"title": TITLE, "version": DOC_VERSION},
        "paths": {
            _BASE: collection,
            f"{_BASE}/{{name}}": item,
            f"{_BASE}/{{name}}/status": _item_operations("Status", "DataPlaneService's status"),
        },
        "components": {"schemas": schema.SCHEMAS},
    }


_V3_JSON = json.dumps(v3_document(), separators=(",", ":"))
V3_HASH = hashlib.sha512(_V3_JSON.encode()).hexdigest().upper()


def v3_paths() -> dict[str, dict[str, str]]:
    """Our entries of the ``/openapi/v3`` discovery document, for merging with others'."""
    return {V3_PATH: {"serverRelativeURL": f"/openapi/v3/{V3_PATH}?hash={V3_HASH}"}}


def _accepts(request: web.Request, *types: str) -> str | None:
    header = request.headers.get("Accept", "").strip()
    if not header:
        return types[0]
    for media in parse_accept(header):
        for kind in types:
            if media.type in (kind, "*/*") and not media.params.get("as"):
                return kind
    return None


async def openapi_v3_root(request: web.Request) -> web.Response:
    if _accepts(request, JSON) is None:
        raise errors.not_acceptable([JSON])
    return web.json_response({"paths": v3_paths()})


async def openapi_v3_group_version(request: web.Request) -> web.Response:
    if _accepts(request, JSON) is None:
        raise errors.not_acceptable([JSON])
    response = web.Response(text=_V3_JSON, content_type=JSON)
    response.headers["ETag"] = f'"{V3_HASH}"'
    if request.query.get("hash") == V3_HASH:
        response.headers["Cache-Control"] = "public, immutable"
    else:
        response.headers["Cache-Control"] = "no-cache, private"
    return response


# -- v2 ---------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (strings and embedded messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def v2_protobuf() -> bytes:
    """``openapi.v2.Document{swagger: "2.0", info: {title, version}}`` in protobuf form.

    Field numbers are those of gnostic's OpenAPIv2.proto (Document.swagger = 1,
    Document.info = 2; Info.title = 1, Info.version = 2).
    """
    info = _field(1, TITLE.encode()) + _field(2, DOC_VERSION.encode())
    return _field(1, b"2.0") + _field(2, info)


def v2_document() -> dict[str, Any]:
    return {"swagger": "2.0", "info": {"title": TITLE, "version": DOC_VERSION}, "paths": {}}


async def openapi_v2(request: web.Request) -> web.Response:
    kind = _accepts(request, JSON, OPENAPI_V2_PROTOBUF)
    if kind == OPENAPI_V2_PROTOBUF:
        response = web.Response(body=v2_protobuf())
        response.headers["Content-Type"] = OPENAPI_V2_PROTOBUF
        return response
    if kind == JSON:
        return web.json_response(v2_document())
    raise errors.not_acceptable([JSON, OPENAPI_V2_PROTOBUF])
