"""The storage contract every backend keeps (tests/bridge/storage/ holds its conformance suite).

Objects are Kubernetes-style JSON documents of one resource, keyed by ``metadata.name``
(cluster-scoped). The store owns ``metadata.resourceVersion`` (a decimal string of a
store-wide, strictly increasing integer), ``metadata.uid`` and ``metadata.creationTimestamp``;
callers' values for those are ignored on create. Every successful write gets a new, larger
resource version than any before it, across all objects.

Watch semantics (as Kubernetes'):

- ``watch(since=N)`` yields every change with resource version > N, in order, exactly once,
  then keeps yielding new changes until the iterator is closed. ``since=None`` starts "now".
- If N is older than the oldest change the store still remembers, the iterator raises
  :class:`Expired` at once (the API turns it into 410 Gone, and clients re-list).
- ``DELETED`` events carry the object as it was when deleted, with the deletion's resource
  version.
- ``BOOKMARK`` events (object: ``{"metadata": {"resourceVersion": ...}}``) may be sent when
  nothing happened for a while, when ``bookmarks=True``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class StoreError(Exception):
    """Base class of storage failures; ``name`` is the object concerned (may be empty)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.message = message


class NotFound(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(name, f"{name!r} not found")


class AlreadyExists(StoreError):
    def __init__(self, name: str) -> None:
        super().__init__(name, f"{name!r} already exists")


class Conflict(StoreError):
    """The caller's resourceVersion is not the stored one (someone else wrote first)."""

    def __init__(self, name: str, *, expected: int, actual: int) -> None:
        super().__init__(
            name,
            f"the object has been modified (resourceVersion {expected} is not the current "
            f"{actual}); please apply your changes to the latest version and try again",
        )
        self.expected = expected
        self.actual = actual


class Expired(StoreError):
    """A watch asked for changes older than the store remembers."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(
            "", f"too old resource version: {requested} (oldest retained change is {oldest})"
        )
        self.requested = requested
        self.oldest = oldest


class Unavailable(StoreError):
    """The backend cannot be reached (etcd down); callers answer 503 and retry."""


class WatchEventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"
    BOOKMARK = "BOOKMARK"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: WatchEventType
    object: dict[str, Any]
    resource_version: int


class Store(Protocol):
    """One resource's objects. All methods are safe to call concurrently."""

    async def get(self, name: str) -> dict[str, Any]:
        """The stored object; raises :class:`NotFound`."""
        ...

    async def list(self) -> tuple[list[dict[str, Any]], int]:
        """Every object sorted by name, and the store's current resource version."""
        ...

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object; returns it with metadata filled. Raises :class:`AlreadyExists`."""
        ...

    async def update(self, obj: dict[str, Any], *, expected_version: int | None) -> dict[str, Any]:
        """Replace an object. With ``expected_version``, only if it is still the stored one
        (else :class:`Conflict`). Keeps uid and creationTimestamp. Raises :class:`NotFound`.
        An update that changes nothing still returns the object but writes nothing and keeps
        its resource version."""
        ...

    async def delete(self, name: str, *, expected_version: int | None = None) -> dict[str, Any]:
        """Remove an object and return it as it was. Raises :class:`NotFound`/:class:`Conflict`."""
        ...

    def watch(
        self, *, since: int | None = None, bookmarks: bool = False
    ) -> AsyncIterator[WatchEvent]:
        """Changes after ``since`` (see the module docstring). Closing the iterator ends it."""
        ...

    async def close(self) -> None: ...
