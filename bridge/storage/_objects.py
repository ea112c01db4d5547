"""What every backend does to an object on its way in and out: the metadata the store owns.

Backends keep an object as JSON text without ``metadata.resourceVersion`` (as Kubernetes keeps
objects in etcd) and put the version back when reading, from wherever they keep it. Copying
through JSON also means a caller never shares a dict with the store.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from bridge.storage.base import WatchEvent, WatchEventType

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def object_name(obj: dict[str, Any]) -> str:
    """``metadata.name``; a name the store cannot key by is a programming error."""
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name or "/" in name or "\x00" in name:
        raise ValueError(f"cannot store an object without a usable metadata.name: {name!r}")
    return name


def encode(body: dict[str, Any]) -> str:
    return _ENCODER.encode(body)


def decode(text: str | bytes, version: int) -> dict[str, Any]:
    """The stored JSON as an object at ``version``."""
    obj: dict[str, Any] = json.loads(text)
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        metadata = obj["metadata"] = {}
    metadata["resourceVersion"] = str(version)
    return obj


def _body(obj: dict[str, Any]) -> dict[str, Any]:
    """A JSON-clean copy of ``obj`` without the resource version."""
    body: dict[str, Any] = json.loads(encode(obj))
    metadata = body.get("metadata")
    if not isinstance(metadata, dict):
        metadata = body["metadata"] = {}
    metadata.pop("resourceVersion", None)
    return body


def new_body(obj: dict[str, Any]) -> dict[str, Any]:
    """What a create stores: the caller's object with a fresh uid and creation time."""
    body = _body(obj)
    metadata = body["metadata"]
    metadata["uid"] = str(uuid.uuid4())
    metadata["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return body


def updated_body(stored: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """What an update stores: the caller's object keeping the stored uid and creation time.

    ``stored`` is a body as kept (no resource version). Comparing the result with ``stored``
    tells whether the update changes anything.
    """
    body = _body(obj)
    metadata = body["metadata"]
    stored_metadata = stored.get("metadata") or {}
    for key in ("uid", "creationTimestamp"):
        if key in stored_metadata:
            metadata[key] = stored_metadata[key]
        else:
            metadata.pop(key, None)
    return body


def bookmark(version: int) -> WatchEvent:
    return WatchEvent(
        WatchEventType.BOOKMARK, {"metadata": {"resourceVersion": str(version)}}, version
    )
