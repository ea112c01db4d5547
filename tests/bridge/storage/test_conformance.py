"""The conformance suite (conformance.py) on every backend: memory, SQLite and a real etcd."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc  # type: ignore[import-untyped]

from bridge.storage import Store
from bridge.storage.etcd import EtcdStore
from bridge.storage.memory import MemoryStore
from bridge.storage.sqlite import SQLiteStore
from tests.bridge.storage.conformance import (
    BOOKMARK_INTERVAL,
    Backend,
    StoreConformance,
    changed,
    dataplaneservice,
    rv,
)
from tests.bridge.storage.conftest import unique_prefix
from tests.bridge.storage.etcd_server import EtcdServer

HISTORY = 256  # more than any case writes, and small enough to overwrite quickly


async def overwrite_history(store: Store) -> None:
    """Write more changes than the store keeps, so everything before them is forgotten."""
    obj = await store.create(dataplaneservice("history-filler"))
    for i in range(2 * HISTORY):
        obj = await store.update(changed(obj, pluginID=f"filler-{i}"), expected_version=rv(obj))
    await store.delete("history-filler")


class MemoryBackend:
    name = "memory"

    def __init__(self) -> None:
        self.store = MemoryStore(history=HISTORY, bookmark_interval=BOOKMARK_INTERVAL)

    async def open(self) -> Store:
        return self.store

    async def forget(self, store: Store, through: int) -> None:
        await overwrite_history(store)

    async def close(self) -> None:
        await self.store.close()


class SQLiteBackend:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stores: list[SQLiteStore] = []

    async def open(self) -> Store:
        store = SQLiteStore(
            self.path, history=HISTORY, bookmark_interval=BOOKMARK_INTERVAL, poll_interval=0.5
        )
        await store.open()
        self.stores.append(store)
        return store

    async def forget(self, store: Store, through: int) -> None:
        await overwrite_history(store)

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


class EtcdBackend:
    name = "etcd"

    def __init__(self, server: EtcdServer) -> None:
        self.server = server
        self.prefix = unique_prefix()
        self.stores: list[EtcdStore] = []

    async def open(self) -> Store:
        store = EtcdStore(
            [self.server.endpoint], prefix=self.prefix, bookmark_interval=BOOKMARK_INTERVAL
        )
        self.stores.append(store)
        return store

    async def forget(self, store: Store, through: int) -> None:
        """Compact etcd as kube-apiserver's compactor would, after one more unrelated write."""
        async with grpc.aio.insecure_channel(self.server.endpoint.removeprefix("http://")) as ch:
            kv = rpc.KVStub(ch)
            await kv.Put(rpc.PutRequest(key=b"/conformance-filler", value=b"x"), timeout=5)
            await kv.Compact(rpc.CompactionRequest(revision=through + 1, physical=True), timeout=5)

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


@pytest.fixture(params=["memory", "sqlite", "etcd"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    harness: MemoryBackend | SQLiteBackend | EtcdBackend
    if request.param == "memory":
        harness = MemoryBackend()
    elif request.param == "sqlite":
        harness = SQLiteBackend(tmp_path / "bridge.db")
    else:
        harness = EtcdBackend(request.getfixturevalue("etcd_server"))
    yield harness
    await harness.close()


class TestConformance(StoreConformance):
    """Every case of the suite, once per backend."""
