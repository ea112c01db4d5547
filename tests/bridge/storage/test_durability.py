"""``kill -9`` of the bridge while it writes loses no acknowledged write (SQLite and etcd).

A child process (writer.py) writes in a loop and prints each write once the store has
acknowledged it; the test SIGKILLs it at a random moment, opens the store again and finds every
printed write with its resource version. Three rounds on the same data also show versions
carrying on upwards across the kills.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

from bridge.storage import Store
from bridge.storage.etcd import EtcdStore
from bridge.storage.sqlite import SQLiteStore
from tests.bridge.storage.conftest import unique_prefix
from tests.bridge.storage.etcd_server import EtcdServer
from tests.bridge.storage.writer import operation
from tests.conftest import ROOT

ROUNDS = 3


@dataclass(frozen=True)
class Acknowledged:
    k: int
    name: str
    version: int


def parse(line: bytes) -> Acknowledged:
    k, name, version = line.decode().split()
    return Acknowledged(int(k), name, int(version))


async def write_until_killed(*args: str) -> list[Acknowledged]:
    """Run the writer, SIGKILL it after a random number of writes, return what it printed."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bridge.storage.writer",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    acknowledged: list[Acknowledged] = []
    target = random.randint(5, 150)
    try:
        async with asyncio.timeout(30):
            while len(acknowledged) < target:
                line = await child.stdout.readline()
                if not line:
                    break
                acknowledged.append(parse(line))
        await asyncio.sleep(random.uniform(0, 0.005))
    finally:
        child.kill()
        rest, errors = await child.communicate()
    assert child.returncode == -signal.SIGKILL, errors.decode(errors="replace")
    # Lines printed before the kill were acknowledged; a torn last line was not printed whole.
    acknowledged += [parse(line) for line in rest.splitlines(keepends=True) if line.endswith(b"\n")]
    assert [a.k for a in acknowledged] == list(range(len(acknowledged)))
    return acknowledged


async def check(store: Store, prefix: str, acknowledged: list[Acknowledged]) -> None:
    """Every acknowledged write is stored; only the write in flight at the kill may be extra."""
    items, _ = await store.list()
    stored = {
        item["metadata"]["name"]: int(item["metadata"]["resourceVersion"])
        for item in items
        if item["metadata"]["name"].startswith(f"{prefix}-")
    }
    last = {a.name: a.version for a in acknowledged}
    in_flight = operation(len(acknowledged), prefix)
    for name, version in last.items():
        if in_flight == ("update", name):
            assert stored[name] >= version, name
        else:
            assert stored.get(name) == version, name
    extra = set(stored) - set(last)
    assert extra <= {in_flight[1]} if in_flight[0] == "create" else not extra, extra


async def kill_rounds(
    open_store: Callable[[], AbstractAsyncContextManager[Store]],
    writer_args: Callable[[str], list[str]],
) -> None:
    highest = 0  # the newest version seen so far: every later write must be above it
    for round_ in range(ROUNDS):
        prefix = f"r{round_}"
        acknowledged = await write_until_killed(*writer_args(prefix))
        assert all(a.version > highest for a in acknowledged)
        async with open_store() as store:
            await check(store, prefix, acknowledged)
            items, _ = await store.list()
            newest = max(int(item["metadata"]["resourceVersion"]) for item in items)
            after = await store.create({"metadata": {"name": f"after-{round_}"}})
            highest = int(after["metadata"]["resourceVersion"])
            assert highest > newest


async def test_sqlite_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "data" / "bridge.db"
    await kill_rounds(lambda: SQLiteStore(path), lambda prefix: ["sqlite", str(path), prefix])


async def test_etcd_keeps_every_acknowledged_write(etcd_server: EtcdServer) -> None:
    key_prefix = unique_prefix()

    await kill_rounds(
        lambda: EtcdStore([etcd_server.endpoint], prefix=key_prefix),
        lambda prefix: ["etcd", etcd_server.endpoint, key_prefix, prefix],
    )
