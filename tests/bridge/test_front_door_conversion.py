"""The ``conversion`` service type over HTTP: the CRD conversion webhook contract.

Same bridge as ``test_front_door_admission.py``. The fixture converts by rewriting
``apiVersion``; an object's ``spec`` makes it fail, drop the object, keep the wrong version,
sleep, raise a gRPC error, or report the plugin context it received (``spec.echo``).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.bridge.conftest import PY, VERSION, Answer, FrontDoor, assert_status
from tests.bridge.test_front_door_admission import (
    CALL_TIMEOUT,
    CONVERT,
    DIAG,
    DIAG_GROUP,
    hooks_door,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

UID = "0f4a7c0e-31d5-4e5e-9d4b-conversion01"
DESIRED = "things.example.com/v2"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FrontDoor]:
    async with hooks_door(tmp_path_factory.mktemp("front-door-conversion")) as running:
        yield running


def thing(name: str, *, version: str = "v1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"things.example.com/{version}",
        "kind": "Thing",
        "metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
        "spec": spec,
    }


def review(*objects: dict[str, Any], desired: str = DESIRED, uid: str = UID) -> dict[str, Any]:
    """A ConversionReview as kube-apiserver sends it to a CRD's conversion webhook."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "ConversionReview",
        "request": {"uid": uid, "desiredAPIVersion": desired, "objects": list(objects)},
    }


def response_of(answer: Answer, uid: str = UID) -> Any:
    assert answer.status == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    document = answer.json()
    assert (document["apiVersion"], document["kind"]) == (
        "apiextensions.k8s.io/v1",
        "ConversionReview",
    )
    assert set(document) == {"apiVersion", "kind", "response"}
    response = document["response"]
    assert response["uid"] == uid
    return response


def failure_of(answer: Answer) -> dict[str, Any]:
    response = response_of(answer)
    assert response["convertedObjects"] == []
    result: dict[str, Any] = response["result"]
    assert result["status"] == "Failure"
    return result


# -- converting ------------------------------------------------------------------------------


async def test_objects_are_converted_in_order(door: FrontDoor) -> None:
    objects = [thing("a", replicas=1), thing("b", version="v2"), thing("c", replicas=3)]
    response = response_of(await door.call("POST", CONVERT, body=review(*objects)))
    assert response["result"] == {"metadata": {}, "status": "Success"}
    expected = copy.deepcopy(objects)
    for obj in expected:
        obj["apiVersion"] = DESIRED
    assert response["convertedObjects"] == expected


async def test_core_group_version_is_passed_as_an_empty_group(door: FrontDoor) -> None:
    response = response_of(await door.call("POST", CONVERT, body=review(thing("a"), desired="v1")))
    assert [o["apiVersion"] for o in response["convertedObjects"]] == ["v1"]


async def test_no_objects_is_success_without_a_plugin_call(door: FrontDoor) -> None:
    before = await door.plugin_calls(PY, "convertObjects")
    response = response_of(await door.call("POST", CONVERT, body=review()))
    assert response == {
        "uid": UID,
        "convertedObjects": [],
        "result": {"metadata": {}, "status": "Success"},
    }
    assert await door.plugin_calls(PY, "convertObjects") == before


@pytest.mark.parametrize(("user", "org"), [("admin", 1), ("other", 2)])
async def test_plugin_context_is_the_callers_org_with_app_settings(
    door: FrontDoor, user: str, org: int
) -> None:
    answer = await door.call("POST", CONVERT, body=review(thing("a", echo=True)), user=user)
    (converted,) = response_of(answer)["convertedObjects"]
    facts = json.loads(converted["metadata"]["annotations"]["bridge.fixture/context"])
    assert facts["orgId"] == org
    assert facts["user"] == user
    assert facts["uid"] == UID
    assert facts["app"] == {"team": f"hooks-{org}"}
    assert facts["datasource"] is False


# -- failures in the review's result ---------------------------------------------------------


async def test_plugin_failure_is_reported_in_the_result(door: FrontDoor) -> None:
    body = review(thing("a"), thing("b", failConversion="field x cannot be converted"))
    result = failure_of(await door.call("POST", CONVERT, body=body))
    assert result == {
        "metadata": {},
        "status": "Failure",
        "message": "field x cannot be converted",
        "reason": "Invalid",
        "code": 422,
    }


PLUGIN_MISTAKES = [
    ("dropped", {"dropObject": True}, f"plugin {PY} returned 1 objects for 2"),
    (
        "wrong-version",
        {"wrongVersion": True},
        f"plugin {PY} returned object 1 with apiVersion 'things.example.com/v1', not '{DESIRED}'",
    ),
]


@pytest.mark.parametrize(
    ("spec", "message"), [m[1:] for m in PLUGIN_MISTAKES], ids=[m[0] for m in PLUGIN_MISTAKES]
)
async def test_answer_kubernetes_would_refuse_is_a_failure(
    door: FrontDoor, spec: dict[str, Any], message: str
) -> None:
    body = review(thing("a"), thing("b", **spec))
    result = failure_of(await door.call("POST", CONVERT, body=body))
    assert result == {"metadata": {}, "status": "Failure", "message": message, "code": 500}


