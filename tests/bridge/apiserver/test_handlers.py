"""The DataPlaneService handlers over HTTP, one row per behaviour (status code and body).

Each row seeds the fake store, sends one request, and checks the answer: the code, the
Status reason and message for failures, and what the store holds afterwards.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.bridge.apiserver.conftest import (
    ADMIN,
    BASE,
    VIEWER,
    bearer,
    build_app,
    condition,
    sample,
    with_status,
)
from tests.bridge.apiserver.store import ObservedStore

Client = TestClient[web.Request, web.Application]

NAME = "v0alpha1.prometheus.grafana.app"
ITEM = f"{BASE}/{NAME}"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY = "application/apply-patch+yaml"

Objects = dict[str, dict[str, Any]]
Check = Callable[[dict[str, Any], Objects], None]


@dataclass
class Row:
    method: str
    path: str
    body: Any = None
    code: int = 200
    reason: str | None = None
    message: str | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: dict(ADMIN))
    content_type: str = "application/json"
    seed: tuple[dict[str, Any], ...] = ()
    check: Check | None = None


def _with(obj: dict[str, Any], **changes: Any) -> dict[str, Any]:
    result = copy.deepcopy(obj)
    for dotted, value in changes.items():
        node = result
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return result


SEEDED = sample()
WITH_STATUS = with_status(SEEDED, condition("True", "Passed"))
FINALIZED = _with(SEEDED, metadata__finalizers=["example.com/cleanup"])


def _expect_in_store(**expected: Any) -> Check:
    def check(body: dict[str, Any], objects: Objects) -> None:
        stored = objects[NAME]
        for dotted, value in expected.items():
            node: Any = stored
            for key in dotted.split("__"):
                node = node.get(key) if isinstance(node, dict) else None
            assert node == value, f"{dotted}: {node!r} != {value!r}"

    return check


def _gone(body: dict[str, Any], objects: Objects) -> None:
    assert NAME not in objects
    assert body["metadata"]["name"] == NAME


def _causes(*fields: str) -> Check:
    def check(body: dict[str, Any], objects: Objects) -> None:
        assert [c["field"] for c in body["details"]["causes"]] == list(fields)
        assert body["details"]["name"] == NAME
        assert body["details"]["kind"] == "DataPlaneService"
        assert body["details"]["group"] == "aggregation.grafana.app"

    return check


def _reasons(*expected: tuple[str, str]) -> Check:
    def check(body: dict[str, Any], objects: Objects) -> None:
        assert [(c["field"], c["reason"]) for c in body["details"]["causes"]] == list(expected)
        assert NAME not in objects

    return check


def _check_name(body: dict[str, Any], objects: Objects) -> None:
    assert body["metadata"]["name"] == NAME
    assert body["kind"] == "DataPlaneService"


def _is_list(body: dict[str, Any], objects: Objects) -> None:
    assert body["kind"] == "DataPlaneServiceList"


def _owned_by_server(body: dict[str, Any], objects: Objects) -> None:
    assert body["metadata"]["uid"] != "mine"
    assert "namespace" not in body["metadata"]


def _nothing_stored(body: dict[str, Any], objects: Objects) -> None:
    assert objects == {}
    assert body["metadata"]["uid"]
    assert "resourceVersion" not in body["metadata"]


def _managed_by_tester(body: dict[str, Any], objects: Objects) -> None:
    entries = objects[NAME]["metadata"]["managedFields"]
    assert [(e["manager"], e["operation"]) for e in entries] == [("tester", "Apply")]


def _marked(body: dict[str, Any], objects: Objects) -> None:
    assert body["metadata"]["deletionTimestamp"]
    assert objects[NAME]["metadata"]["deletionTimestamp"] == body["metadata"]["deletionTimestamp"]


ROWS = {
    # -- reads ----------------------------------------------------------------------------
    "get": Row("GET", ITEM, seed=(SEEDED,), check=_check_name),
    "get-status-is-the-object": Row(
        "GET", f"{ITEM}/status", seed=(WITH_STATUS,), check=_check_name
    ),
    "get-missing": Row(
        "GET",
        ITEM,
        code=404,
        reason="NotFound",
        message=f'dataplaneservices.aggregation.grafana.app "{NAME}" not found',
    ),
    "get-viewer-may-read": Row("GET", ITEM, seed=(SEEDED,), headers=VIEWER),
    "get-anonymous-401": Row("GET", ITEM, headers={}, code=401, reason="Unauthorized"),
    "list-viewer": Row("GET", BASE, headers=VIEWER, check=_is_list),
    # -- create ---------------------------------------------------------------------------
    "create": Row(
        "POST",
        BASE,
        body=SEEDED,
        code=201,
        check=_expect_in_store(metadata__generation=1, metadata__resourceVersion="1"),
    ),
    "create-drops-status": Row(
        "POST", BASE, body=WITH_STATUS, code=201, check=_expect_in_store(status=None)
    ),
    "create-drops-server-owned-metadata": Row(
        "POST",
        BASE,
        body=_with(SEEDED, metadata__uid="mine", metadata__namespace="default"),
        code=201,
        check=_owned_by_server,
    ),
    "create-with-resource-version-400": Row(
        "POST",
        BASE,
        body=_with(SEEDED, metadata__resourceVersion="7"),
        code=400,
        reason="BadRequest",
        message="resourceVersion should not be set on objects to be created",
    ),
    "create-exists-409": Row(
        "POST",
        BASE,
        body=SEEDED,
        seed=(SEEDED,),
        code=409,
        reason="AlreadyExists",
        message=f'dataplaneservices.aggregation.grafana.app "{NAME}" already exists',
    ),
    "create-invalid-422-one-cause-per-field": Row(
        "POST",
        BASE,
        body=_with(
            SEEDED, spec__pluginID=None, spec__pluginType="panel", metadata__labels={"a b": "c"}
        ),
        code=422,
        reason="Invalid",
        message=f'DataPlaneService.aggregation.grafana.app "{NAME}" is invalid: [spec.pluginID: ',
        check=_causes("spec.pluginID", "spec.pluginType", "metadata.labels"),
    ),
    "create-invalid-single-cause-no-brackets": Row(
        "POST",
        BASE,
        body=_with(SEEDED, spec__pluginID=None),
        code=422,
        reason="Invalid",
        message=f'DataPlaneService.aggregation.grafana.app "{NAME}" is invalid: '
        "spec.pluginID: Required value",
    ),
    "create-service-without-type-is-a-required-value": Row(
        "POST",
        BASE,
        body=_with(
            SEEDED, spec__services=[{"method": "GET"}, {"type": "query", "method": "FETCH"}]
        ),
        code=422,
        reason="Invalid",
        message="[spec.services[0].type: Required value, spec.services[1].method: "
        'Unsupported value: "FETCH": supported values: "DELETE", "GET", ',
        check=_reasons(
            ("spec.services[0].type", "FieldValueRequired"),
            ("spec.services[1].method", "FieldValueNotSupported"),
        ),
    ),
    "create-own-group-422": Row(
        "POST",
        BASE,
        body=sample("aggregation.grafana.app"),
        code=422,
        reason="Invalid",
        message="the DataPlaneService API's own group cannot be served by a plugin",
    ),
    "create-viewer-403": Row(
        "POST",
        BASE,
        body=SEEDED,
        headers=VIEWER,
        code=403,
        reason="Forbidden",
        message='dataplaneservices.aggregation.grafana.app is forbidden: User "viewer" '
        'cannot create resource "dataplaneservices" in API group "aggregation.grafana.app" at '
        "the cluster scope: only Grafana server admins and admins of the main org may change "
        "DataPlaneServices",
    ),
    # Cluster-wide objects: an Admin of another org is a tenant and may not reroute org 1.
    "create-other-org-admin-403": Row(
        "POST",
        BASE,
        body=SEEDED,
        headers=bearer("tenant-admin-token"),
        code=403,
        reason="Forbidden",
    ),
    "create-editor-403": Row(
        "POST", BASE, body=SEEDED, headers=bearer("editor-token"), code=403, reason="Forbidden"
    ),
    "create-server-admin-without-org-role": Row(
        "POST", BASE, body=SEEDED, headers=bearer("root-token"), code=201
    ),
    "create-anonymous-401": Row("POST", BASE, body=SEEDED, headers={}, code=401),
    "create-strict-unknown-field-400": Row(
        "POST",
        f"{BASE}?fieldValidation=Strict",
        body=_with(SEEDED, spec__extra=1, metadata__bogus=True),
        code=400,
        reason="BadRequest",
        message='DataPlaneService in version "v0alpha1" cannot be handled as a DataPlaneService: '
        'strict decoding error: unknown field "metadata.bogus", unknown field "spec.extra"',
    ),
    "create-unknown-field-pruned-by-default": Row(
        "POST",
        BASE,
        body=_with(SEEDED, spec__extra=1),
        code=201,
        check=_expect_in_store(spec__extra=None),
    ),
    "create-bad-field-validation-400": Row(
        "POST", f"{BASE}?fieldValidation=Loose", body=SEEDED, code=400, reason="BadRequest"
    ),
    "create-dry-run-stores-nothing": Row(
        "POST",
        f"{BASE}?dryRun=All",
        body=SEEDED,
        code=201,
        check=_nothing_stored,
    ),
    "create-dry-run-exists-409": Row(
        "POST", f"{BASE}?dryRun=All", body=SEEDED, seed=(SEEDED,), code=409, reason="AlreadyExists"
    ),
    "create-not-json-400": Row(
        "POST", BASE, body="{nope", code=400, reason="BadRequest", message="not valid JSON"
    ),
    "create-not-an-object-400": Row("POST", BASE, body=[1], code=400, reason="BadRequest"),
    "create-yaml-body": Row(
        "POST",
        BASE,
        body="apiVersion: aggregation.grafana.app/v0alpha1\nkind: DataPlaneService\n"
        f"metadata: {{name: {NAME}}}\nspec: {{pluginID: p, pluginType: app, "
        "group: prometheus.grafana.app, version: v0alpha1}\n",
        content_type="application/yaml",
        code=201,
    ),
    "create-unknown-content-type-415": Row(
        "POST", BASE, body="x", content_type="text/plain", code=415, reason="UnsupportedMediaType"
    ),
    # -- update ---------------------------------------------------------------------------
    "update": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, spec__pluginID="other", metadata__resourceVersion="1"),
        seed=(SEEDED,),
        check=_expect_in_store(spec__pluginID="other", metadata__generation=2),
    ),
    "update-keeps-status": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, status={"conditions": []}, metadata__resourceVersion="2"),
        seed=(WITH_STATUS,),
        check=_expect_in_store(status=WITH_STATUS["status"]),
    ),
    "update-label-only-keeps-generation": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, metadata__labels={"a": "b"}, metadata__resourceVersion="1"),
        seed=(SEEDED,),
        check=_expect_in_store(metadata__generation=1, metadata__labels={"a": "b"}),
    ),
    "update-needs-resource-version-422": Row(
        "PUT",
        ITEM,
        body=SEEDED,
        seed=(SEEDED,),
        code=422,
        reason="Invalid",
        message="metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
    ),
    "update-stale-409": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, metadata__resourceVersion="1"),
        seed=(WITH_STATUS,),
        code=409,
        reason="Conflict",
        message=f'Operation cannot be fulfilled on dataplaneservices.aggregation.grafana.app "{NAME}": '
        "the object has been modified",
    ),
    "update-never-creates-404": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, metadata__resourceVersion="1"),
        code=404,
        reason="NotFound",
    ),
    "update-name-mismatch-400": Row(
        "PUT",
        f"{BASE}/v0alpha1.other.grafana.app",
        body=_with(SEEDED, metadata__resourceVersion="1"),
        seed=(SEEDED,),
        code=400,
        reason="BadRequest",
        message=f"the name of the object ({NAME}) does not match the name on the URL "
        "(v0alpha1.other.grafana.app)",
    ),
    "update-uid-precondition-409": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, metadata__resourceVersion="1", metadata__uid="another"),
        seed=(SEEDED,),
        code=409,
        reason="Conflict",
        message="Precondition failed: UID in precondition: another",
    ),
    "update-invalid-422": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, spec__group="Not A Group", metadata__resourceVersion="1"),
        seed=(SEEDED,),
        code=422,
        reason="Invalid",
    ),
    "update-viewer-403": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, metadata__resourceVersion="1"),
        seed=(SEEDED,),
        headers=VIEWER,
        code=403,
        message='cannot update resource "dataplaneservices"',
    ),
    "update-warns-about-unknown-fields": Row(
        "PUT",
        ITEM,
        body=_with(SEEDED, spec__extra=1, metadata__resourceVersion="1"),
        seed=(SEEDED,),
        check=_expect_in_store(spec__extra=None),
    ),
    "update-dry-run": Row(
        "PUT",
        f"{ITEM}?dryRun=All",
        body=_with(SEEDED, spec__pluginID="other", metadata__resourceVersion="1"),
        seed=(SEEDED,),
        check=_expect_in_store(spec__pluginID="prometheus", metadata__resourceVersion="1"),
    ),
    # -- status ---------------------------------------------------------------------------
    "status-update-changes-only-status": Row(
        "PUT",
        f"{ITEM}/status",
        body=_with(
            WITH_STATUS,
            spec__pluginID="ignored",
            metadata__labels={"x": "y"},
            metadata__resourceVersion="1",
        ),
        seed=(SEEDED,),
        check=_expect_in_store(
            spec__pluginID="prometheus",
            metadata__labels=None,
            status=WITH_STATUS["status"],
        ),
    ),
    "status-update-needs-resource-version": Row(
        "PUT", f"{ITEM}/status", body=WITH_STATUS, seed=(SEEDED,), code=422, reason="Invalid"
    ),
    "status-update-viewer-403": Row(
        "PUT",
        f"{ITEM}/status",
        body=_with(WITH_STATUS, metadata__resourceVersion="1"),
        seed=(SEEDED,),
        headers=VIEWER,
        code=403,
        message='cannot update resource "dataplaneservices/status"',
    ),
    "status-merge-patch": Row(
        "PATCH",
        f"{ITEM}/status",
        body={"status": {"conditions": [condition("False", "PluginNotRunning")]}, "spec": None},
        content_type=MERGE,
        seed=(SEEDED,),
        check=_expect_in_store(
            status__conditions=[condition("False", "PluginNotRunning")], spec__pluginID="prometheus"
        ),
    ),
    "status-patch-missing-404": Row(
        "PATCH", f"{ITEM}/status", body={}, content_type=MERGE, code=404, reason="NotFound"
    ),
    # -- patch ----------------------------------------------------------------------------
    "merge-patch": Row(
        "PATCH",
        ITEM,
        body={"metadata": {"labels": {"team": "a"}}, "spec": {"pluginID": "p2"}},
        content_type=MERGE,
        seed=(SEEDED,),
        check=_expect_in_store(
            metadata__labels={"team": "a"}, spec__pluginID="p2", metadata__generation=2
        ),
    ),
    "merge-patch-keeps-status": Row(
        "PATCH",
        ITEM,
        body={"status": None},
        content_type=MERGE,
        seed=(WITH_STATUS,),
        check=_expect_in_store(status=WITH_STATUS["status"]),
    ),
    "merge-patch-stale-resource-version-409": Row(
        "PATCH",
        ITEM,
        body={"metadata": {"resourceVersion": "1"}, "spec": {"pluginID": "p2"}},
        content_type=MERGE,
        seed=(WITH_STATUS,),
        code=409,
        reason="Conflict",
    ),
    "merge-patch-current-resource-version": Row(
        "PATCH",
        ITEM,
        body={"metadata": {"resourceVersion": "2"}, "spec": {"pluginID": "p2"}},
        content_type=MERGE,
        seed=(WITH_STATUS,),
        check=_expect_in_store(spec__pluginID="p2"),
    ),
    "merge-patch-invalid-422": Row(
        "PATCH",
        ITEM,
        body={"spec": {"version": "one"}},
        content_type=MERGE,
        seed=(SEEDED,),
        code=422,
        reason="Invalid",
        check=_causes("spec.version", "metadata.name"),
    ),
    "merge-patch-rename-400": Row(
        "PATCH",
        ITEM,
        body={"metadata": {"name": "v1.other.grafana.app"}},
        content_type=MERGE,
        seed=(SEEDED,),
        code=400,
        reason="BadRequest",
    ),
    "merge-patch-missing-404": Row(
        "PATCH", ITEM, body={}, content_type=MERGE, code=404, reason="NotFound"
    ),
    "merge-patch-strict-unknown-400": Row(
        "PATCH",
        f"{ITEM}?fieldValidation=Strict",
        body={"spec": {"bogus": 1}},
        content_type=MERGE,
        seed=(SEEDED,),
        code=400,
        message='unknown field "spec.bogus"',
    ),
    "merge-patch-viewer-403": Row(
        "PATCH", ITEM, body={}, content_type=MERGE, seed=(SEEDED,), headers=VIEWER, code=403
    ),
    "json-patch": Row(
        "PATCH",
        ITEM,
        body=[
            {"op": "test", "path": "/spec/pluginID", "value": "prometheus"},
            {"op": "add", "path": "/spec/services/-", "value": {"type": "route"}},
        ],
        content_type=JSON_PATCH,
        seed=(SEEDED,),
        check=_expect_in_store(spec__services=[{"type": "query"}, {"type": "route"}]),
    ),
    "json-patch-failed-test-422": Row(
        "PATCH",
        ITEM,
        body=[{"op": "test", "path": "/spec/pluginID", "value": "loki"}],
        content_type=JSON_PATCH,
        seed=(SEEDED,),
        code=422,
        reason="Invalid",
        message="the JSON patch could not be applied",
    ),
    "json-patch-malformed-400": Row(
        "PATCH",
        ITEM,
        body=[{"op": "frobnicate", "path": "/spec"}],
        content_type=JSON_PATCH,
        seed=(SEEDED,),
        code=400,
        reason="BadRequest",
    ),
    "json-patch-not-a-list-400": Row(
        "PATCH", ITEM, body={}, content_type=JSON_PATCH, seed=(SEEDED,), code=400
    ),
    "strategic-merge-patch-415": Row(
        "PATCH",
        ITEM,
        body={},
        content_type="application/strategic-merge-patch+json",
        seed=(SEEDED,),
        code=415,
        reason="UnsupportedMediaType",
        message="accepted media types include: application/json-patch+json, "
        "application/merge-patch+json, application/apply-patch+yaml",
    ),
    "apply-creates": Row(
        "PATCH",
        f"{ITEM}?fieldManager=tester",
        body=json.dumps(SEEDED),
        content_type=APPLY,
        code=201,
        check=_managed_by_tester,
    ),
    "apply-needs-field-manager-400": Row(
        "PATCH",
        ITEM,
        body=json.dumps(SEEDED),
        content_type=APPLY,
        code=400,
        message="fieldManager is required",
    ),
    "apply-updates": Row(
        "PATCH",
        f"{ITEM}?fieldManager=tester&force=true",
        body=json.dumps(_with(SEEDED, spec__pluginID="p3")),
        content_type=APPLY,
        seed=(SEEDED,),
        check=_expect_in_store(spec__pluginID="p3"),
    ),
    "apply-status-never-creates-404": Row(
        "PATCH",
        f"{ITEM}/status?fieldManager=tester",
        body=json.dumps(WITH_STATUS),
        content_type=APPLY,
        code=404,
    ),
    # -- delete ---------------------------------------------------------------------------
    "delete-returns-the-object": Row("DELETE", ITEM, seed=(SEEDED,), check=_gone),
    "delete-missing-404": Row("DELETE", ITEM, code=404, reason="NotFound"),
    "delete-viewer-403": Row(
        "DELETE",
        ITEM,
        seed=(SEEDED,),
        headers=VIEWER,
        code=403,
        message='cannot delete resource "dataplaneservices"',
    ),
    "delete-precondition-version-409": Row(
        "DELETE",
        ITEM,
        body={
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "preconditions": {"resourceVersion": "9"},
        },
        seed=(SEEDED,),
        code=409,
        reason="Conflict",
    ),
    "delete-precondition-uid-409": Row(
        "DELETE",
        ITEM,
        body={"preconditions": {"uid": "someone-else"}},
        seed=(SEEDED,),
        code=409,
        message="Precondition failed: UID in precondition: someone-else",
    ),
    "delete-matching-preconditions": Row(
        "DELETE",
        ITEM,
        body={"preconditions": {"resourceVersion": "1"}},
        seed=(SEEDED,),
        check=_gone,
    ),
    "delete-dry-run-keeps-it": Row(
        "DELETE",
        ITEM,
        body={"dryRun": ["All"]},
        seed=(SEEDED,),
        check=_expect_in_store(metadata__name=NAME),
    ),
    "delete-with-finalizer-marks-202": Row(
        "DELETE",
        ITEM,
        seed=(FINALIZED,),
        code=202,
        check=_marked,
    ),
}


async def _seed(store: ObservedStore, objects: tuple[dict[str, Any], ...]) -> None:
    for obj in objects:
        status = obj.get("status")
        fresh = copy.deepcopy({k: v for k, v in obj.items() if k != "status"})
        fresh["metadata"]["generation"] = 1  # as the API would have created it
        created = await store.create(fresh)
        if status is not None:
            created["status"] = copy.deepcopy(status)
            await store.update(created, expected_version=None)


@pytest.mark.parametrize("row", [pytest.param(r, id=i) for i, r in ROWS.items()])
async def test_handler(client: Client, store: ObservedStore, row: Row) -> None:
    await _seed(store, row.seed)
    data: str | None
    if row.body is None:
        data = None
    elif isinstance(row.body, str):
        data = row.body
    else:
        data = json.dumps(row.body)
    headers = {**row.headers, "Content-Type": row.content_type}
    response = await client.request(row.method, row.path, data=data, headers=headers)
    text = await response.text()
    assert response.status == row.code, text
    body = json.loads(text)
    if row.code >= 400:
        assert body["kind"] == "Status"
        assert body["code"] == row.code
    if row.reason is not None:
        assert body["reason"] == row.reason
    if row.message is not None:
        assert row.message in body["message"]
    if row.check is not None:
        row.check(body, await store.snapshot())


# -- behaviours that need more than one request ----------------------------------------------


async def test_unknown_fields_come_back_as_warnings(client: Client) -> None:
    body = _with(SEEDED, spec__extra=1, bogus=2)
    response = await client.post(BASE, json=body, headers=ADMIN)
    assert response.status == 201
    assert response.headers.getall("Warning") == [
        '299 - "unknown field \\"spec.extra\\""',
        '299 - "unknown field \\"bogus\\""',
    ]


async def test_duplicate_fields_are_reported(client: Client) -> None:
    raw = json.dumps(SEEDED)[:-1] + ', "kind": "DataPlaneService"}'
    strict = await client.post(
        f"{BASE}?fieldValidation=Strict",
        data=raw,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert strict.status == 400
    assert 'duplicate field "kind"' in (await strict.json())["message"]
    ignored = await client.post(
        f"{BASE}?fieldValidation=Ignore",
        data=raw,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert ignored.status == 201
    assert "Warning" not in ignored.headers


async def test_removing_the_last_finalizer_deletes(client: Client, store: ObservedStore) -> None:
    await _seed(store, (FINALIZED,))
    marked = await client.delete(ITEM, headers=ADMIN)
    assert marked.status == 202
    again = await client.delete(ITEM, headers=ADMIN)
    assert again.status == 202
    refused = await client.patch(
        ITEM,
        data=json.dumps({"metadata": {"finalizers": ["example.com/cleanup", "example.com/more"]}}),
        headers={**ADMIN, "Content-Type": MERGE},
    )
    assert refused.status == 422
    assert "no new finalizers" in (await refused.json())["message"]
    done = await client.patch(
        ITEM,
        data=json.dumps({"metadata": {"finalizers": None}}),
        headers={**ADMIN, "Content-Type": MERGE},
    )
    assert done.status == 200
    assert NAME not in await store.snapshot()


async def test_patch_retries_when_written_meanwhile(store: ObservedStore) -> None:
    """A patch without resourceVersion is re-applied to the newer object, as kube does."""
    await _seed(store, (SEEDED,))
    real_update = store.update
    raced = False

    async def racing_update(obj: dict[str, Any], *, expected_version: int | None) -> dict[str, Any]:
        nonlocal raced
        if not raced:
            raced = True
            other = (await store.snapshot())[NAME]
            other["metadata"]["labels"] = {"writer": "other"}
            await real_update(other, expected_version=None)
        return await real_update(obj, expected_version=expected_version)

    store.update = racing_update  # type: ignore[method-assign]
    async with TestClient(TestServer(build_app(store), host="127.0.0.1")) as client:
        response = await client.patch(
            ITEM,
            data=json.dumps({"spec": {"pluginID": "p2"}}),
            headers={**ADMIN, "Content-Type": MERGE},
        )
    assert response.status == 200
    stored = (await store.snapshot())[NAME]
    assert stored["spec"]["pluginID"] == "p2"
    assert stored["metadata"]["labels"] == {"writer": "other"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", ITEM, None),
        ("GET", BASE, None),
        ("POST", BASE, SEEDED),
        ("DELETE", ITEM, None),
    ],
)
async def test_store_unavailable_is_503(
    client: Client, store: ObservedStore, method: str, path: str, body: Any
) -> None:
    await store.fail()
    response = await client.request(method, path, json=body, headers=ADMIN)
    assert response.status == 503
    assert response.headers["Retry-After"] == "1"
    assert (await response.json())["reason"] == "ServiceUnavailable"


async def test_delete_collection_takes_selectors(client: Client, store: ObservedStore) -> None:
    await _seed(
        store,
        (
            sample("a.grafana.app", labels={"team": "x"}),
            sample("b.grafana.app", labels={"team": "y"}),
            sample("c.grafana.app"),
        ),
    )
    response = await client.delete(f"{BASE}?labelSelector=team", headers=ADMIN)
    assert response.status == 200
    body = await response.json()
    assert body["kind"] == "DataPlaneServiceList"
    assert [i["metadata"]["name"] for i in body["items"]] == [
        "v0alpha1.a.grafana.app",
        "v0alpha1.b.grafana.app",
    ]
    assert list(await store.snapshot()) == ["v0alpha1.c.grafana.app"]
    denied = await client.delete(BASE, headers=VIEWER)
    assert denied.status == 403
    assert (
        'cannot deletecollection resource "dataplaneservices"' in (await denied.json())["message"]
    )
