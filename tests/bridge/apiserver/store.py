"""The store the API tests run on: ``MemoryStore``, plus what a test needs to see and break.

:meth:`ObservedStore.fail` makes every call, and every open watch, fail with ``Unavailable``
(as an unreachable etcd would); ``open_watches`` counts watches not yet closed, so a test can
prove a client that went away leaves none behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from bridge.storage import Unavailable, WatchEvent
from bridge.storage.memory import MemoryStore


class ObservedStore:
    def __init__(self, *, history: int = 1000) -> None:
        self.backend = MemoryStore(history=history)
        self.down = False
        self.open_watches = 0

    async def fail(self) -> None:
        """From now on every call fails; open watches end with ``Unavailable``."""
        self.down = True
        await self.backend.close()  # wakes every watch, which then sees ``down``

    def _check(self) -> None:
        if self.down:
            raise Unavailable("", "the test store is down")

    async def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every stored object by name (ignores ``fail``)."""
        items, _ = await self.backend.list()
        return {item["metadata"]["name"]: item for item in items}

    async def get(self, name: str) -> dict[str, Any]:
        self._check()
        return await self.backend.get(name)

    async def list(self) -> tuple[list[dict[str, Any]], int]:
        self._check()
        return await self.backend.list()

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._check()
        return await self.backend.create(obj)

    async def update(self, obj: dict[str, Any], *, expected_version: int | None) -> dict[str, Any]:
        self._check()
        return await self.backend.update(obj, expected_version=expected_version)

    async def delete(self, name: str, *, expected_version: int | None = None) -> dict[str, Any]:
        self._check()
        return await self.backend.delete(name, expected_version=expected_version)

    async def watch(
        self, *, since: int | None = None, bookmarks: bool = False
    ) -> AsyncIterator[WatchEvent]:
        self._check()
        events = self.backend.watch(since=since, bookmarks=bookmarks)
        self.open_watches += 1
        try:
            async for event in events:
                yield event
            self._check()
        finally:
            self.open_watches -= 1
            close = getattr(events, "aclose", None)
            if close is not None:
                await close()

    async def close(self) -> None:
        await self.backend.close()
