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


def nested_prefix(prefix: str, resource: str) -> str:
    """Where etcd keeps records of ``resource`` beside the objects: ``<prefix><resource>/``,
    inside the objects' key range (so the bridge's etcd role needs nothing beyond ``prefix``).
    The object store never takes such a key for an object: it has a further ``/``, and a
    resource name has no dot while object names (``<version>.<group>``) do."""
    return f"{prefix}{resource}/"


def make_store(
    settings: StorageSettings, *, resource: str | None = None, history: int | None = None
) -> Store:
    """The configured store, not yet opened (SQLite opens on first use or :func:`open_store`).

    With ``resource``, a store of that other kind of record kept beside the objects: another
    resource of the same SQLite file, keys under :func:`nested_prefix` on etcd, or a memory
    store of its own.
    """
    keep = history or settings.history
    if settings.backend == "sqlite":
        if resource is None:
            return SQLiteStore(settings.sqlite_path, history=keep)
        return SQLiteStore(settings.sqlite_path, resource=resource, history=keep)
    if settings.backend == "etcd":
        if resource is None:
            return EtcdStore.from_settings(settings.etcd)
        return EtcdStore.from_settings(
            settings.etcd, prefix=nested_prefix(settings.etcd.prefix, resource)
        )
    if resource is None:
        log.warning("storage.backend is memory: nothing is kept across restarts (meant for tests)")
    return MemoryStore(history=keep)


async def open_store(settings: StorageSettings) -> Store:
    """The configured store, ready for use; the caller closes it.

    SQLite is opened here, so a bad path or a file from a newer bridge stops start-up. etcd is
    not contacted: a bridge whose etcd is down starts and answers 503 until it is back.
    """
    store = make_store(settings)
    if isinstance(store, SQLiteStore):
        await store.open()
    return store
