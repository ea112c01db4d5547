"""The DataPlaneService schema, once: served as OpenAPI and used to drop unknown fields.

The same definitions feed ``/openapi/v3`` (so ``kubectl explain`` and kubectl's field
validation see them) and :func:`prune`, which removes fields the schema does not declare, as
kube-apiserver prunes custom resources, and reports them for ``fieldValidation``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bridge.apis import GROUP, KIND, VERSION, PluginType, ServiceType

_PREFIX = "com.github.grafana.grafana.pkg.aggregator.apis.aggregation.v0alpha1."
META = "io.k8s.apimachinery.pkg.apis.meta.v1."

OBJECT = _PREFIX + KIND
LIST = _PREFIX + KIND + "List"
SPEC = _PREFIX + KIND + "Spec"
SERVICE = _PREFIX + "Service"
STATUS = _PREFIX + KIND + "Status"
CONDITION = _PREFIX + KIND + "Condition"
OBJECT_META = META + "ObjectMeta"
LIST_META = META + "ListMeta"
OWNER_REFERENCE = META + "OwnerReference"
MANAGED_FIELDS = META + "ManagedFieldsEntry"
META_STATUS = META + "Status"
PATCH = META + "Patch"
DELETE_OPTIONS = META + "DeleteOptions"

GVK = {"group": GROUP, "version": VERSION, "kind": KIND}


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string", "default": ""}}

SCHEMAS: dict[str, dict[str, Any]] = {
    OBJECT: {
        "description": (
            "DataPlaneService tells the bridge which plugin serves an API group and version, "
            "and which of the plugin's services (query, route, admission, ...) it exposes. "
            "Its name is <version>.<group>."
        ),
        "type": "object",
        "properties": {
            "apiVersion": _string("APIVersion of this object: aggregation.grafana.app/v0alpha1."),
            "kind": _string("Kind of this object: DataPlaneService."),
            "metadata": {**ref(OBJECT_META), "description": "Standard object metadata."},
            "spec": {**ref(SPEC), "description": "What the plugin serves."},
            "status": {**ref(STATUS), "description": "What the bridge observed (read-only)."},
        },
        "x-kubernetes-group-version-kind": [GVK],
    },
    LIST: {
        "description": "A list of DataPlaneServices.",
        "type": "object",
        "required": ["items"],
        "properties": {
            "apiVersion": _string("APIVersion of this list."),
            "kind": _string("Kind of this list: DataPlaneServiceList."),
            "metadata": ref(LIST_META),
            "items": {"type": "array", "items": ref(OBJECT)},
        },
        "x-kubernetes-group-version-kind": [{**GVK, "kind": KIND + "List"}],
    },
    SPEC: {
        "description": "Which plugin serves which group and version, and through which services.",
        "type": "object",
        "required": ["pluginID", "pluginType", "group", "version"],
        "properties": {
            "pluginID": _string("The Grafana plugin id, e.g. prometheus."),
            "pluginType": _string(
                "The plugin's type.", enum=[t.value for t in PluginType], default=""
            ),
            "group": _string("The API group the plugin serves, e.g. prometheus.grafana.app."),
            "version": _string("The API version the plugin serves, e.g. v0alpha1."),
            "services": {
                "description": "The plugin services exposed under the group; one per type.",
                "type": "array",
                "items": ref(SERVICE),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        },
    },
    SERVICE: {
        "description": "One plugin service exposed as HTTP.",
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": _string(
                "Which pluginv2 service: query (QueryData), route (CallResource), stream, "
                "admission, conversion or datasource-proxy.",
                enum=[t.value for t in ServiceType],
            ),
            "method": _string("For route services: the one HTTP method served (any if empty)."),
            "path": _string("For route services: the path pattern under the namespace."),
        },
    },
    STATUS: {
        "description": "The observed state of a DataPlaneService.",
        "type": "object",
        "properties": {
            "conditions": {
                "description": "Current service state; the bridge maintains Available.",
                "type": "array",
                "items": ref(CONDITION),
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            }
        },
    },
    CONDITION: {
        "description": "One aspect of a DataPlaneService's state.",
        "type": "object",
        "required": ["type", "status"],
        "properties": {
            "type": _string("The condition type; Available is the one the bridge sets."),
            "status": _string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "lastTransitionTime": _string("When the status last changed.", format="date-time"),
            "reason": _string("A one-word CamelCase reason for the last transition."),
            "message": _string("A human-readable explanation of the last transition."),
        },
    },
    OBJECT_META: {
        "description": "Standard Kubernetes object metadata.",
        "type": "object",
        "properties": {
            "name": _string("The object's name; for a DataPlaneService, <version>.<group>."),
            "generateName": _string("Not used by DataPlaneServices (names are fixed)."),
            "namespace": _string("Always empty: DataPlaneServices are cluster-scoped."),
            "selfLink": _string("Deprecated; always empty."),
            "uid": _string("Unique id set by the server on create (read-only)."),
            "resourceVersion": _string(
                "Opaque version set by the server on every write; send it back on update."
            ),
            "generation": {
                "type": "integer",
                "format": "int64",
                "description": "Incremented by the server when the spec changes (read-only).",
            },
            "creationTimestamp": _string("When the object was created.", format="date-time"),
            "deletionTimestamp": _string(
                "When deletion was requested; set while finalizers remain.", format="date-time"
            ),
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "labels": {**_STRING_MAP, "description": "Labels, for selectors."},
            "annotations": {**_STRING_MAP, "description": "Annotations (free-form)."},
            "ownerReferences": {"type": "array", "items": ref(OWNER_REFERENCE)},
            "finalizers": {
                "description": "Must be empty before the object is removed.",
                "type": "array",
                "items": {"type": "string", "default": ""},
                "x-kubernetes-list-type": "set",
            },
            "managedFields": {"type": "array", "items": ref(MANAGED_FIELDS)},
        },
    },
    OWNER_REFERENCE: {
        "type": "object",
        "required": ["apiVersion", "kind", "name", "uid"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "name": {"type": "string"},
            "uid": {"type": "string"},
            "controller": {"type": "boolean"},
            "blockOwnerDeletion": {"type": "boolean"},
        },
        "x-kubernetes-map-type": "atomic",
    },
    MANAGED_FIELDS: {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "fieldsType": {"type": "string"},
            "fieldsV1": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "manager": {"type": "string"},
            "operation": {"type": "string"},
            "subresource": {"type": "string"},
            "time": {"type": "string", "format": "date-time"},
        },
    },
    LIST_META: {
        "type": "object",
        "properties": {
            "continue": {"type": "string"},
            "remainingItemCount": {"type": "integer", "format": "int64"},
            "resourceVersion": {"type": "string"},
            "selfLink": {"type": "string"},
        },
    },
    META_STATUS: {
        "description": "The answer to a failed request (and to some deletions).",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "Status"}],
    },
    PATCH: {
        "description": "A patch document; its form is given by the Content-Type.",
        "type": "object",
    },
    DELETE_OPTIONS: {
        "description": "Options of a delete: preconditions, dryRun, propagationPolicy.",
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    },
}


def _resolve(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in schema:
        schema = SCHEMAS[str(schema["$ref"]).rsplit("/", 1)[1]]
    return schema


def prune(value: Any, schema: Mapping[str, Any] | None = None, path: str = "") -> list[str]:
    """Remove, in place, every field of ``value`` the schema does not declare.

    Returns the removed fields' paths (``spec.foo``, ``spec.services[0].bar``), in document
    order, as kube reports them in ``unknown field "..."`` warnings and errors.
    """
    schema = _resolve(ref(OBJECT) if schema is None else schema)
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    removed: list[str] = []
    if isinstance(value, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(value):
            where = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                removed += prune(value[key], properties[key], where)
            elif isinstance(extra, Mapping):
                removed += prune(value[key], extra, where)
            elif properties is not None:
                del value[key]
                removed.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            removed += prune(item, schema["items"], f"{path}[{i}]")
    return removed
