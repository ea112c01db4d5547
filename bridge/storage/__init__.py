"""Storage of API objects: one interface, SQLite (default), etcd (shared) and memory backends."""

from bridge.storage.base import (
    AlreadyExists,
    Conflict,
    Expired,
    NotFound,
    Store,
    StoreError,
    Unavailable,
    WatchEvent,
    WatchEventType,
)
from bridge.storage.etcd import EtcdSettings
from bridge.storage.factory import StorageSettings, open_store

__all__ = [
    "AlreadyExists",
    "Conflict",
    "EtcdSettings",
    "Expired",
    "NotFound",
    "StorageSettings",
    "Store",
    "StoreError",
    "Unavailable",
    "WatchEvent",
    "WatchEventType",
    "open_store",
]
