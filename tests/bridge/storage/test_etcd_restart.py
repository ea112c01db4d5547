"""etcd going away and coming back, and several replicas sharing it.

While etcd is down every call is ``Unavailable`` at once (never a hang); a running watch waits
it out and resumes after the last revision it delivered, so it yields every write exactly once
and in order. Writes etcd acknowledged survive etcd being killed. Two stores on one etcd (two
bridge replicas) see each other's writes through their watches within a second.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bridge.storage import Conflict, StoreError, Unavailable, WatchEvent, WatchEventType
from bridge.storage.etcd import EtcdStore
from tests.bridge.storage.conformance import WAIT, changed, dataplaneservice, next_event, rv
from tests.bridge.storage.conftest import unique_prefix
from tests.bridge.storage.etcd_server import EtcdServer

REQUEST_TIMEOUT = 2.0
QUICKLY = 1.0  # an outage shows well within the request timeout: the connection is refused


class Collector:
    """Runs a watch in the background and keeps what it yields."""

    def __init__(self) -> None:
        self.events: list[WatchEvent] = []
        self._arrived = asyncio.Event()

    async def run(self, events: AsyncIterator[WatchEvent]) -> None:
        async for event in events:
            if event.type is not WatchEventType.BOOKMARK:
                self.events.append(event)
                self._arrived.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.events) < count:
                self._arrived.clear()
                await self._arrived.wait()


async def when_back(write: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Retry ``write`` while etcd is still coming back."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                return await write()
            except Unavailable:
                await asyncio.sleep(0.1)


async def quickly_unavailable(call: Awaitable[object]) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await call
    assert time.monotonic() - started < QUICKLY


async def test_a_watch_outlives_an_etcd_restart(dedicated_etcd: EtcdServer) -> None:
    async with EtcdStore([dedicated_etcd.endpoint], request_timeout=REQUEST_TIMEOUT) as store:
        _, start = await store.list()
        collector = Collector()
        watcher = asyncio.create_task(collector.run(store.watch(since=start, bookmarks=True)))
        try:
            acknowledged = [await store.create(dataplaneservice(f"before-{i}")) for i in range(5)]
            # Stop etcd as soon as the watch is running, probably before it delivered all five.
            await collector.wait_for(1)
            await asyncio.to_thread(dedicated_etcd.stop)
            existing = acknowledged[0]
            await quickly_unavailable(store.create(dataplaneservice("during")))
            await quickly_unavailable(store.get("before-0"))
            await quickly_unavailable(store.list())
            await quickly_unavailable(
                store.update(changed(existing, pluginID="x"), expected_version=rv(existing))
            )
            await quickly_unavailable(store.delete("before-1"))
            await quickly_unavailable(anext(store.watch(since=start)))

            await asyncio.to_thread(dedicated_etcd.start)
            acknowledged.append(await when_back(lambda: store.create(dataplaneservice("after"))))
            acknowledged.append(
                await store.update(changed(existing, pluginID="y"), expected_version=rv(existing))
            )
            acknowledged.append(await store.delete("before-1"))
            acknowledged += [await store.create(dataplaneservice(f"after-{i}")) for i in range(3)]
            await collector.wait_for(len(acknowledged))
            assert not watcher.done()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    assert [event.resource_version for event in collector.events] == [
        rv(obj) for obj in acknowledged
    ]
    assert [event.object for event in collector.events] == acknowledged


async def test_acknowledged_writes_survive_etcd_being_killed(dedicated_etcd: EtcdServer) -> None:
    async with EtcdStore([dedicated_etcd.endpoint], request_timeout=REQUEST_TIMEOUT) as store:
        acknowledged: dict[str, int] = {}
        enough = asyncio.Event()
        target = random.randint(10, 80)

        async def write() -> None:
            for i in range(100_000):
                try:
                    obj = await store.create(dataplaneservice(f"n{i}"))
                except StoreError:
                    return
                acknowledged[f"n{i}"] = rv(obj)
                if len(acknowledged) >= target:
                    enough.set()

        writer = asyncio.create_task(write())
        await asyncio.wait_for(enough.wait(), WAIT)
        await asyncio.to_thread(dedicated_etcd.kill)
        await asyncio.wait_for(writer, WAIT)
        await asyncio.to_thread(dedicated_etcd.start)

        async def stored() -> dict[str, Any]:
            items, _ = await store.list()
            return {item["metadata"]["name"]: rv(item) for item in items}

        after_restart = await when_back(stored)
        for name, version in acknowledged.items():
            assert after_restart.get(name) == version, name
        newer = await store.create(dataplaneservice("after-restart"))
        assert rv(newer) > max(after_restart.values())


async def test_two_replicas_see_each_others_writes(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    async with (
        EtcdStore([etcd_server.endpoint], prefix=prefix) as one,
        EtcdStore([etcd_server.endpoint], prefix=prefix) as two,
    ):
        _, version = await one.list()
        watch_one, watch_two = one.watch(since=version), two.watch(since=version)
        try:
            for writer, name in ((one, "from-one"), (two, "from-two"), (one, "again")):
                created = await writer.create(dataplaneservice(name))
                for events in (watch_one, watch_two):
                    event = await next_event(events, timeout=1.0)
                    assert (event.type, event.object) == (WatchEventType.ADDED, created)
            # The other replica's write is a conflict for a stale compare-and-swap here too.
            mine = await one.get("from-two")
            await two.update(changed(mine, pluginID="two"), expected_version=rv(mine))
            event = await next_event(watch_one, timeout=1.0)
            assert event.type is WatchEventType.MODIFIED
            with pytest.raises(Conflict):
                await one.update(changed(mine, pluginID="one"), expected_version=rv(mine))
        finally:
            for events in (watch_one, watch_two):
                await events.aclose()
