"""What the SQLite store adds to the contract: the file, its schema, restarts, sharing it."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from pathlib import Path

import pytest

from bridge.storage import Expired, StoreError, WatchEventType
from bridge.storage.sqlite import SCHEMA_VERSION, SchemaError, SQLiteStore
from tests.bridge.storage.conformance import changed, close, dataplaneservice, next_event, rv


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_file_and_its_directory_are_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "bridge.db"
    async with SQLiteStore(path) as store:
        await store.create(dataplaneservice("a"))
        assert mode(path.parent) == 0o700
        assert mode(path) == 0o600
        assert mode(path.with_name("bridge.db-wal")) == 0o600


async def test_objects_and_versions_carry_on_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    async with SQLiteStore(path) as store:
        a = await store.create(dataplaneservice("a"))
        a = await store.update(changed(a, pluginID="x"), expected_version=rv(a))
        b = await store.create(dataplaneservice("b"))
        gone = await store.delete("b")  # the newest change: its version is never handed out again
        before = await store.list()
    async with SQLiteStore(path) as store:
        assert await store.list() == before
        assert before[1] == rv(gone)
        c = await store.create(dataplaneservice("c"))
        assert rv(c) == rv(gone) + 1
        # The change log was kept too: a watch resumes across the restart.
        events = store.watch(since=rv(a))
        assert [
            (e.type, e.resource_version) for e in [await next_event(events) for _ in "abc"]
        ] == [
            (WatchEventType.ADDED, rv(b)),
            (WatchEventType.DELETED, rv(gone)),
            (WatchEventType.ADDED, rv(c)),
        ]
        await close(events)


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    async with SQLiteStore(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SQLiteStore(path)
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        await store.open()
    with pytest.raises(StoreError, match="closed"):
        await store.get("a")


async def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grafana.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE dashboard (id INTEGER PRIMARY KEY)")
    conn.close()
    with pytest.raises(SchemaError, match="not a bridge store"):
        await SQLiteStore(path).open()


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    path.write_bytes(b"this is not a database, it is a text file with enough bytes in it" * 100)
    with pytest.raises(SchemaError, match="cannot be used"):
        await SQLiteStore(path).open()


async def test_a_path_that_cannot_be_created_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot create"):
        await SQLiteStore(tmp_path / "file" / "bridge.db").open()


async def test_the_change_log_keeps_about_history_entries(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    async with SQLiteStore(path, history=20) as store:
        obj = await store.create(dataplaneservice("a"))
        for i in range(100):
            obj = await store.update(changed(obj, pluginID=f"v{i}"), expected_version=rv(obj))
        with sqlite3.connect(path) as conn:
            kept = conn.execute("SELECT count(*) FROM changes").fetchone()[0]
        conn.close()
        assert 20 <= kept <= 22
        events = store.watch(since=rv(obj) - 20)
        assert (await next_event(events)).resource_version == rv(obj) - 19
        await close(events)
        with pytest.raises(Expired) as info:
            await next_event(store.watch(since=rv(obj) - 30))
        assert info.value.requested == rv(obj) - 30


async def test_writes_through_another_connection_are_seen_by_polling(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    async with (
        SQLiteStore(path, poll_interval=0.1) as watching,
        SQLiteStore(path) as writing,  # as another process would
    ):
        _, version = await watching.list()
        events = watching.watch(since=version)
        created = await writing.create(dataplaneservice("a"))
        event = await next_event(events, timeout=1.0)
        assert (event.type, event.object) == (WatchEventType.ADDED, created)
        assert await watching.get("a") == created
        await close(events)


async def test_resources_share_a_file_and_its_versions_but_not_objects(tmp_path: Path) -> None:
    path = tmp_path / "bridge.db"
    async with (
        SQLiteStore(path, resource="dataplaneservices") as services,
        SQLiteStore(path, resource="others") as others,
    ):
        _, version = await services.list()
        events = services.watch(since=version)
        other = await others.create(dataplaneservice("a"))
        mine = await services.create(dataplaneservice("a"))
        assert rv(mine) > rv(other)
        assert [item["metadata"]["name"] for item in (await others.list())[0]] == ["a"]
        assert (await next_event(events)).resource_version == rv(mine)
        await close(events)


async def test_a_closed_store_refuses_calls_and_ends_its_watches(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "bridge.db")
    events = store.watch(since=0)
    await store.create(dataplaneservice("a"))
    assert (await next_event(events)).type is WatchEventType.ADDED
    pending = asyncio.ensure_future(anext(events))
    await store.close()
    with pytest.raises(StopAsyncIteration):
        await pending
    with pytest.raises(StoreError, match="closed"):
        await store.get("a")
    with pytest.raises(StoreError, match="closed"):
        store.watch()
