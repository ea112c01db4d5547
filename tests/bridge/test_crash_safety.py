"""``kill -9`` of a real bridge while clients write DataPlaneServices through its HTTP API.

Several clients create, update (merge patch) and delete objects concurrently, each on names
of its own, so the last acknowledged answer for a name says what must be stored. Mid-way the
bridge gets SIGKILL. After a restart on the same storage (SQLite file, or etcd):

* every write answered 2xx is there (the last acknowledged generation of each object),
  and nothing acknowledged as deleted comes back; a write whose answer was lost in the crash
  may have happened or not, but nothing else;
* every stored object is served again: its group routes to the plugin;
* no plugin process of the killed bridge outlives it.

Figures (printed in the ``reliability figures`` summary, suite ``crash-safety``): per backend,
writes acknowledged, writes unanswered at the kill, objects stored after the restart,
acknowledged writes lost (0), plugins outliving the killed bridge (0), restart-to-ready seconds.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.bridge.bridge_process import (
    DPS_PATH,
    BridgeProcess,
    dataplaneservice,
    free_port,
    health_path,
    running_bridges,
    wait_gone,
    write_bridge_config,
)
from tests.bridge.storage.conftest import running_etcd
from tests.bridge.storage.etcd_server import EtcdServer
from tests.reliability.figures import record

# fixtures/plugins is only complete once the Go fixture's binary is there.
# ``reliability``: one of issue #6's suites, selected with the others by ``-m reliability``.
pytestmark = [
    pytest.mark.go,
    pytest.mark.slow,
    pytest.mark.reliability,
    pytest.mark.usefixtures("go_fixture_binary"),
]

WRITERS = 4
NAMES_PER_WRITER = 4
WRITE_FOR = 1.5  # seconds of writing before the kill
MERGE_PATCH = "application/merge-patch+json"
GONE = -1  # generation meaning "deleted"


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with running_etcd() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@dataclass
class Ledger:
    """Per object name: generations acknowledged, and those whose outcome the crash hid."""

    acknowledged: dict[str, int] = field(default_factory=dict)
    # Generations a write may have left behind: the last acknowledged one plus any unanswered.
    possible: dict[str, set[int]] = field(default_factory=dict)
    acks: int = 0
    unanswered_writes: int = 0

    def ack(self, name: str, generation: int) -> None:
        self.acknowledged[name] = generation
        self.possible[name] = {generation}
        self.acks += 1

    def unanswered(self, name: str, generation: int) -> None:
        self.possible.setdefault(name, {GONE}).add(generation)
        self.unanswered_writes += 1


def group_of(name: str) -> str:
    return name.removeprefix("v0alpha1.")


async def writer(
    bridge: BridgeProcess,
    session: aiohttp.ClientSession,
    names: list[str],
    ledger: Ledger,
    seed: int,
) -> None:
    """Create, patch and delete ``names`` until the bridge stops answering."""
    rng = random.Random(seed)
    state = dict.fromkeys(names, GONE)
    while True:
        name = rng.choice(names)
        current = state[name]
        if current == GONE:
            generation, method, path = 0, "POST", DPS_PATH
            body: Any = dataplaneservice(group_of(name))
            body["metadata"]["labels"] = {"generation": "0"}
            content_type = None
        elif rng.random() < 0.3:
            generation, method, path, body = GONE, "DELETE", f"{DPS_PATH}/{name}", None
            content_type = None
        else:
            generation, method, path = current + 1, "PATCH", f"{DPS_PATH}/{name}"
            body = {"metadata": {"labels": {"generation": str(current + 1)}}}
            content_type = MERGE_PATCH
        try:
            status, answer = await bridge.request(
                session, method, path, json=body, content_type=content_type, timeout=5
            )
        except (aiohttp.ClientError, TimeoutError):
            ledger.unanswered(name, generation)
            return
        assert 200 <= status < 300, (method, path, status, answer)
        state[name] = generation
        ledger.ack(name, generation)


async def stored_generations(
    bridge: BridgeProcess, session: aiohttp.ClientSession, prefix: str
) -> dict[str, int]:
    status, listing = await bridge.request(session, "GET", DPS_PATH)
    assert status == 200, listing
    found = {}
    for item in listing["items"]:
        name = item["metadata"]["name"]
        if name.startswith(prefix):
            found[name] = int(item["metadata"]["labels"]["generation"])
    return found


async def crash_while_writing(
    tmp: Path, session: aiohttp.ClientSession, storage: dict[str, Any], backend: str
) -> None:
    port = free_port()
    config = write_bridge_config(tmp, port, storage=storage)
    tag = uuid.uuid4().hex[:6]
    prefix = f"v0alpha1.c{tag}"
    names = [
        [f"{prefix}w{w}n{n}.crash.grafana.app" for n in range(NAMES_PER_WRITER)]
        for w in range(WRITERS)
    ]
    with running_bridges() as bridges:
        first = BridgeProcess(config, port=port)
        bridges.append(first)
        first.start()
        await first.wait_ready(session)
        plugins = first.plugin_processes()
        assert len(plugins) >= 2, first.log

        ledger = Ledger()
        tasks = [
            asyncio.create_task(writer(first, session, names[w], ledger, seed=w))
            for w in range(WRITERS)
        ]
        await asyncio.sleep(WRITE_FOR)
        first.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert ledger.acks > 20, "the writers barely wrote before the kill"
        outlived = await wait_gone(plugins)

        second = BridgeProcess(config, port=port)
        bridges.append(second)
        second.start()
        ready_after = await second.wait_ready(session)
        stored = await stored_generations(second, session, prefix)
        # An acknowledged write is lost when the stored state is not what the last
        # acknowledged answer (or a later unanswered write) left behind.
        lost = sum(
            stored.get(name, GONE) not in ledger.possible[name] for name in ledger.acknowledged
        )
        record(
            "crash-safety",
            f"{backend}: kill -9 after {WRITE_FOR}s of {WRITERS} writers: writes acknowledged "
            f"{ledger.acks}, unanswered {ledger.unanswered_writes}; after the restart: objects "
            f"stored {len(stored)}, acknowledged writes lost {lost}, plugins outliving the "
            f"killed bridge {len(outlived)}, restart to ready {ready_after:.2f}s",
        )
        assert outlived == [], "plugins outlived the killed bridge"
        assert lost == 0, (ledger.possible, stored)

        for name, possible in ledger.possible.items():
            assert stored.get(name, GONE) in possible, (name, stored.get(name), possible)
        for name, generation in ledger.acknowledged.items():
            if ledger.possible[name] == {generation}:
                assert stored.get(name, GONE) == generation, name
        assert set(stored) <= set(ledger.possible)

        # Every stored object is served again after the restart.
        for name in stored:
            status, body = await second.request(session, "GET", health_path(group_of(name)))
            assert status == 200, (name, body)
        for name in set(ledger.possible) - set(stored):
            status, _ = await second.request(session, "GET", health_path(group_of(name)))
            assert status == 404, name


async def test_sqlite_keeps_every_acknowledged_write_across_kill_9(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    await crash_while_writing(
        tmp_path,
        session,
        {"backend": "sqlite", "sqlite_path": str(tmp_path / "bridge.db")},
        "sqlite",
    )


async def test_etcd_keeps_every_acknowledged_write_across_kill_9(
    tmp_path: Path, session: aiohttp.ClientSession, etcd: EtcdServer
) -> None:
    prefix = f"/registry/crash-{uuid.uuid4().hex[:8]}/dataplaneservices/"
    await crash_while_writing(
        tmp_path,
        session,
        {"backend": "etcd", "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix}},
        "etcd",
    )
