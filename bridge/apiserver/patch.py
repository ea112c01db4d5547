"""PATCH bodies: JSON merge patch, JSON patch, and a small server-side apply.

* ``application/merge-patch+json`` (RFC 7386) — what ``kubectl apply`` (client-side),
  ``kubectl edit`` and ``kubectl patch --type=merge`` send for non-builtin kinds.
* ``application/json-patch+json`` (RFC 6902) — ``kubectl patch --type=json``.
* ``application/strategic-merge-patch+json`` — 415, as kube-apiserver answers for custom
  resources: strategic merge needs Go struct tags this kind does not have.
* ``application/apply-patch+yaml`` — server-side apply, simplified: the configuration is
  merged into the object (``spec.services`` and ``status.conditions`` merge by ``type``, as
  their list-map keys say; other lists are replaced), and fields the same manager applied
  last time but left out now are removed. Each manager's applied fields are recorded in
  ``metadata.managedFields`` (operation ``Apply``). Conflicts between managers are not
  detected: ``force`` is accepted and changes nothing (docs/dataplaneservice-api.md).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import jsonpatch
import jsonpointer

from bridge.apis import API_VERSION
from bridge.apiserver import errors
from bridge.status import StatusError

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
SUPPORTED = (JSON_PATCH, MERGE_PATCH, APPLY_PATCH)

# Lists merged by key under server-side apply (x-kubernetes-list-type: map).
LIST_MAP_KEYS: Mapping[tuple[str, ...], str] = {
    ("spec", "services"): "type",
    ("status", "conditions"): "type",
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902; a malformed document is 400, one that cannot be applied 422."""
    if not isinstance(operations, list):
        raise errors.bad_request("a JSON patch must be a list of operations")
    try:
        patch = jsonpatch.JsonPatch(operations)
    except (jsonpatch.InvalidJsonPatch, jsonpointer.JsonPointerException, TypeError) as exc:
        raise errors.bad_request(f"invalid JSON patch: {exc}") from None
    try:
        result = patch.apply(target)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise StatusError(422, f"the JSON patch could not be applied: {exc}", "Invalid") from None
    if not isinstance(result, dict):
        raise StatusError(422, "a JSON patch must leave an object", "Invalid")
    return result


# -- server-side apply ------------------------------------------------------------------------

Path = tuple[str, ...]


def _key_segment(key: str, value: Any) -> str:
    return "k:" + json.dumps({key: value}, separators=(",", ":"))


# Identity fields: every configuration names them, nobody owns them (as in kube).
_UNOWNED = {("f:apiVersion",), ("f:kind",), ("f:metadata", "f:name")}


def applied_fields(config: Mapping[str, Any], path: Path = ()) -> set[Path]:
    """The field paths an apply configuration sets (list-map items as ``k:{...}`` segments)."""
    fields: set[Path] = set()
    for key, value in config.items():
        here = (*path, f"f:{key}")
        if here in _UNOWNED:
            continue
        fields.add(here)
        plain = tuple(p[2:] for p in here if p.startswith("f:"))
        map_key = LIST_MAP_KEYS.get(plain) if len(plain) == len(here) else None
        if isinstance(value, dict):
            fields |= applied_fields(value, here)
        elif isinstance(value, list) and map_key is not None:
            for item in value:
                if isinstance(item, dict) and map_key in item:
                    item_path = (*here, _key_segment(map_key, item[map_key]))
                    fields.add(item_path)
                    fields |= applied_fields(item, item_path)
    return fields


def _to_fields_v1(fields: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(fields):
        node = tree
        for segment in path:
            node = node.setdefault(segment, {})
        if path[-1].startswith("k:"):
            node["."] = {}  # the item itself, as kube marks list-map members
    return tree


def _from_fields_v1(tree: Any, path: Path = ()) -> set[Path]:
    fields: set[Path] = set()
    if isinstance(tree, dict):
        for segment, child in tree.items():
            if segment == ".":
                continue
            fields.add((*path, segment))
            fields |= _from_fields_v1(child, (*path, segment))
    return fields


def _index(items: list[Any], key: str, value: Any) -> int | None:
    """Where the list-map item whose ``key`` is ``value`` sits in ``items``."""
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get(key) == value:
            return i
    return None


def _remove(obj: Any, path: Path) -> None:
    """Remove the field at ``path`` (``f:``/``k:`` segments) if it is there."""
    node = obj
    for i, segment in enumerate(path):
        last = i == len(path) - 1
        if segment.startswith("f:") and isinstance(node, dict):
            name = segment[2:]
            if last:
                node.pop(name, None)
                return
            node = node.get(name)
        elif segment.startswith("k:") and isinstance(node, list):
            ((key, value),) = json.loads(segment[2:]).items()
            index = next(
                (
                    j
                    for j, item in enumerate(node)
                    if isinstance(item, dict) and item.get(key) == value
                ),
                None,
            )
            if index is None:
                return
            if last:
                del node[index]
                return
            node = node[index]
        else:
            return


def _merge_applied(target: Any, config: Any, path: tuple[str, ...]) -> Any:
    if isinstance(config, dict):
        result = dict(target) if isinstance(target, dict) else {}
        for key, value in config.items():
            result[key] = _merge_applied(result.get(key), value, (*path, key))
        return result
    map_key = LIST_MAP_KEYS.get(path)
    if isinstance(config, list) and map_key is not None and isinstance(target, list):
        merged = [copy.deepcopy(item) for item in target]
        for item in config:
            if not isinstance(item, dict) or map_key not in item:
                merged.append(copy.deepcopy(item))
                continue
            index = _index(merged, map_key, item[map_key])
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = _merge_applied(merged[index], item, path)
        return merged
    return copy.deepcopy(config)


def server_side_apply(
    current: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    *,
    manager: str,
    subresource: str = "",
    now: datetime | None = None,
) -> dict[str, Any]:
    """The object after ``manager`` applies ``config`` to ``current`` (None: not there yet)."""
    config = copy.deepcopy(dict(config))
    config_meta = config.get("metadata")
    if isinstance(config_meta, dict):
        config_meta.pop("managedFields", None)
        config_meta.pop("resourceVersion", None)
    fields = applied_fields(config)
    result = copy.deepcopy(dict(current)) if current is not None else {}
    entries = [
        dict(e)
        for e in ((result.get("metadata") or {}).get("managedFields") or [])
        if isinstance(e, dict)
    ]
    mine = [
        e
        for e in entries
        if e.get("manager") == manager
        and e.get("operation") == "Apply"
        and (e.get("subresource") or "") == subresource
    ]
    others: set[Path] = set()
    for entry in entries:
        if entry not in mine and entry.get("operation") == "Apply":
            others |= _from_fields_v1(entry.get("fieldsV1"))
    previous: set[Path] = set()
    for entry in mine:
        previous |= _from_fields_v1(entry.get("fieldsV1"))
    dropped = previous - fields - others
    for path in dropped:
        # Removing an ancestor removes its children; removing a child first would strip
        # the key a list-map item is found by.
        if not any(path[:i] in dropped for i in range(1, len(path))):
            _remove(result, path)
    moment = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    applied: dict[str, Any] = {
        "manager": manager,
        "operation": "Apply",
        "apiVersion": API_VERSION,
        "time": moment,
        "fieldsType": "FieldsV1",
        "fieldsV1": _to_fields_v1(fields),
    }
    if subresource:
        applied["subresource"] = subresource
    merged = _merge_applied(result, config, ())
    kept = [e for e in entries if e not in mine]
    merged.setdefault("metadata", {})["managedFields"] = [*kept, applied]
    return dict(merged)
