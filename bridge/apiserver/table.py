"""Server-side tables (``kubectl get``): columns Name, Available and Age, as upstream prints.

``Available`` is ``Unknown`` when the object has no Available condition, ``True`` when it
is true, and otherwise ``<status> (<reason>)`` (or just ``<status>`` without a reason) —
kube-aggregator's APIService rule, which upstream copied. ``Age`` is Kubernetes'
``HumanDuration`` of the time since creation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from bridge.apis import CONDITION_AVAILABLE, find_condition
from bridge.apiserver import errors

INCLUDE_OBJECT = ("None", "Metadata", "Object")

COLUMNS: tuple[dict[str, Any], ...] = (
    {
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "The object's name, <version>.<group>.",
        "priority": 0,
    },
    {
        "name": "Available",
        "type": "string",
        "format": "",
        "description": "Whether the plugin behind this DataPlaneService is serving.",
        "priority": 0,
    },
    {
        "name": "Age",
        "type": "string",
        "format": "",
        "description": "Time since the object was created.",
        "priority": 0,
    },
)


def include_object(query: Mapping[str, str]) -> str:
    value = query.get("includeObject", "") or "Metadata"
    if value not in INCLUDE_OBJECT:
        raise errors.bad_request(
            f"includeObject must be one of {', '.join(INCLUDE_OBJECT)}, not {value!r}"
        )
    return value


def available(obj: Mapping[str, Any]) -> str:
    condition = find_condition(obj, CONDITION_AVAILABLE)
    if condition is None:
        return "Unknown"
    status = str(condition.get("status") or "")
    if status == "True":
        return "True"
    reason = condition.get("reason")
    return f"{status} ({reason})" if reason else status


def _parse_time(text: object) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def human_duration(seconds_total: float) -> str:
    """Kubernetes' ``duration.HumanDuration``: two or three significant figures."""
    seconds = int(seconds_total)
    if seconds < -1:
        return "<invalid>"
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        rest = seconds % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = seconds // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y{rest}d" if rest else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age(obj: Mapping[str, Any], now: datetime) -> str:
    created = _parse_time((obj.get("metadata") or {}).get("creationTimestamp"))
    if created is None:
        return "<unknown>"
    return human_duration((now - created).total_seconds())


def row(obj: Mapping[str, Any], *, include: str, now: datetime) -> dict[str, Any]:
    metadata = obj.get("metadata") or {}
    result: dict[str, Any] = {"cells": [metadata.get("name", ""), available(obj), age(obj, now)]}
    if include == "Object":
        result["object"] = dict(obj)
    elif include == "Metadata":
        result["object"] = {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": dict(metadata),
        }
    return result


def table(
    objects: Iterable[Mapping[str, Any]],
    *,
    list_metadata: Mapping[str, Any],
    include: str,
    version: str,
    now: datetime,
) -> dict[str, Any]:
    """A ``meta.k8s.io`` Table of ``objects`` (one object for a get or a watch event)."""
    return {
        "kind": "Table",
        "apiVersion": f"meta.k8s.io/{version}",
        "metadata": dict(list_metadata),
        "columnDefinitions": [dict(c) for c in COLUMNS],
        "rows": [row(obj, include=include, now=now) for obj in objects],
    }
