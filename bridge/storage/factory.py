"""The ``storage`` section of the configuration, and opening the store it names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bridge.storage.base import Store
from bridge.storage.etcd import EtcdSettings, EtcdStore
from bridge.storage.memory import MemoryStore
from bridge.storage.sqlite import SQLiteStore

log = logging.getLogger(__name__)


class StorageSettings(BaseModel):
    """Where DataPlaneServices are kept.

    ``sqlite`` (the default) is one durable file for a single bridge; ``etcd`` is a registry
    several replicas share; ``memory`` keeps nothing across a restart and is for tests only,
    so it is never chosen unless named.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["sqlite", "etcd", "memory"] = "sqlite"
    sqlite_path: Path = Path("data/bridge.db")
    history: int = Field(default=10000, ge=1)  # changes a watch can resume from (sqlite, memory)
    etcd: EtcdSettings = EtcdSettings()


def make_store(settings: StorageSettings) -> Store:
    """The configured store, not yet opened (SQLite opens on first use or :func:`open_store`)."""
    if settings.backend == "sqlite":
        return SQLiteStore(settings.sqlite_path, history=settings.history)
    if settings.backend == "etcd":
        return EtcdStore.from_settings(settings.etcd)
    log.warning("storage.backend is memory: nothing is kept across restarts (meant for tests)")
    return MemoryStore(history=settings.history)


async def open_store(settings: StorageSettings) -> Store:
    """The configured store, ready for use; the caller closes it.

    SQLite is opened here, so a bad path or a file from a newer bridge stops start-up. etcd is
    not contacted: a bridge whose etcd is down starts and answers 503 until it is back.
    """
    store = make_store(settings)
    if isinstance(store, SQLiteStore):
        await store.open()
    return store
