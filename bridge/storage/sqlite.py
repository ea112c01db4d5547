"""The SQLite store: the embedded default, one durable file.

Layout (schema version 1, kept in ``PRAGMA user_version``)::

    changes(version INTEGER PRIMARY KEY AUTOINCREMENT, resource, name, type, body)
    objects(resource, name, version, body)          -- UNIQUE (resource, name)
    compactions(resource PRIMARY KEY, through)      -- changes up to `through` are forgotten

A resource version is the ``changes`` row's key: AUTOINCREMENT never hands out a number twice,
even after rows are deleted, so versions keep increasing across restarts. Every write is one
``BEGIN IMMEDIATE`` transaction that checks the stored version, appends a change and updates the
object, so compare-and-swap needs no lock of our own. The file is in WAL mode with
``synchronous=FULL``: a write is acknowledged only after its commit has reached the disk.

All SQLite calls run on two dedicated threads (one connection each: the writer, and a reader
so that gets, lists and watches do not queue behind a write's fsync); the event loop never
blocks on the file. Watches read the change log and wait for a write of this process; a slow
poll also notices writes by another process using the same file (supported, but etcd is the
backend for several replicas).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sqlite3
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bridge.storage._objects import (
    bookmark,
    decode,
    encode,
    new_body,
    object_name,
    updated_body,
)
from bridge.storage.base import (
    AlreadyExists,
    Conflict,
    Expired,
    NotFound,
    StoreError,
    Unavailable,
    WatchEvent,
    WatchEventType,
)

SCHEMA_VERSION = 1

_SCHEMA = (
    """
    CREATE TABLE changes (
        version INTEGER PRIMARY KEY AUTOINCREMENT,
        resource TEXT NOT NULL,
        name TEXT NOT NULL,
        type TEXT NOT NULL CHECK (type IN ('ADDED', 'MODIFIED', 'DELETED')),
        body TEXT NOT NULL
    )
    """,
    "CREATE INDEX changes_by_resource ON changes (resource, version)",
    """
    CREATE TABLE objects (
        resource TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        body TEXT NOT NULL,
        UNIQUE (resource, name)
    )
    """,
    """
    CREATE TABLE compactions (
        resource TEXT PRIMARY KEY,
        through INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
)

_FEED_BATCH = 1000

T = TypeVar("T")
_Objects = list[dict[str, Any]]  # `list` is a method of the stores


