"""The ``storage`` settings and ``open_store``: SQLite unless told otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from bridge.storage import StorageSettings, Unavailable, open_store
from bridge.storage.etcd import EtcdStore
from bridge.storage.memory import MemoryStore
from bridge.storage.sqlite import SQLiteStore
from tests.bridge.storage.etcd_server import free_port


def test_defaults() -> None:
    settings = StorageSettings()
    assert settings.backend == "sqlite"
    assert settings.sqlite_path == Path("data/bridge.db")
    assert settings.history == 10000
    assert settings.etcd.endpoints == ("http://127.0.0.1:2379",)


def test_settings_are_strict_and_frozen() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        StorageSettings.model_validate({"backnd": "etcd"})
    with pytest.raises(ValidationError, match="'sqlite', 'etcd' or 'memory'"):
        StorageSettings.model_validate({"backend": "postgres"})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        StorageSettings.model_validate({"history": 0})
    with pytest.raises(ValidationError, match="frozen"):
        StorageSettings().backend = "memory"  # type: ignore[misc]


async def test_sqlite_is_opened_at_once(tmp_path: Path) -> None:
    path = tmp_path / "data" / "bridge.db"
    store = await open_store(StorageSettings(sqlite_path=path, history=5))
    try:
        assert isinstance(store, SQLiteStore)
        assert path.exists()
    finally:
        await store.close()


async def test_etcd_is_not_contacted_until_used() -> None:
    settings = StorageSettings.model_validate(
        {"backend": "etcd", "etcd": {"endpoints": [f"http://127.0.0.1:{free_port()}"]}}
    )
    store = await open_store(settings)
    try:
        assert isinstance(store, EtcdStore)
        with pytest.raises(Unavailable):
            await store.list()
    finally:
        await store.close()


async def test_memory_only_when_named(caplog: pytest.LogCaptureFixture) -> None:
    store = await open_store(StorageSettings(backend="memory"))
    assert isinstance(store, MemoryStore)
    assert "meant for tests" in caplog.text
    await store.close()
