"""``admission`` → ``ValidateAdmission`` / ``MutateAdmission``: Kubernetes admission webhooks.

An API server POSTs an ``AdmissionReview`` (admission.k8s.io/v1) and expects one back with
``response.uid`` echoed, HTTP 200 even for a denial (``allowed: false`` plus a Status), and for
mutations an RFC 6902 JSONPatch from the object it sent to the object it should store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from aiohttp import web

from bridge.auth import authorize_namespace
from bridge.handlers.base import Call, Deps
from bridge.identity import parse_namespace
from bridge.reviews import (
    AdmissionReviewRequest,
    admission_response,
    admission_review,
    json_patch,
    parse_admission_review,
    read_review,
    review_response,
)
from bridge.status import StatusError
from protos.pluginv2 import backend_pb2 as pb

log = logging.getLogger(__name__)


async def handle_validate(call: Call, deps: Deps) -> web.StreamResponse:
    return await _admit(call, deps, mutate=False)


async def handle_mutate(call: Call, deps: Deps) -> web.StreamResponse:
    return await _admit(call, deps, mutate=True)


async def _admit(call: Call, deps: Deps, *, mutate: bool) -> web.StreamResponse:
    review = await read_review(call, parse_admission_review, "AdmissionReview")
    call = review_call(call, review)
    plugin_id = call.plugin_id
    request = review.to_plugin(deps.contexts.for_app(call))
    client = deps.client(plugin_id)
    answer: pb.ValidationResponse | pb.MutationResponse
    if mutate:
        with deps.metrics.plugin_call(plugin_id, "mutateAdmission"):
            answer = await client.mutate_admission(request, timeout=deps.call_timeout)
    else:
        with deps.metrics.plugin_call(plugin_id, "validateAdmission"):
            answer = await client.validate_admission(request, timeout=deps.call_timeout)
    if not answer.allowed:
        _log_denial(call, review, answer.result)
        response = admission_response(
            review.uid,
            allowed=False,
            warnings=answer.warnings,
            result=answer.result if answer.HasField("result") else None,
            plugin_id=plugin_id,
        )
        return review_response(admission_review(response))
    patch: list[dict[str, Any]] = []
    # No object (DELETE): nothing to patch. No object bytes: the plugin changed nothing.
    if (
        isinstance(answer, pb.MutationResponse)
        and review.object is not None
        and answer.object_bytes
    ):
        patch = _patch(plugin_id, review.object, answer.object_bytes)
    response = admission_response(review.uid, allowed=True, warnings=answer.warnings, patch=patch)
    return review_response(admission_review(response))


def review_call(call: Call, review: AdmissionReviewRequest) -> Call:
    """The call in the org the reviewed object lives in.

    The admission routes have no namespace segment: the API server calls them as a webhook.
    A Grafana namespace on the object (``default``, ``org-<N>``, ``stacks-<N>``) selects that
    org, which must be the caller's, exactly as on namespaced routes (403 otherwise). No
    namespace (cluster-scoped objects) or one that names no Grafana org (``kube-system``) runs
    in the caller's org.
    """
    if not review.namespace:
        return call
    try:
        parse_namespace(review.namespace)
    except StatusError:
        return call
    org_id = authorize_namespace(call.identity, review.namespace)
    return dataclasses.replace(call, org_id=org_id, namespace=review.namespace)


def _patch(plugin_id: str, original: dict[str, Any], raw: bytes) -> list[dict[str, Any]]:
    try:
        mutated = json.loads(raw)
    except (ValueError, RecursionError):
        mutated = None
    if not isinstance(mutated, dict):
        raise StatusError(502, f"plugin {plugin_id} returned a mutated object that is not JSON")
    try:
        return json_patch(original, mutated)
    except RecursionError:
        raise StatusError(
            502, f"plugin {plugin_id} returned a mutated object nested too deeply to compare"
        ) from None


def _log_denial(call: Call, review: AdmissionReviewRequest, result: pb.StatusResult) -> None:
    log.debug(
        "plugin %s denied %s %s/%s %s (uid %s): %s",
        call.plugin_id,
        review.operation,
        review.namespace or "-",
        review.name or "-",
        review.kind,
        review.uid,
        result.message,
    )