# -- bad reviews -----------------------------------------------------------------------------


def with_request(**fields: Any) -> dict[str, Any]:
    document = review(thing("a"))
    document["request"].update(fields)
    document["request"] = {k: v for k, v in document["request"].items() if v is not None}
    return document


BAD: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("not-json", b"nope", "the request body is not valid JSON"),
    (
        "v1beta1",
        {**review(thing("a")), "apiVersion": "apiextensions.k8s.io/v1beta1"},
        "apiVersion: expected 'apiextensions.k8s.io/v1', got 'apiextensions.k8s.io/v1beta1'",
    ),
    (
        "kind",
        {**review(thing("a")), "kind": "AdmissionReview"},
        "kind: expected 'ConversionReview'",
    ),
    (
        "no-request",
        {"apiVersion": "apiextensions.k8s.io/v1", "kind": "ConversionReview"},
        "request: missing",
    ),
    ("no-uid", with_request(uid=None), "request.uid: expected a non-empty string, got nothing"),
    (
        "no-desired",
        with_request(desiredAPIVersion=None),
        "request.desiredAPIVersion: expected a non-empty string",
    ),
    (
        "desired-shape",
        with_request(desiredAPIVersion="a/b/c"),
        "request.desiredAPIVersion: expected 'group/version'",
    ),
    ("no-objects", with_request(objects=None), "request.objects: expected an array of objects"),
    ("objects-object", with_request(objects={}), "request.objects: expected an array"),
    ("object-string", with_request(objects=["x"]), "request.objects[0]: expected a JSON object"),
    (
        "object-without-kind",
        with_request(objects=[{"apiVersion": "things.example.com/v1"}]),
        "request.objects[0].kind: expected a non-empty string",
    ),
]


@pytest.mark.parametrize(("body", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
async def test_bad_review_is_400_naming_the_field(
    door: FrontDoor, body: bytes | dict[str, Any], message: str
) -> None:
    before = await door.plugin_calls(PY, "convertObjects")
    if isinstance(body, bytes):
        answer = await door.call(
            "POST", CONVERT, data=body, headers={"Content-Type": "application/json"}
        )
    else:
        answer = await door.call("POST", CONVERT, body=body)
    assert_status(answer, 400, "BadRequest", message)
    assert await door.plugin_calls(PY, "convertObjects") == before


async def test_content_type_must_be_json(door: FrontDoor) -> None:
    data = json.dumps(review(thing("a"))).encode()
    answer = await door.call(
        "POST", CONVERT, data=data, headers={"Content-Type": "application/yaml"}
    )
    assert_status(answer, 415, "UnsupportedMediaType", "must be sent as application/json")


# -- the plugin fails: still a review, with the cause in its result ---------------------------
#
# A CRD conversion webhook has no failurePolicy (admission webhooks do): an HTTP error would
# reach the API server's client only as "conversion webhook failed", without the cause.


def plugin_failure_of(answer: Answer) -> dict[str, Any]:
    """The Failure result of a review whose plugin call failed (HTTP 200, no objects)."""
    result = failure_of(answer)
    assert set(result) == {"metadata", "status", "message", "reason", "code"}, result
    return result


async def test_plugin_without_conversion_is_a_501_failure(door: FrontDoor) -> None:
    path = f"/apis/{DIAG_GROUP}/{VERSION}/conversion"
    result = plugin_failure_of(await door.call("POST", path, body=review(thing("a"))))
    assert (result["code"], result["reason"]) == (501, "NotImplemented")
    assert "ConvertObjects is not implemented by the plugin" in result["message"]
    assert DIAG in result["message"]


async def test_slow_plugin_is_a_504_failure_after_the_call_timeout(door: FrontDoor) -> None:
    started = time.monotonic()
    answer = await door.call("POST", CONVERT, body=review(thing("a", sleepMs=3000)))
    result = plugin_failure_of(answer)
    assert (result["code"], result["reason"]) == (504, "Timeout")
    assert "no answer before the deadline" in result["message"]
    assert time.monotonic() - started < CALL_TIMEOUT + 1.5


async def test_plugin_error_is_a_502_failure(door: FrontDoor) -> None:
    failed = await door.plugin_calls(PY, "convertObjects")
    result = plugin_failure_of(
        await door.call("POST", CONVERT, body=review(thing("a", fail="kaput")))
    )
    assert (result["code"], result["reason"]) == (502, "BadGateway")
    assert "kaput" in result["message"]
    assert await door.plugin_calls(PY, "convertObjects") == failed + 1
    # and the next review is served as usual
    response = response_of(await door.call("POST", CONVERT, body=review(thing("a"))))
    assert response["result"]["status"] == "Success"
