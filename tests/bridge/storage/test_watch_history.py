"""Watches of the stores that keep their own history: falling behind it, and the store closing.

(etcd's history is etcd's compaction; test_etcd_restart.py covers its side.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.storage import Expired, Store, StoreError
from bridge.storage.memory import MemoryStore
from bridge.storage.sqlite import SQLiteStore
from tests.bridge.storage.conformance import changed, dataplaneservice, next_event, rv


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        opened: Store = MemoryStore(history=20)
    else:
        opened = sqlite = SQLiteStore(tmp_path / "bridge.db", history=20)
        await sqlite.open()  # so that watch() takes "now" when called, as the memory store does
    yield opened
    await opened.close()


async def test_a_watch_that_falls_behind_the_history_is_expired(store: Store) -> None:
    obj = await store.create(dataplaneservice("a"))
    events = store.watch(since=rv(obj) - 1)
    assert (await next_event(events)).resource_version == rv(obj)
    for i in range(60):  # the watcher reads nothing meanwhile
        obj = await store.update(changed(obj, pluginID=f"v{i}"), expected_version=rv(obj))
    with pytest.raises(Expired) as info:
        await next_event(events)
    assert info.value.requested == rv(obj) - 60


async def test_closing_the_store_ends_its_watches(store: Store) -> None:
    events = store.watch()
    pending = asyncio.ensure_future(anext(events))
    await store.create(dataplaneservice("a"))
    await pending
    waiting = asyncio.ensure_future(anext(events))
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    with pytest.raises(StoreError, match="closed"):
        await store.get("a")
