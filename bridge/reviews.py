"""Kubernetes webhook reviews: ``AdmissionReview`` (admission.k8s.io/v1) and ``ConversionReview``
(apiextensions.k8s.io/v1), parsed from the bytes an API server sends and written back.

Parsing is strict and names the field at fault (``request.kind.version``), so a misconfigured
webhook learns what to fix from the 400 alone. Nothing here calls a plugin: the handlers in
``bridge/handlers/admission.py`` and ``conversion.py`` do, with the requests built here.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import jsonpatch
from aiohttp import web

from bridge.status import StatusError
from protos.pluginv2 import backend_pb2 as pb

if TYPE_CHECKING:
    from bridge.handlers.base import Call

log = logging.getLogger(__name__)
_Review = TypeVar("_Review")

ADMISSION_API_VERSION = "admission.k8s.io/v1"
ADMISSION_KIND = "AdmissionReview"
CONVERSION_API_VERSION = "apiextensions.k8s.io/v1"
CONVERSION_KIND = "ConversionReview"

# Kubernetes operations → pluginv2's AdmissionRequest.Operation. CONNECT has no value there.
OPERATIONS: Mapping[str, pb.AdmissionRequest.Operation.ValueType] = {
    "CREATE": pb.AdmissionRequest.CREATE,
    "UPDATE": pb.AdmissionRequest.UPDATE,
    "DELETE": pb.AdmissionRequest.DELETE,
}
# The object each operation must carry (Kubernetes sends oldObject too, but plugins cope).
_NEEDS_OBJECT = frozenset({"CREATE", "UPDATE"})
JSON_PATCH = "JSONPatch"


class ReviewError(StatusError):
    """A review the bridge cannot act on: always 400, naming the field."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


# -- shared ---------------------------------------------------------------------------------


def check_content_type(request: web.Request) -> None:
    """API servers send ``application/json``; anything else is refused with 415.

    A missing Content-Type is taken as JSON (the body is parsed strictly anyway); parameters
    such as ``charset=utf-8`` are accepted, unlike upstream, which compares the whole header.
    """
    raw = request.headers.get("Content-Type")
    if raw is None:
        return
    media = raw.split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise StatusError(
            415, f"unsupported Content-Type {raw!r}: a review must be sent as application/json"
        )


async def read_review(call: Call, parse: Callable[[bytes], _Review], kind: str) -> _Review:
    """The request's review, parsed by ``parse``; a refusal is logged once (info) and raised."""
    try:
        check_content_type(call.request)
        return parse(await call.request.read())
    except StatusError as exc:
        log.info(
            "refused a%s %s for %s from %s: %s",
            "n" if kind[0] in "AEIOU" else "",
            kind,
            call.match.service.name,
            call.identity.login,
            exc.message,
        )
        raise


def review_response(document: Mapping[str, Any]) -> web.Response:
    """A review answered: 200 whatever the verdict, as an API server reads any other status as
    a failed webhook (and applies its failurePolicy)."""
    return web.Response(body=encode(document), content_type="application/json", status=200)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(body: bytes) -> Any:
    """Strict JSON: no NaN/Infinity (they could not be passed on), no runaway nesting."""
    if not body.strip():
        raise ReviewError("the request body is empty: expected a JSON review object")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ReviewError("the request body is nested too deeply") from None
    except ValueError as exc:
        raise ReviewError(f"the request body is not valid JSON: {exc}") from None


def _envelope(body: bytes, api_version: str, kind: str) -> Mapping[str, Any]:
    document = load_json(body)
    if not isinstance(document, dict):
        raise ReviewError(
            f"the request body must be a JSON object (a {kind}), not {_what(document)}"
        )
    got_version = document.get("apiVersion")
    got_kind = document.get("kind")
    if got_version != api_version:
        raise ReviewError(
            f"apiVersion: expected {api_version!r}, got {_shown(got_version)}"
            + (
                " (only v1 reviews are served: list v1 in the webhook's review versions)"
                if isinstance(got_version, str) and got_version.startswith(api_version[:-2])
                else ""
            )
        )
    if got_kind != kind:
        raise ReviewError(f"kind: expected {kind!r}, got {_shown(got_kind)}")
    request = document.get("request")
    if request is None:
        raise ReviewError(f"request: missing; a {kind} sent to a webhook must carry a request")
    if not isinstance(request, dict):
        raise ReviewError(f"request: expected an object, got {_what(request)}")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError(
            f"request.uid: expected a non-empty string, got {_shown(uid)}; the answer must echo it"
        )
    return request