class SchemaError(StoreError):
    """The file is not a store this bridge can use (another program's, or a newer schema)."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)


@dataclass(frozen=True, slots=True)
class _Feed:
    changes: list[tuple[int, str, str]]  # version, type, body
    compacted: int
    head: int


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _head(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return int(row[0]) if row else 0


def _connect(path: Path, *, busy_timeout: float, writer: bool) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise StoreError("", f"cannot open {path}: {exc}") from exc
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError("", f"{path}: SQLite refused WAL mode (journal_mode is {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        if writer:
            _migrate(conn, path)
        else:
            conn.execute("PRAGMA query_only = ON")
    except sqlite3.OperationalError as exc:  # locked for too long, unreadable, ...
        conn.close()
        raise StoreError("", f"cannot open {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
        conn.close()
        raise SchemaError(f"{path} cannot be used as the bridge's store: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _transaction(conn, "BEGIN IMMEDIATE"):
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"{path} has schema version {version}, newer than this bridge understands "
                f"({SCHEMA_VERSION}); run a newer bridge, or restore the file from a backup"
            )
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        if tables:
            raise SchemaError(
                f"{path} is an SQLite database but not a bridge store "
                f"(it holds {', '.join(sorted(tables))}); point storage.sqlite_path elsewhere"
            )
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class _Connection:
    """One SQLite connection owned by one thread; every use of it runs on that thread."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        def _open() -> None:
            self._conn = connect()

        await asyncio.get_running_loop().run_in_executor(self._executor, _open)

    async def run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError("", "the store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, job)

    def _call(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            raise StoreError("", "the store is closed")
        try:
            return job(self._conn)
        except sqlite3.OperationalError as exc:  # locked by another process, I/O error, ...
            raise Unavailable("", f"SQLite: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError("", f"SQLite: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def _close() -> None:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, _close)
        finally:
            self._executor.shutdown(wait=True)


class SQLiteStore:
    """One resource's objects in an SQLite file (several resources may share the file)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        resource: str = "dataplaneservices",
        history: int = 10000,
        poll_interval: float = 1.0,
        bookmark_interval: float = 60.0,
        busy_timeout: float = 5.0,
    ) -> None:
        if history < 1:
            raise ValueError("history must keep at least one change")
        self.path = Path(path)
        self._resource = resource
        self._history = history
        self._poll_interval = poll_interval
        self._bookmark_interval = bookmark_interval
        self._busy_timeout = busy_timeout
        self._writer = _Connection("sqlite-writer")
        self._reader = _Connection("sqlite-reader")
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._head = 0  # the newest version this process knows of
        self._changed = asyncio.Event()
        # Compaction runs every few writes, on the writer thread only.
        self._compact_every = max(1, history // 10)
        self._writes_to_compaction = 1

    async def open(self) -> None:
        """Create or open the file and check its schema; the first call of any method opens."""
        async with self._open_lock:
            if self._opened:
                return
            if self._closed:
                raise StoreError("", "the store is closed")
            self._loop = asyncio.get_running_loop()
            try:
                await self._loop.run_in_executor(None, _prepare_file, self.path)
                await self._writer.open(
                    functools.partial(
                        _connect, self.path, busy_timeout=self._busy_timeout, writer=True
                    )
                )
                await self._reader.open(
                    functools.partial(
                        _connect, self.path, busy_timeout=self._busy_timeout, writer=False
                    )
                )
                self._head = await self._reader.run(_head)
            except BaseException:
                self._closed = True  # a store that failed to open stays unusable
                await self._writer.close()
                await self._reader.close()
                raise
            self._opened = True

    async def get(self, name: str) -> dict[str, Any]:
        await self._ensure_open()
        row = await self._reader.run(functools.partial(self._get_in, name))
        if row is None:
            raise NotFound(name)
        return decode(row[1], row[0])

    async def list(self) -> tuple[list[dict[str, Any]], int]:
        await self._ensure_open()
        items, head = await self._reader.run(self._list_in)
        self._note_head(head)
        return items, head

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self._ensure_open()
        name = object_name(obj)
        text = encode(new_body(obj))
        version = await self._writer.run(functools.partial(self._create_in, name, text))
        return decode(text, version)

    async def update(self, obj: dict[str, Any], *, expected_version: int | None) -> dict[str, Any]:
        await self._ensure_open()
        name = object_name(obj)
        version, text = await self._writer.run(
            functools.partial(self._update_in, name, obj, expected_version)
        )
        return decode(text, version)

    async def delete(self, name: str, *, expected_version: int | None = None) -> dict[str, Any]:
        await self._ensure_open()
        version, text = await self._writer.run(
            functools.partial(self._delete_in, name, expected_version)
        )
        return decode(text, version)

    def watch(
        self, *, since: int | None = None, bookmarks: bool = False
    ) -> AsyncGenerator[WatchEvent, None]:
        if self._closed:
            raise StoreError("", "the store is closed")
        if since is None and self._opened:
            since = self._head
        return self._watch(since, bookmarks)

    async def close(self) -> None:
        async with self._open_lock:
            if self._closed:
                return
            self._closed = True
            self._wake()
            await self._writer.close()
            await self._reader.close()

    async def __aenter__(self) -> SQLiteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- on the event loop -------------------------------------------------------------------

    async def _ensure_open(self) -> None:
        if not self._opened:
            await self.open()

    def _note_head(self, version: int) -> None:
        self._head = max(self._head, version)

    def _committed(self, version: int) -> None:
        self._note_head(version)
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _watch(self, since: int | None, bookmarks: bool) -> AsyncGenerator[WatchEvent, None]:
        await self._ensure_open()
        position = self._head if since is None else since
        loop = asyncio.get_running_loop()
        bookmark_at = loop.time() + self._bookmark_interval
        while not self._closed:
            changed = self._changed  # taken before reading, so no write slips between
            try:
                feed = await self._reader.run(functools.partial(self._feed_in, position))
            except StoreError:
                if self._closed:
                    return
                raise
            if position < feed.compacted:
                raise Expired(position, feed.compacted + 1)
            self._note_head(feed.head)
            if feed.changes:
                for version, kind, body in feed.changes:
                    yield WatchEvent(WatchEventType(kind), decode(body, version), version)
                    position = version
                bookmark_at = loop.time() + self._bookmark_interval
                continue
            # Nothing after `position` up to `feed.head`: that far, everything was delivered.
            timeout = self._poll_interval
            if bookmarks:
                timeout = min(timeout, max(0.0, bookmark_at - loop.time()))
            try:
                async with asyncio.timeout(timeout):  # not wait_for (3.11 can swallow a cancel)
                    await changed.wait()
            except TimeoutError:
                if bookmarks and loop.time() >= bookmark_at:
                    position = max(position, feed.head)
                    yield bookmark(position)
                    bookmark_at = loop.time() + self._bookmark_interval

    # -- on the reader thread ----------------------------------------------------------------

    def _get_in(self, name: str, conn: sqlite3.Connection) -> tuple[int, str] | None:
        row = conn.execute(
            "SELECT version, body FROM objects WHERE resource = ? AND name = ?",
            (self._resource, name),
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def _list_in(self, conn: sqlite3.Connection) -> tuple[_Objects, int]:
        with _transaction(conn, "BEGIN"):
            rows = conn.execute(
                "SELECT version, body FROM objects WHERE resource = ? ORDER BY name",
                (self._resource,),
            ).fetchall()
            head = _head(conn)
        return [decode(body, version) for version, body in rows], head

    def _feed_in(self, position: int, conn: sqlite3.Connection) -> _Feed:
        with _transaction(conn, "BEGIN"):
            row = conn.execute(
                "SELECT through FROM compactions WHERE resource = ?", (self._resource,)
            ).fetchone()
            compacted = int(row[0]) if row else 0
            changes = conn.execute(
                "SELECT version, type, body FROM changes WHERE resource = ? AND version > ? "
                "ORDER BY version LIMIT ?",
                (self._resource, position, _FEED_BATCH),
            ).fetchall()
            head = _head(conn)
        return _Feed(changes, compacted, head)

    # -- on the writer thread ----------------------------------------------------------------

    def _stored_in(self, conn: sqlite3.Connection, name: str) -> tuple[int, str]:
        row = conn.execute(
            "SELECT version, body FROM objects WHERE resource = ? AND name = ?",
            (self._resource, name),
        ).fetchone()
        if row is None:
            raise NotFound(name)
        return int(row[0]), str(row[1])

    def _create_in(self, name: str, text: str, conn: sqlite3.Connection) -> int:
        with _transaction(conn, "BEGIN IMMEDIATE"):
            exists = conn.execute(
                "SELECT 1 FROM objects WHERE resource = ? AND name = ?", (self._resource, name)
            ).fetchone()
            if exists:
                raise AlreadyExists(name)
            version = self._append_in(conn, WatchEventType.ADDED, name, text)
            conn.execute(
                "INSERT INTO objects (resource, name, version, body) VALUES (?, ?, ?, ?)",
                (self._resource, name, version, text),
            )
        self._announce(version)
        return version

    def _update_in(
        self,
        name: str,
        obj: dict[str, Any],
        expected: int | None,
        conn: sqlite3.Connection,
    ) -> tuple[int, str]:
        with _transaction(conn, "BEGIN IMMEDIATE"):
            current, text = self._stored_in(conn, name)
            if expected is not None and expected != current:
                raise Conflict(name, expected=expected, actual=current)
            stored = json.loads(text)
            body = updated_body(stored, obj)
            if body == stored:
                return current, text
            text = encode(body)
            version = self._append_in(conn, WatchEventType.MODIFIED, name, text)
            conn.execute(
                "UPDATE objects SET version = ?, body = ? WHERE resource = ? AND name = ?",
                (version, text, self._resource, name),
            )
        self._announce(version)
        return version, text

    def _delete_in(
        self, name: str, expected: int | None, conn: sqlite3.Connection
    ) -> tuple[int, str]:
        with _transaction(conn, "BEGIN IMMEDIATE"):
            current, text = self._stored_in(conn, name)
            if expected is not None and expected != current:
                raise Conflict(name, expected=expected, actual=current)
            version = self._append_in(conn, WatchEventType.DELETED, name, text)
            conn.execute(
                "DELETE FROM objects WHERE resource = ? AND name = ?", (self._resource, name)
            )
        self._announce(version)
        return version, text

    def _append_in(
        self, conn: sqlite3.Connection, kind: WatchEventType, name: str, text: str
    ) -> int:
        cursor = conn.execute(
            "INSERT INTO changes (resource, name, type, body) VALUES (?, ?, ?, ?)",
            (self._resource, name, kind.value, text),
        )
        version = cursor.lastrowid
        if version is None:  # pragma: no cover - an INSERT always sets it
            raise StoreError(name, "SQLite did not number the change")
        self._writes_to_compaction -= 1
        if self._writes_to_compaction <= 0:
            self._compact_in(conn)
            self._writes_to_compaction = self._compact_every
        return version

    def _compact_in(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(
            "SELECT version FROM changes WHERE resource = ? ORDER BY version DESC LIMIT 1 OFFSET ?",
            (self._resource, self._history),
        ).fetchone()
        if row is None:
            return
        through = int(row[0])
        conn.execute(
            "DELETE FROM changes WHERE resource = ? AND version <= ?", (self._resource, through)
        )
        conn.execute(
            "INSERT INTO compactions (resource, through) VALUES (?, ?) "
            "ON CONFLICT (resource) DO UPDATE SET through = max(through, excluded.through)",
            (self._resource, through),
        )

    def _announce(self, version: int) -> None:
        """Wake this process's watches; scheduled before the writer's own result is delivered."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._committed, version)


def _prepare_file(path: Path) -> None:
    """The directory (0700) and the file (0600) exist before SQLite opens it."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError("", f"cannot create {path}: {exc.strerror}") from exc
    os.close(fd)
