"""The in-memory store: the contract's reference implementation, for unit tests only.

Nothing survives the process. Changes are kept in a bounded log (``history`` entries) that
watches replay from; a watch asking for anything older is :class:`~bridge.storage.Expired`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from bridge.storage._objects import (
    bookmark,
    decode,
    encode,
    new_body,
    object_name,
    updated_body,
)
from bridge.storage.base import (
    AlreadyExists,
    Conflict,
    Expired,
    NotFound,
    StoreError,
    WatchEvent,
    WatchEventType,
)


@dataclass(frozen=True, slots=True)
class _Change:
    version: int
    type: WatchEventType
    body: str

    def event(self) -> WatchEvent:
        return WatchEvent(self.type, decode(self.body, self.version), self.version)


_Changes = list[_Change]  # `list` is a method of the store


class MemoryStore:
    """Objects in a dict, changes in a ring buffer; every write wakes every watch."""

    def __init__(self, *, history: int = 1000, bookmark_interval: float = 60.0) -> None:
        if history < 1:
            raise ValueError("history must keep at least one change")
        self._history = history
        self._bookmark_interval = bookmark_interval
        self._objects: dict[str, tuple[int, str]] = {}
        self._log: deque[_Change] = deque()
        self._version = 0
        self._compacted = 0  # every change up to this version has been forgotten
        self._changed = asyncio.Event()
        self._closed = False

    async def get(self, name: str) -> dict[str, Any]:
        self._check_open()
        version, text = self._stored(name)
        return decode(text, version)

    async def list(self) -> tuple[list[dict[str, Any]], int]:
        self._check_open()
        items = [decode(text, version) for _, (version, text) in sorted(self._objects.items())]
        return items, self._version

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._check_open()
        name = object_name(obj)
        if name in self._objects:
            raise AlreadyExists(name)
        text = encode(new_body(obj))
        version = self._record(WatchEventType.ADDED, name, text)
        return decode(text, version)

    async def update(self, obj: dict[str, Any], *, expected_version: int | None) -> dict[str, Any]:
        self._check_open()
        name = object_name(obj)
        current, text = self._stored(name)
        if expected_version is not None and expected_version != current:
            raise Conflict(name, expected=expected_version, actual=current)
        stored = json.loads(text)
        body = updated_body(stored, obj)
        if body == stored:
            return decode(text, current)
        text = encode(body)
        version = self._record(WatchEventType.MODIFIED, name, text)
        return decode(text, version)

    async def delete(self, name: str, *, expected_version: int | None = None) -> dict[str, Any]:
        self._check_open()
        current, text = self._stored(name)
        if expected_version is not None and expected_version != current:
            raise Conflict(name, expected=expected_version, actual=current)
        version = self._record(WatchEventType.DELETED, name, text)
        return decode(text, version)

    def watch(
        self, *, since: int | None = None, bookmarks: bool = False
    ) -> AsyncGenerator[WatchEvent, None]:
        self._check_open()
        return self._watch(self._version if since is None else since, bookmarks)

    async def close(self) -> None:
        self._closed = True
        self._wake()

    async def __aenter__(self) -> MemoryStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("", "the store is closed")

    def _stored(self, name: str) -> tuple[int, str]:
        try:
            return self._objects[name]
        except KeyError:
            raise NotFound(name) from None

    def _record(self, kind: WatchEventType, name: str, text: str) -> int:
        self._version += 1
        if kind is WatchEventType.DELETED:
            del self._objects[name]
        else:
            self._objects[name] = (self._version, text)
        self._log.append(_Change(self._version, kind, text))
        if len(self._log) > self._history:
            self._compacted = self._log.popleft().version
        self._wake()
        return self._version

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _after(self, position: int) -> _Changes:
        if not self._log or position >= self._version:
            return []
        # Versions in the log are consecutive: each write appends exactly one change.
        start = max(0, position + 1 - self._log[0].version)
        return list(itertools.islice(self._log, start, None))

    async def _watch(self, position: int, bookmarks: bool) -> AsyncGenerator[WatchEvent, None]:
        loop = asyncio.get_running_loop()
        bookmark_at = loop.time() + self._bookmark_interval
        while not self._closed:
            if position < self._compacted:
                raise Expired(position, self._compacted + 1)
            pending = self._after(position)
            if pending:
                for change in pending:
                    yield change.event()
                    position = change.version
                bookmark_at = loop.time() + self._bookmark_interval
                continue
            changed = self._changed
            timeout = max(0.0, bookmark_at - loop.time()) if bookmarks else None
            try:
                async with asyncio.timeout(timeout):  # not wait_for (3.11 can swallow a cancel)
                    await changed.wait()
            except TimeoutError:
                if not self._after(position):
                    position = max(position, self._version)
                    yield bookmark(position)
                bookmark_at = loop.time() + self._bookmark_interval
