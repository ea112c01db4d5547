"""``conversion`` → ``ConvertObjects``: the CRD conversion webhook contract.

An API server POSTs a ``ConversionReview`` (apiextensions.k8s.io/v1) and expects one back with
``response.uid`` echoed and either every object converted to ``desiredAPIVersion`` (same count,
same order) with ``result.status: Success``, or ``result.status: Failure`` and a message. A
failed conversion is an answer, not an HTTP error: the API server shows the message.
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
    with deps.metrics.plugin_call(plugin_id, "convertObjects"):
        answer = await client.convert_objects(request, timeout=deps.call_timeout)
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
