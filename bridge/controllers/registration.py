"""Registration: watch the stored DataPlaneServices and swap the route table on every change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from bridge.apis import DataPlaneService, InvalidObject
from bridge.routing import RouteTable
from bridge.storage import Expired, Store, StoreError, WatchEventType

log = logging.getLogger(__name__)


Parsed = DataPlaneService | InvalidObject


class RegistrationController:
    """List, then watch; every change of a spec rebuilds the route table from the full set.

    Rebuilding from the full set (rather than patching the table) makes a change of group or
    version move the mount point, and a delete remove it whatever the object's name. Only the
    changed object is parsed again, and a change that leaves the served form as it was (a
    ``status`` write by the availability controller, a label) does not rebuild at all. The
    first successful list sets :attr:`synced`, which gates readiness, as upstream's initial
    sync gates its mux.
    """

    def __init__(
        self,
        store: Store,
        *,
        apply: Callable[[list[DataPlaneService]], RouteTable],
        retry_delay: float = 1.0,
    ) -> None:
        self._store = store
        self._apply = apply
        self._retry_delay = retry_delay
        self._objects: dict[str, dict[str, Any]] = {}
        # name → the parsed form of the stored object (or why it does not validate)
        self._parsed: dict[str, Parsed] = {}
        self._invalid_reported: set[tuple[str, str]] = set()
        self.synced = asyncio.Event()
        self.table = RouteTable()
        self._task: asyncio.Task[None] | None = None

    def objects(self) -> dict[str, dict[str, Any]]:
        return dict(self._objects)

    def parsed(self, name: str) -> Parsed | None:
        """The typed form of a stored object as last seen, without parsing it again."""
        return self._parsed.get(name)

    async def sync_once(self) -> int:
        """List everything and install the table; returns the list's resource version."""
        items, version = await self._store.list()
        self._objects = {item["metadata"]["name"]: item for item in items}
        self._parsed = {name: _parse(obj) for name, obj in self._objects.items()}
        self._rebuild()
        self.synced.set()
        return version

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registration-controller")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        version: int | None = None
        while True:
            try:
                if version is None:
                    version = await self.sync_once()
                async for event in self._store.watch(since=version, bookmarks=True):
                    version = event.resource_version
                    if event.type is WatchEventType.BOOKMARK:
                        continue
                    if self._apply_event(event.type, event.object):
                        self._rebuild()
                # A watch that ends by itself is resumed from where it stopped.
            except Expired:
                log.info("DataPlaneService watch expired; listing again")
                version = None
            except StoreError as exc:
                log.warning("DataPlaneService store unavailable (%s); retrying", exc.message)
                await asyncio.sleep(self._retry_delay)

    def _apply_event(self, kind: WatchEventType, obj: dict[str, Any]) -> bool:
        """Record one event; True when what is served changed (the table must be rebuilt)."""
        name = obj["metadata"]["name"]
        before = self._parsed.get(name)
        if kind is WatchEventType.DELETED:
            self._objects.pop(name, None)
            self._parsed.pop(name, None)
            return isinstance(before, DataPlaneService)
        self._objects[name] = obj
        after = self._parsed[name] = _parse(obj)
        if isinstance(before, DataPlaneService) and isinstance(after, DataPlaneService):
            return before != after
        return isinstance(before, DataPlaneService) or isinstance(after, DataPlaneService)

    def _rebuild(self) -> None:
        services: list[DataPlaneService] = []
        for name, parsed in sorted(self._parsed.items()):
            if isinstance(parsed, DataPlaneService):
                services.append(parsed)
                continue
            # Stored objects were validated on write; one from an older version that no
            # longer validates is skipped (and reported once) rather than served wrongly.
            obj = self._objects.get(name, {})
            key = (name, str(obj.get("metadata", {}).get("resourceVersion")))
            if key not in self._invalid_reported:
                self._invalid_reported.add(key)
                log.error("not serving stored DataPlaneService %s: %s", name, parsed)
        self.table = self._apply(services)


def _parse(obj: dict[str, Any]) -> Parsed:
    try:
        return DataPlaneService.from_object(obj)
    except InvalidObject as exc:
        return exc
