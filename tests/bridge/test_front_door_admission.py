"""The ``admission`` service type over HTTP: AdmissionReviews in, AdmissionReviews out.

One bridge runs the Python fixture (admission and conversion services, app settings
provisioned in two orgs) and two more ids of it: one serving diagnostics only, one exiting
before its handshake. The fixture's answers are chosen by the reviewed object's ``spec``
(``fixture_services.py``); ``spec.echo`` makes it report the plugin context it received.
``test_front_door_conversion.py`` uses the same bridge set-up.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import pytest_asyncio
import yaml

from plugin_host.supervisor import PluginState
from tests.bridge.conftest import (
    PY,
    VERSION,
    Answer,
    FrontDoor,
    PluginStates,
    assert_status,
    bridge_config,
    dataplane_service,
    front_door,
    python_fixture_as,
    write_manifest,
)
from tests.conftest import FIXTURE_PLUGINS

pytestmark = pytest.mark.asyncio(loop_scope="module")

CALL_TIMEOUT = 1.0
HOOKS_GROUP = "hooks.pyfixture.grafana.app"
DIAG = "bridge-pyhookless-datasource"
DIAG_GROUP = "hookless.pyfixture.grafana.app"
CRASH = "bridge-pyhookcrash-datasource"
CRASH_GROUP = "hookcrash.pyfixture.grafana.app"
HOOKS = ({"type": "admission"}, {"type": "conversion"})
THING = {"group": "things.example.com", "version": "v1", "kind": "Thing"}
VALIDATE = f"/apis/{HOOKS_GROUP}/{VERSION}/admission/validate"
MUTATE = f"/apis/{HOOKS_GROUP}/{VERSION}/admission/mutate"
CONVERT = f"/apis/{HOOKS_GROUP}/{VERSION}/conversion"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FrontDoor]:
    async with hooks_door(tmp_path_factory.mktemp("front-door-admission")) as running:
        yield running


def hooks_door(root: Path) -> AbstractAsyncContextManager[FrontDoor]:
    """The bridge both webhook test modules run against."""
    plugins = root / "plugins"
    python_fixture_as(plugins, DIAG)
    python_fixture_as(plugins, CRASH)
    apps = root / "provisioning" / "plugins"
    apps.mkdir(parents=True)
    (apps / "hooks.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": 1,
                "apps": [
                    {"type": PY, "jsonData": {"team": "hooks-1"}, "secureJsonData": {"token": "t"}},
                    {"type": PY, "org_id": 2, "jsonData": {"team": "hooks-2"}},
                ],
            }
        )
    )
    write_manifest(
        root / "dataplane",
        "hooks.yaml",
        dataplane_service(PY, HOOKS_GROUP, services=HOOKS),
        dataplane_service(DIAG, DIAG_GROUP, services=HOOKS),
        dataplane_service(CRASH, CRASH_GROUP, services=HOOKS),
    )
    config = bridge_config(
        root,
        plugin_dirs=(FIXTURE_PLUGINS, plugins),
        allow_unsigned=(PY, DIAG, CRASH),  # not the Go fixture: these tests do not need it
        overrides={
            "plugins.call_timeout": CALL_TIMEOUT,
            "plugins.env": {
                DIAG: {"FIXTURE_BEHAVIOUR": "only=diagnostics"},
                CRASH: {"FIXTURE_BEHAVIOUR": "exit_before_handshake"},
            },
            "plugins.restart": {
                "initial_backoff": 0.5,
                "multiplier": 60,
                "max_backoff": 30,
                "jitter": 0,
                "crash_loop_threshold": 2,
            },
        },
    )
    return front_door(config)


# -- reviews ---------------------------------------------------------------------------------


def thing(name: str = "t1", *, namespace: str | None = "default", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "things.example.com/v1",
        "kind": "Thing",
        "metadata": metadata,
        "spec": spec,
    }


def review(
    obj: dict[str, Any] | None,
    *,
    operation: str = "CREATE",
    old: dict[str, Any] | None = None,
    uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002",
    namespace: str | None = "default",
) -> dict[str, Any]:
    """An AdmissionReview as kube-apiserver sends it to a webhook."""
    request: dict[str, Any] = {
        "uid": uid,
        "kind": THING,
        "resource": {"group": "things.example.com", "version": "v1", "resource": "things"},
        "requestKind": THING,
        "requestResource": {"group": "things.example.com", "version": "v1", "resource": "things"},
        "name": (obj or old or {}).get("metadata", {}).get("name", ""),
        "operation": operation,
        "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters"]},
        "object": obj,
        "oldObject": old,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if namespace is not None:
        request["namespace"] = namespace
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def response_of(answer: Answer, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002") -> Any:
    """The ``response`` of a well-formed AdmissionReview answer (200, v1 envelope, uid)."""
    assert answer.status == 200, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    document = answer.json()
    assert document["apiVersion"] == "admission.k8s.io/v1"
    assert document["kind"] == "AdmissionReview"
    assert set(document) == {"apiVersion", "kind", "response"}
    response = document["response"]
    assert response["uid"] == uid
    return response


def context_warning(response: dict[str, Any]) -> dict[str, Any]:
    """The plugin context the fixture reported in a warning (``spec.echo``)."""
    (found,) = [w for w in response["warnings"] if w.startswith("context: ")]
    facts: dict[str, Any] = json.loads(found.removeprefix("context: "))
    return facts


# -- validation ------------------------------------------------------------------------------


async def test_allowed_object_is_allowed_with_the_plugins_warnings(door: FrontDoor) -> None:
    answer = await door.call("POST", VALIDATE, body=review(thing(warn="mind the gap")))
    response = response_of(answer)
    assert response == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
        "warnings": ["mind the gap"],
    }


DENIALS = [
    (
        {"denyMessage": "replicas must be odd", "denyReason": "Invalid", "denyCode": 422},
        {"message": "replicas must be odd", "reason": "Invalid", "code": 422},
    ),
    (
        {},
        {"message": "denied by the fixture: spec.deny is true", "reason": "Forbidden", "code": 403},
    ),
    # No code and no reason from the plugin: 403 (what kube-apiserver assumes), no reason.
    (
        {"denyMessage": "no", "denyReason": "", "denyCode": 0},
        {"message": "no", "code": 403},
    ),
]


@pytest.mark.parametrize(("spec", "status"), DENIALS, ids=["custom", "default", "bare"])
@pytest.mark.parametrize("path", [VALIDATE, MUTATE], ids=["validate", "mutate"])
async def test_denial_is_200_with_the_plugins_status(
    door: FrontDoor, path: str, spec: dict[str, Any], status: dict[str, Any]
) -> None:
    answer = await door.call("POST", path, body=review(thing(deny=True, **spec)))
    response = response_of(answer)
    assert response["allowed"] is False
    assert response["status"] == {"metadata": {}, "status": "Failure", **status}
    assert "patch" not in response and "patchType" not in response


# -- mutation --------------------------------------------------------------------------------


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]]:
    assert response["patchType"] == "JSONPatch"
    operations: list[dict[str, Any]] = json.loads(base64.b64decode(response["patch"]))
    return operations


async def test_mutation_answers_a_json_patch_from_the_original_object(door: FrontDoor) -> None:
    original = thing(warn="w")
    answer = await door.call("POST", MUTATE, body=review(original))
    response = response_of(answer)
    assert response["allowed"] is True
    assert response["warnings"] == ["w"]
    operations = patch_of(response)
    assert operations == [
        {"op": "add", "path": "/metadata/labels", "value": {"bridge.fixture/mutated": "true"}}
    ]
    patched = jsonpatch.apply_patch(copy.deepcopy(original), operations)
    assert patched["metadata"]["labels"] == {"bridge.fixture/mutated": "true"}
    assert {k: v for k, v in patched.items() if k != "metadata"} == {
        k: v for k, v in original.items() if k != "metadata"
    }


async def test_mutation_patch_escapes_keys_and_keeps_existing_labels(door: FrontDoor) -> None:
    original = thing()
    original["metadata"]["labels"] = {"app": "x"}
    operations = patch_of(response_of(await door.call("POST", MUTATE, body=review(original))))
    # RFC 6901: "/" in a key is written "~1".
    assert operations == [
        {"op": "add", "path": "/metadata/labels/bridge.fixture~1mutated", "value": "true"}
    ]


async def test_mutation_without_changes_has_no_patch(door: FrontDoor) -> None:
    response = response_of(await door.call("POST", MUTATE, body=review(thing(keep=True))))
    assert response == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


async def test_delete_is_reviewed_on_the_old_object_and_never_patched(door: FrontDoor) -> None:
    old = thing("gone", echo=True)
    body = review(None, operation="DELETE", old=old)
    response = response_of(await door.call("POST", MUTATE, body=body))
    assert response == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}
    facts = context_warning(response_of(await door.call("POST", VALIDATE, body=body)))
    assert (facts["operation"], facts["object"], facts["oldObject"]) == ("DELETE", None, old)


async def test_mutated_object_that_is_not_json_is_502(door: FrontDoor) -> None:
    answer = await door.call("POST", MUTATE, body=review(thing(garbage=True)))
    assert_status(answer, 502, "BadGateway", "returned a mutated object that is not JSON")


# -- what the plugin is told -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "has_old"), [("CREATE", False), ("UPDATE", True), ("DELETE", True)]
)
async def test_operation_kind_and_objects_reach_the_plugin(
    door: FrontDoor, operation: str, has_old: bool
) -> None:
    obj = None if operation == "DELETE" else thing(echo=True, replicas=3)
    old = thing(echo=True, replicas=1) if has_old else None
    answer = await door.call("POST", VALIDATE, body=review(obj, operation=operation, old=old))
    facts = context_warning(response_of(answer))
    assert facts["operation"] == operation
    assert facts["kind"] == "things.example.com/v1/Thing"
    assert (facts["object"], facts["oldObject"]) == (obj, old)


ORGS = [
    # (caller, request.namespace, object's namespace, expected org, namespace in the context)
    ("admin", "default", "default", 1, "default"),
    ("other", "org-2", "org-2", 2, "org-2"),
    ("other", None, "org-2", 2, "org-2"),  # no request.namespace: the object's
    ("other", None, None, 2, "org-2"),  # cluster-scoped: the caller's org
    ("admin", "kube-system", "kube-system", 1, "default"),  # names no Grafana org
    ("admin", "stacks-12", "stacks-12", 1, "stacks-12"),
]


@pytest.mark.parametrize(("user", "namespace", "object_ns", "org", "context_ns"), ORGS)
async def test_org_and_app_settings_follow_the_objects_namespace(
    door: FrontDoor,
    user: str,
    namespace: str | None,
    object_ns: str | None,
    org: int,
    context_ns: str,
) -> None:
    body = review(thing(namespace=object_ns, echo=True), namespace=namespace)
    facts = context_warning(response_of(await door.call("POST", VALIDATE, body=body, user=user)))
    assert facts["orgId"] == org
    assert facts["namespace"] == context_ns
    assert facts["user"] == user
    assert facts["pluginId"] == PY
    assert facts["app"] == {"team": f"hooks-{org}"}
    assert facts["appSecrets"] == (["token"] if org == 1 else [])
    assert facts["datasource"] is False


async def test_namespace_of_another_org_is_403(door: FrontDoor) -> None:
    answer = await door.call(
        "POST", VALIDATE, body=review(thing(namespace="org-2"), namespace="org-2")
    )
    assert_status(answer, 403, "Forbidden", "namespace 'org-2' belongs to org 2")


async def test_mutation_context_reaches_the_plugin(door: FrontDoor) -> None:
    response = response_of(
        await door.call("POST", MUTATE, body=review(thing(echo=True)), user="viewer")
    )
    (annotation,) = [op for op in patch_of(response) if op["path"] == "/metadata/annotations"]
    facts = json.loads(annotation["value"]["bridge.fixture/context"])
    assert (facts["orgId"], facts["user"], facts["role"]) == (1, "viewer", "Viewer")


# -- bad reviews -----------------------------------------------------------------------------


def without(key: str, document: dict[str, Any] | None = None) -> dict[str, Any]:
    document = copy.deepcopy(document or review(thing()))
    document["request"].pop(key)
    return document


def with_request(**fields: Any) -> dict[str, Any]:
    document = review(thing())
    document["request"].update(fields)
    return document


BAD: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("empty", b"", "the request body is empty"),
    ("not-json", b"{nope", "the request body is not valid JSON"),
    ("nan", b'{"apiVersion": NaN}', "NaN is not valid JSON"),
    ("array", b"[]", "must be a JSON object (a AdmissionReview), not an array"),
    (
        "v1beta1",
        {**review(thing()), "apiVersion": "admission.k8s.io/v1beta1"},
        "apiVersion: expected 'admission.k8s.io/v1', got 'admission.k8s.io/v1beta1' (only v1",
    ),
    ("no-api-version", {"kind": "AdmissionReview"}, "apiVersion: expected"),
    ("kind", {**review(thing()), "kind": "ConversionReview"}, "kind: expected 'AdmissionReview'"),
    (
        "no-request",
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
        "request: missing",
    ),
    (
        "request-not-object",
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": []},
        "request: expected an object, got an array",
    ),
    ("no-uid", without("uid"), "request.uid: expected a non-empty string, got nothing"),
    ("empty-uid", with_request(uid=""), "request.uid: expected a non-empty string"),
    ("no-kind", without("kind"), "request.kind: expected an object"),
    ("no-version", with_request(kind={"group": "g", "kind": "K"}), "request.kind.version"),
    ("no-kind-kind", with_request(kind={"group": "g", "version": "v1"}), "request.kind.kind"),
    ("connect", with_request(operation="CONNECT"), "CONNECT cannot be passed to a plugin"),
    ("operation", with_request(operation="PATCH"), "request.operation: expected one of CREATE"),
    ("no-operation", without("operation"), "request.operation: expected one of"),
    ("no-object", with_request(object=None), "request.object: required for a CREATE review"),
    ("object-string", with_request(object="x"), "request.object: expected a JSON object"),
    ("old-array", with_request(oldObject=[1]), "request.oldObject: expected a JSON object"),
    ("dry-run", with_request(dryRun="yes"), "request.dryRun: expected a boolean"),
    ("namespace", with_request(namespace=3), "request.namespace: expected a string"),
]


@pytest.mark.parametrize(("body", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
@pytest.mark.parametrize("path", [VALIDATE, MUTATE], ids=["validate", "mutate"])
async def test_bad_review_is_400_naming_the_field(
    door: FrontDoor, path: str, body: bytes | dict[str, Any], message: str
) -> None:
    endpoint = "validateAdmission" if path == VALIDATE else "mutateAdmission"
    before = await door.plugin_calls(PY, endpoint)
    if isinstance(body, bytes):
        answer = await door.call(
            "POST", path, data=body, headers={"Content-Type": "application/json"}
        )
    else:
        answer = await door.call("POST", path, body=body)
    assert_status(answer, 400, "BadRequest", message)
    assert await door.plugin_calls(PY, endpoint) == before  # the plugin never saw it


async def test_content_type_must_be_json(door: FrontDoor) -> None:
    data = json.dumps(review(thing())).encode()
    answer = await door.call("POST", VALIDATE, data=data, headers={"Content-Type": "text/plain"})
    assert_status(answer, 415, "UnsupportedMediaType", "must be sent as application/json")
    charset = {"Content-Type": "application/json; charset=utf-8"}
    assert response_of(await door.call("POST", VALIDATE, data=data, headers=charset))["allowed"]


async def test_only_post_is_served(door: FrontDoor) -> None:
    answer = await door.call("GET", VALIDATE)
    assert_status(answer, 405, "MethodNotAllowed", "use POST")
    assert answer.headers["Allow"] == "POST"


async def test_caller_must_authenticate(door: FrontDoor) -> None:
    answer = await door.call("POST", VALIDATE, body=review(thing()), user=None)
    assert answer.status == 401, answer.text


# -- the plugin fails ------------------------------------------------------------------------


async def test_plugin_without_admission_is_501(door: FrontDoor) -> None:
    for verb in ("validate", "mutate"):
        path = f"/apis/{DIAG_GROUP}/{VERSION}/admission/{verb}"
        answer = await door.call("POST", path, body=review(thing()))
        name = "ValidateAdmission" if verb == "validate" else "MutateAdmission"
        assert_status(answer, 501, "NotImplemented", f"{name} is not implemented by the plugin")


async def test_slow_plugin_is_504_after_the_call_timeout(door: FrontDoor) -> None:
    started = time.monotonic()
    answer = await door.call("POST", VALIDATE, body=review(thing(sleepMs=3000)))
    assert_status(answer, 504, "Timeout", "no answer before the deadline")
    assert time.monotonic() - started < CALL_TIMEOUT + 1.5


async def test_plugin_error_is_502_not_a_denial(door: FrontDoor) -> None:
    answer = await door.call("POST", MUTATE, body=review(thing(fail="boom")))
    assert_status(answer, 502, "BadGateway", "boom")


async def test_plugin_that_cannot_start_is_503(door: FrontDoor) -> None:
    await PluginStates(door.bridge, CRASH).reach(PluginState.CRASH_LOOP)
    path = f"/apis/{CRASH_GROUP}/{VERSION}/admission/validate"
    answer = await door.call("POST", path, body=review(thing()))
    assert_status(answer, 503, "ServiceUnavailable", "crash-looping")
    assert int(answer.headers["Retry-After"]) >= 1


async def test_calls_are_counted_per_endpoint(door: FrontDoor) -> None:
    await door.call("POST", VALIDATE, body=review(thing()))
    metrics = await door.metrics()
    for endpoint in ("validateAdmission", "mutateAdmission"):
        assert f'endpoint="{endpoint}"' in metrics, endpoint
