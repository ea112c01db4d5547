"""``conversion`` → ``ConvertObjects``: the CRD conversion webhook contract.

An API server POSTs a ``ConversionReview`` (apiextensions.k8s.io/v1) and expects one back with
``response.uid`` echoed and either every object converted to ``desiredAPIVersion`` (same count,
same order) with ``result.status: Success``, or ``result.status: Failure`` and a message. A
failed conversion is an answer, not an HTTP error: the API server shows the message.

That includes the plugin failing the call itself (not serving ResourceConversion, down, too
slow, a gRPC error): a CRD conversion webhook has no ``failurePolicy`` (only admission webhooks
do), so an HTTP error would only reach the user as "conversion webhook ... failed" without the
cause. The result carries the same code, reason and message the Status of any other route
would. HTTP errors remain for what the API server's configuration must fix (a bad review:
400/415; credentials, the org, an app disabled in it: 401/403/404) and for the per-plugin call
limit (429, answered before this handler runs).
"""

from __future__ import annotations

import logging

from aiohttp import web

from bridge.handlers.base import Call, Deps
from bridge.reviews import (
    check_converted,
    conversion_review,
    parse_conversion_review,
    read_review,
    result_status,
    review_response,
)
from bridge.status import from_plugin_error, status_body
from plugin_host.errors import PluginError

log = logging.getLogger(__name__)


async def handle_conversion(call: Call, deps: Deps) -> web.StreamResponse:
    review = await read_review(call, parse_conversion_review, "ConversionReview")
    plugin_id = call.plugin_id
    if not review.objects:
        return review_response(conversion_review(review.uid, converted=[]))
    # The caller's org: one review may hold objects from many namespaces (a list across
    # namespaces) and is one plugin call, and converting is a function of the object alone.
    request = review.to_plugin(deps.contexts.for_app(call))
    client = deps.client(plugin_id)
    try:
        with deps.metrics.plugin_call(plugin_id, "convertObjects"):
            answer = await client.convert_objects(request, timeout=deps.call_timeout)
    except PluginError as exc:
        error = from_plugin_error(exc)
        log.warning(
            "conversion %s for %s: the plugin call failed (%s)",
            review.uid,
            call.match.service.name,
            error,
        )
        failure = status_body(error.code, error.message, error.reason)
        del failure["kind"], failure["apiVersion"]  # as a result, not a top-level object
        return review_response(conversion_review(review.uid, failure=failure))
    result = answer.result if answer.HasField("result") else None
    if result is not None and (
        result.status == "Failure" or (not result.status and result.code >= 400)
    ):
        log.debug("plugin %s failed conversion %s: %s", plugin_id, review.uid, result.message)
        failure = result_status(
            result, default_message=f"plugin {plugin_id} failed the conversion", default_code=500
        )
        return review_response(conversion_review(review.uid, failure=failure))
    try:
        converted = check_converted(review, answer.objects, plugin_id)
    except ValueError as exc:
        log.warning("conversion %s for %s: %s", review.uid, call.match.service.name, exc)
        failure = {"metadata": {}, "status": "Failure", "message": str(exc), "code": 500}
        return review_response(conversion_review(review.uid, failure=failure))
    return review_response(conversion_review(review.uid, converted=converted))
