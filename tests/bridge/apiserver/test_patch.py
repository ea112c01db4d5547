"""Patch documents and server-side apply, without HTTP."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.apiserver.patch import json_patch, merge_patch, server_side_apply
from bridge.status import StatusError

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1}, {"b": 2}, {"a": 1, "b": 2}),
        ({"a": 1, "b": 2}, {"a": None}, {"b": 2}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"y": None, "z": 3}}, {"a": {"x": 1, "z": 3}}),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),
        ({"a": 1}, {"a": {"b": 1}}, {"a": {"b": 1}}),
        ({"a": {"b": 1}}, {"a": 1}, {"a": 1}),
        ({"a": 1}, {}, {"a": 1}),
        ({"a": 1}, {"missing": None}, {"a": 1}),
    ],
)
def test_merge_patch(target: dict[str, Any], patch: dict[str, Any], result: dict[str, Any]) -> None:
    before = repr(target)
    assert merge_patch(target, patch) == result
    assert repr(target) == before  # the target is not changed in place


def test_json_patch_operations() -> None:
    doc = {"spec": {"services": [{"type": "query"}], "group": "g"}}
    result = json_patch(
        doc,
        [
            {"op": "add", "path": "/spec/services/-", "value": {"type": "route"}},
            {"op": "remove", "path": "/spec/group"},
            {"op": "copy", "from": "/spec/services/0", "path": "/first"},
            {"op": "move", "from": "/first", "path": "/moved"},
            {"op": "replace", "path": "/moved/type", "value": "stream"},
            {"op": "test", "path": "/moved/type", "value": "stream"},
        ],
    )
    assert result == {
        "spec": {"services": [{"type": "query"}, {"type": "route"}]},
        "moved": {"type": "stream"},
    }


@pytest.mark.parametrize(
    ("operations", "code"),
    [
        ({"op": "add"}, 400),
        ([{"op": "add", "value": 1}], 400),
        ([{"op": "jump", "path": "/a"}], 400),
        ([{"op": "remove", "path": "/nope"}], 422),
        ([{"op": "test", "path": "/a", "value": 2}], 422),
        ([{"op": "replace", "path": "", "value": [1]}], 422),
    ],
)
def test_json_patch_errors(operations: Any, code: int) -> None:
    with pytest.raises(StatusError) as caught:
        json_patch({"a": 1}, operations)
    assert caught.value.code == code


def config(labels: dict[str, str], services: list[str], **spec: str) -> dict[str, Any]:
    return {
        "apiVersion": "aggregation.grafana.app/v0alpha1",
        "kind": "DataPlaneService",
        "metadata": {"name": "v0alpha1.x.grafana.app", "labels": labels},
        "spec": {"services": [{"type": s} for s in services], **spec},
    }


def test_apply_creates_and_records_ownership() -> None:
    result = server_side_apply(None, config({"a": "1"}, ["query"], group="g"), manager="m", now=NOW)
    assert result["spec"] == {"services": [{"type": "query"}], "group": "g"}
    (entry,) = result["metadata"]["managedFields"]
    assert entry == {
        "manager": "m",
        "operation": "Apply",
        "apiVersion": "aggregation.grafana.app/v0alpha1",
        "time": "2026-01-01T00:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {"f:labels": {"f:a": {}}},
            "f:spec": {
                "f:group": {},
                "f:services": {'k:{"type":"query"}': {".": {}, "f:type": {}}},
            },
        },
    }


def test_apply_removes_what_the_manager_stopped_applying() -> None:
    first = server_side_apply(
        None, config({"a": "1", "b": "2"}, ["query", "route"], group="g"), manager="m", now=NOW
    )
    second = server_side_apply(first, config({"a": "1"}, ["query"]), manager="m", now=NOW)
    assert second["metadata"]["labels"] == {"a": "1"}
    assert second["spec"] == {"services": [{"type": "query"}]}


def test_apply_leaves_other_writers_fields() -> None:
    first = server_side_apply(None, config({"a": "1"}, ["query"]), manager="m", now=NOW)
    first["metadata"]["labels"]["by-hand"] = "yes"  # an Update, which nobody tracks
    first["spec"]["pluginID"] = "p"
    other = server_side_apply(first, config({"o": "1"}, ["route"]), manager="other", now=NOW)
    assert other["metadata"]["labels"] == {"a": "1", "by-hand": "yes", "o": "1"}
    assert other["spec"]["services"] == [{"type": "query"}, {"type": "route"}]
    # "m" drops its label and service; what "other" applied stays.
    again = server_side_apply(other, config({}, []), manager="m", now=NOW)
    assert again["metadata"]["labels"] == {"by-hand": "yes", "o": "1"}
    assert again["spec"]["services"] == [{"type": "route"}]
    assert again["spec"]["pluginID"] == "p"
    assert [e["manager"] for e in again["metadata"]["managedFields"]] == ["other", "m"]


def test_apply_merges_list_map_items_by_type() -> None:
    current = {
        "spec": {"services": [{"type": "route", "method": "GET"}, {"type": "query"}]},
    }
    applied = server_side_apply(
        current,
        {"spec": {"services": [{"type": "route", "path": "/x"}]}},
        manager="m",
        now=NOW,
    )
    assert applied["spec"]["services"] == [
        {"type": "route", "method": "GET", "path": "/x"},
        {"type": "query"},
    ]


def test_apply_ignores_managed_fields_and_resource_version_in_the_config() -> None:
    given = config({}, [])
    given["metadata"]["managedFields"] = [{"manager": "forged"}]
    given["metadata"]["resourceVersion"] = "5"
    result = server_side_apply(None, given, manager="m", now=NOW)
    assert [e["manager"] for e in result["metadata"]["managedFields"]] == ["m"]
    assert "resourceVersion" not in result["metadata"]


def test_status_apply_is_recorded_per_subresource() -> None:
    current = config({}, ["query"])
    result = server_side_apply(
        current,
        {"status": {"conditions": [{"type": "Available", "status": "True"}]}},
        manager="controller",
        subresource="status",
        now=NOW,
    )
    (entry,) = result["metadata"]["managedFields"]
    assert entry["subresource"] == "status"
    assert result["status"]["conditions"] == [{"type": "Available", "status": "True"}]