def _what(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    return names.get(type(value), "an array" if isinstance(value, list) else "an object")


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return repr(value)
    return _what(value)


def _string(fields: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = fields.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        wanted = "a non-empty string" if required else "a string"
        raise ReviewError(f"{where}.{key}: expected {wanted}, got {_shown(value)}")
    return value


def _object(fields: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ReviewError(f"{where}.{key}: expected a JSON object, got {_what(value)}")
    return value


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _namespace_of(obj: Mapping[str, Any] | None) -> str:
    metadata = obj.get("metadata") if obj is not None else None
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    return namespace if isinstance(namespace, str) else ""


def result_status(
    result: pb.StatusResult | None, *, default_message: str, default_code: int
) -> dict[str, Any]:
    """A metav1.Status for a plugin's failure ``result``, filling what the plugin left out.

    ``status`` is always ``Failure``; ``code`` is the plugin's when it is an HTTP error code,
    else ``default_code``; ``reason`` only when the plugin gave one.
    """
    message = result.message if result is not None and result.message else default_message
    code = result.code if result is not None and 400 <= result.code <= 599 else default_code
    status: dict[str, Any] = {
        "metadata": {},
        "status": "Failure",
        "message": message,
        "code": code,
    }
    if result is not None and result.reason:
        status["reason"] = result.reason
    return status


# -- admission ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdmissionReviewRequest:
    """The parts of an ``AdmissionReview.request`` the bridge acts on."""

    uid: str
    group: str
    version: str
    kind: str
    operation: str
    name: str
    namespace: str  # request.namespace, else the object's (or old object's) metadata.namespace
    object: dict[str, Any] | None
    old_object: dict[str, Any] | None
    dry_run: bool

    def to_plugin(self, context: pb.PluginContext) -> pb.AdmissionRequest:
        return pb.AdmissionRequest(
            pluginContext=context,
            operation=OPERATIONS[self.operation],
            kind=pb.GroupVersionKind(group=self.group, version=self.version, kind=self.kind),
            object_bytes=encode(self.object) if self.object is not None else b"",
            old_object_bytes=encode(self.old_object) if self.old_object is not None else b"",
        )


def parse_admission_review(body: bytes) -> AdmissionReviewRequest:
    request = _envelope(body, ADMISSION_API_VERSION, ADMISSION_KIND)
    kind = request.get("kind")
    if not isinstance(kind, dict):
        raise ReviewError(
            f"request.kind: expected an object {{group, version, kind}}, got {_what(kind)}"
        )
    operation = request.get("operation")
    if operation == "CONNECT":
        raise ReviewError(
            "request.operation: CONNECT cannot be passed to a plugin (pluginv2's "
            "AdmissionRequest knows CREATE, UPDATE and DELETE only); remove CONNECT from "
            "the webhook's rules"
        )
    if operation not in OPERATIONS:
        raise ReviewError(
            f"request.operation: expected one of CREATE, UPDATE, DELETE, got {_shown(operation)}"
        )
    obj = _object(request, "object", "request")
    old = _object(request, "oldObject", "request")
    if obj is None and operation in _NEEDS_OBJECT:
        raise ReviewError(f"request.object: required for a {operation} review")
    dry_run = request.get("dryRun", False)
    if dry_run is None:
        dry_run = False
    if not isinstance(dry_run, bool):
        raise ReviewError(f"request.dryRun: expected a boolean, got {_what(dry_run)}")
    namespace = _string(request, "namespace", "request")
    return AdmissionReviewRequest(
        uid=request["uid"],
        group=_string(kind, "group", "request.kind"),
        version=_string(kind, "version", "request.kind", required=True),
        kind=_string(kind, "kind", "request.kind", required=True),
        operation=str(operation),
        name=_string(request, "name", "request"),
        namespace=namespace or _namespace_of(obj) or _namespace_of(old),
        object=obj,
        old_object=old,
        dry_run=dry_run,
    )


def admission_review(response: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND, "response": response}


def admission_response(
    uid: str,
    *,
    allowed: bool,
    warnings: Sequence[str] = (),
    result: pb.StatusResult | None = None,
    plugin_id: str = "",
    patch: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """An ``AdmissionReview.response``. A denial always carries a Status: the plugin's message,
    reason and code, else a 403 naming the plugin (what the API server itself would use)."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if not allowed:
        response["status"] = result_status(
            result, default_message=f"denied by plugin {plugin_id}", default_code=403
        )
    if patch:
        response["patchType"] = JSON_PATCH
        response["patch"] = base64.b64encode(encode(list(patch))).decode("ascii")
    if warnings:
        response["warnings"] = list(warnings)
    return response


def json_patch(original: Mapping[str, Any], mutated: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The RFC 6902 operations that turn ``original`` into ``mutated``."""
    operations: list[dict[str, Any]] = jsonpatch.make_patch(dict(original), dict(mutated)).patch
    return operations


# -- conversion -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversionReviewRequest:
    """An ``ConversionReview.request``: which version to convert the objects to."""

    uid: str
    desired_api_version: str
    objects: tuple[dict[str, Any], ...]

    @property
    def target(self) -> pb.GroupVersion:
        group, _, version = self.desired_api_version.rpartition("/")
        return pb.GroupVersion(group=group, version=version)

    def to_plugin(self, context: pb.PluginContext) -> pb.ConversionRequest:
        return pb.ConversionRequest(
            pluginContext=context,
            uid=self.uid,
            objects=[
                pb.RawObject(raw=encode(o), content_type="application/json") for o in self.objects
            ],
            target_version=self.target,
        )


def parse_conversion_review(body: bytes) -> ConversionReviewRequest:
    request = _envelope(body, CONVERSION_API_VERSION, CONVERSION_KIND)
    desired = _string(request, "desiredAPIVersion", "request", required=True)
    group, slash, version = desired.rpartition("/")
    if not version or (slash and not group) or "/" in group:
        raise ReviewError(
            f"request.desiredAPIVersion: expected 'group/version' (or 'version' for the core "
            f"group), got {desired!r}"
        )
    objects = request.get("objects")
    if not isinstance(objects, list):
        raise ReviewError(f"request.objects: expected an array of objects, got {_shown(objects)}")
    for index, obj in enumerate(objects):
        where = f"request.objects[{index}]"
        if not isinstance(obj, dict):
            raise ReviewError(f"{where}: expected a JSON object, got {_what(obj)}")
        _string(obj, "apiVersion", where, required=True)
        _string(obj, "kind", where, required=True)
    return ConversionReviewRequest(
        uid=request["uid"], desired_api_version=desired, objects=tuple(objects)
    )


def conversion_review(
    uid: str,
    *,
    converted: Sequence[Mapping[str, Any]] = (),
    failure: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``ConversionReview`` answer: the converted objects, or a Failure result."""
    if failure is not None:
        response: dict[str, Any] = {"uid": uid, "convertedObjects": [], "result": dict(failure)}
    else:
        response = {
            "uid": uid,
            "convertedObjects": [dict(o) for o in converted],
            "result": {"metadata": {}, "status": "Success"},
        }
    return {"apiVersion": CONVERSION_API_VERSION, "kind": CONVERSION_KIND, "response": response}


def check_converted(
    request: ConversionReviewRequest, answer: Sequence[pb.RawObject], plugin_id: str
) -> list[dict[str, Any]]:
    """The plugin's objects, checked as the API server will check them (same count, the
    desired apiVersion, the same kind, in order); a ``ValueError`` says what is wrong."""
    if len(answer) != len(request.objects):
        raise ValueError(
            f"plugin {plugin_id} returned {len(answer)} objects for {len(request.objects)}"
        )
    converted: list[dict[str, Any]] = []
    for index, (raw, original) in enumerate(zip(answer, request.objects, strict=True)):
        media = raw.content_type.split(";", 1)[0].strip().lower()
        if media not in ("", "application/json"):
            raise ValueError(
                f"plugin {plugin_id} returned object {index} as {raw.content_type!r}, not JSON"
            )
        try:
            obj = json.loads(raw.raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            raise ValueError(
                f"plugin {plugin_id} returned object {index} that is not a JSON object"
            )
        if obj.get("apiVersion") != request.desired_api_version:
            raise ValueError(
                f"plugin {plugin_id} returned object {index} with apiVersion "
                f"{_shown(obj.get('apiVersion'))}, not {request.desired_api_version!r}"
            )
        if obj.get("kind") != original["kind"]:
            raise ValueError(
                f"plugin {plugin_id} changed the kind of object {index} from "
                f"{original['kind']!r} to {_shown(obj.get('kind'))}"
            )
        converted.append(obj)
    return converted
