"""Two real ``grafana-bridge serve`` replicas sharing one real etcd.

An object applied through either replica is served by both within a second; SIGKILL of one
replica leaves the other serving (and leaves none of the dead one's plugins behind); etcd
stopped and started again is survived by both, whose watches resume without losing events.
Only the elected leader writes the ``Available`` condition, so replicas that judge a plugin
differently do not fight over it, and a killed leader is replaced within its lease.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

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

# fixtures/plugins is only complete once the Go fixture's binary is there.
pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.usefixtures("go_fixture_binary")]

PROPAGATION_LIMIT = 1.0  # seconds from the 2xx of a write to the other replica serving it


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with running_etcd() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def replica_configs(tmp: Path, etcd: EtcdServer) -> list[BridgeProcess]:
    prefix = f"/registry/replicas-{uuid.uuid4().hex[:8]}/dataplaneservices/"
    storage = {
        "backend": "etcd",
        "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix, "request_timeout": 2},
    }
    bridges = []
    for name in ("a", "b"):
        port = free_port()
        config = write_bridge_config(tmp / name, port, storage=storage)
        bridges.append(BridgeProcess(config, port=port))
    return bridges


async def start_pair(
    tmp: Path, etcd: EtcdServer, session: aiohttp.ClientSession, into: list[BridgeProcess]
) -> tuple[BridgeProcess, BridgeProcess]:
    a, b = replica_configs(tmp, etcd)
    into += [a, b]
    a.start()
    b.start()
    await asyncio.gather(a.wait_ready(session), b.wait_ready(session))
    return a, b


async def answers_within(
    bridge: BridgeProcess, session: aiohttp.ClientSession, group: str, limit: float, code: int
) -> float:
    """Seconds until ``bridge`` answers ``code`` through ``group``; fails after ``limit``."""
    started = time.monotonic()
    last: tuple[int, object] = (0, None)
    while time.monotonic() - started < limit:
        last = await bridge.request(session, "GET", health_path(group), timeout=2)
        if last[0] == code:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"{bridge.url} did not answer {code} for {group} in {limit}s: {last}")


async def serves_within(
    bridge: BridgeProcess, session: aiohttp.ClientSession, group: str, limit: float
) -> float:
    """Seconds until ``bridge`` serves ``group`` (200); fails after ``limit`` seconds."""
    return await answers_within(bridge, session, group, limit, 200)


async def unmounted_within(
    bridge: BridgeProcess, session: aiohttp.ClientSession, group: str, limit: float
) -> None:
    """``group`` is gone from ``bridge`` (404) within ``limit`` seconds."""
    await answers_within(bridge, session, group, limit, 404)


async def create(bridge: BridgeProcess, session: aiohttp.ClientSession, group: str) -> None:
    status, body = await bridge.request(session, "POST", DPS_PATH, json=dataplaneservice(group))
    assert status == 201, body


async def test_an_object_applied_through_either_replica_is_served_by_both_within_a_second(
    tmp_path: Path, etcd: EtcdServer, session: aiohttp.ClientSession
) -> None:
    with running_bridges() as bridges:
        a, b = await start_pair(tmp_path, etcd, session, bridges)
        delays = []
        for writer, group in ((a, "one.replicas.grafana.app"), (b, "two.replicas.grafana.app")):
            await create(writer, session, group)
            for bridge in (a, b):
                delays.append(await serves_within(bridge, session, group, PROPAGATION_LIMIT))
        # Deleting through one replica unmounts the group on both.
        status, _ = await b.request(
            session, "DELETE", f"{DPS_PATH}/v0alpha1.one.replicas.grafana.app"
        )
        assert status == 200
        for bridge in (a, b):
            await unmounted_within(bridge, session, "one.replicas.grafana.app", PROPAGATION_LIMIT)
        assert max(delays) < PROPAGATION_LIMIT


async def test_killing_one_replica_does_not_affect_the_other(
    tmp_path: Path, etcd: EtcdServer, session: aiohttp.ClientSession
) -> None:
    with running_bridges() as bridges:
        a, b = await start_pair(tmp_path, etcd, session, bridges)
        group = "kill.replicas.grafana.app"
        await create(a, session, group)
        await serves_within(b, session, group, PROPAGATION_LIMIT)
        a_plugins = a.plugin_processes()
        assert len(a_plugins) >= 2, a.log  # both fixture plugins run under replica a

        statuses: list[int] = []
        stop = asyncio.Event()

        async def keep_asking() -> None:
            while not stop.is_set():
                status, _ = await b.request(session, "GET", health_path(group), timeout=5)
                statuses.append(status)
                await asyncio.sleep(0.01)

        asker = asyncio.create_task(keep_asking())
        await asyncio.sleep(0.3)
        a.kill()
        await asyncio.sleep(1.5)
        # Still writable through the survivor, and what it writes it serves.
        await create(b, session, "after.replicas.grafana.app")
        await serves_within(b, session, "after.replicas.grafana.app", PROPAGATION_LIMIT)
        stop.set()
        await asker

        assert len(statuses) > 20
        assert set(statuses) == {200}
        assert await wait_gone(a_plugins) == []
        assert b.process is not None and b.process.poll() is None


async def test_etcd_restart_is_survived_and_no_event_is_lost(
    tmp_path: Path, etcd: EtcdServer, session: aiohttp.ClientSession
) -> None:
    with running_bridges() as bridges:
        a, b = await start_pair(tmp_path, etcd, session, bridges)
        before = "before.replicas.grafana.app"
        await create(a, session, before)
        await serves_within(b, session, before, PROPAGATION_LIMIT)

        etcd.stop()
        # etcd is down: the routes both replicas hold keep serving; the API says 503.
        for bridge in (a, b):
            status, _ = await bridge.request(session, "GET", health_path(before))
            assert status == 200
        status, body = await a.request(session, "GET", DPS_PATH)
        assert status == 503, body
        etcd.start()

        # Writes through both replicas once etcd is back: each replica sees every one of them.
        groups = [f"after{i}.replicas.grafana.app" for i in range(4)]
        for index, group in enumerate(groups):
            writer = (a, b)[index % 2]
            deadline = time.monotonic() + 15
            while True:
                status, body = await writer.request(
                    session, "POST", DPS_PATH, json=dataplaneservice(group)
                )
                if status == 201:
                    break
                assert status == 503 and time.monotonic() < deadline, body
                await asyncio.sleep(0.1)
        status, _ = await b.request(session, "DELETE", f"{DPS_PATH}/v0alpha1.{before}")
        assert status == 200
        for bridge in (a, b):
            for group in groups:
                await serves_within(bridge, session, group, PROPAGATION_LIMIT)
            await unmounted_within(bridge, session, before, PROPAGATION_LIMIT)


# -- leader election: one status writer -------------------------------------------------------

RESYNC = 1.0  # availability_resync of the election tests' replicas
LEASE = 3.0  # leader_lease_duration (seconds): short, so a takeover fits in a test
RETRY = 0.5  # leader_retry_period
ELECTED_NAME = "v0alpha1.elected.replicas.grafana.app"


def leader_and_plugin_less_replica(tmp: Path, etcd: EtcdServer) -> list[BridgeProcess]:
    """Replica a runs the fixture plugins; replica b has none, so it judges every object
    ``PluginNotFound`` where a judges ``Passed``."""
    prefix = f"/registry/election-{uuid.uuid4().hex[:8]}/dataplaneservices/"
    storage = {
        "backend": "etcd",
        "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix, "request_timeout": 2},
    }
    dataplane = {
        "availability_resync": RESYNC,
        "leader_lease_duration": LEASE,
        "leader_retry_period": RETRY,
    }
    empty = tmp / "no-plugins"
    empty.mkdir()
    bridges = []
    for name, plugins in (("a", None), ("b", {"directories": [str(empty)]})):
        port = free_port()
        config = write_bridge_config(
            tmp / name, port, storage=storage, plugins=plugins, dataplane=dataplane
        )
        bridges.append(BridgeProcess(config, port=port))
    return bridges


async def leads(bridge: BridgeProcess, session: aiohttp.ClientSession) -> bool:
    """What the replica's ``grafana_bridge_leader`` gauge says."""
    status, text = await bridge.request(session, "GET", "/metrics")
    assert status == 200, text
    found = re.search(r"^grafana_bridge_leader (\S+)$", text, re.MULTILINE)
    assert found is not None, "no grafana_bridge_leader gauge"
    return float(found.group(1)) == 1.0


async def until(predicate: Callable[[], Awaitable[bool]], limit: float) -> float:
    """Seconds until ``predicate()`` comes true; fails after ``limit`` seconds."""
    started = time.monotonic()
    while not await predicate():
        assert time.monotonic() - started < limit, f"not within {limit}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def availability(
    bridge: BridgeProcess, session: aiohttp.ClientSession
) -> tuple[str, dict[str, object]]:
    """The object's resourceVersion and its ``Available`` condition ({} when it has none)."""
    status, body = await bridge.request(session, "GET", f"{DPS_PATH}/{ELECTED_NAME}")
    assert status == 200, body
    conditions = (body.get("status") or {}).get("conditions") or []
    found = [c for c in conditions if c.get("type") == "Available"]
    return body["metadata"]["resourceVersion"], (found[0] if found else {})


async def start_leader_then_follower(
    tmp: Path, etcd: EtcdServer, session: aiohttp.ClientSession, into: list[BridgeProcess]
) -> tuple[BridgeProcess, BridgeProcess]:
    """Replica a leads (it starts first and wins the lease), b follows; one object exists."""
    a, b = leader_and_plugin_less_replica(tmp, etcd)
    into += [a, b]
    a.start()
    await a.wait_ready(session)
    await until(lambda: leads(a, session), LEASE + 5)
    b.start()
    await b.wait_ready(session)
    status, body = await b.request(
        session, "POST", DPS_PATH, json=dataplaneservice("elected.replicas.grafana.app")
    )
    assert status == 201, body

    async def passed() -> bool:
        return (await availability(a, session))[1].get("reason") == "Passed"

    await until(passed, 10)
    return a, b


async def test_only_the_leader_writes_status_so_it_stays_put(
    tmp_path: Path, etcd: EtcdServer, session: aiohttp.ClientSession
) -> None:
    with running_bridges() as bridges:
        a, b = await start_leader_then_follower(tmp_path, etcd, session, bridges)
        assert await leads(a, session) and not await leads(b, session)
        # Over three resync periods both replicas re-judge the object (b sees no plugin), yet
        # only the leader writes: nothing changes, through either replica.
        seen = set()
        deadline = time.monotonic() + 3 * RESYNC + 0.5
        while time.monotonic() < deadline:
            for bridge in (a, b):
                version, condition = await availability(bridge, session)
                seen.add((version, condition["status"], condition["reason"]))
            await asyncio.sleep(0.1)
        [(version, status, reason)] = seen
        assert (status, reason) == ("True", "Passed")  # the leader's verdict, not b's
        assert "no longer the leader" not in a.log


async def test_when_the_leader_is_killed_the_follower_takes_over_within_the_lease(
    tmp_path: Path, etcd: EtcdServer, session: aiohttp.ClientSession
) -> None:
    with running_bridges() as bridges:
        a, b = await start_leader_then_follower(tmp_path, etcd, session, bridges)
        a.kill()
        killed = time.monotonic()

        async def b_wrote_its_verdict() -> bool:
            return (await availability(b, session))[1].get("reason") == "PluginNotFound"

        # The lease lapses within its TTL; b tries every retry period, then writes at once.
        await until(b_wrote_its_verdict, LEASE + RETRY + 2.0)
        took = time.monotonic() - killed
        assert took <= LEASE + RETRY + 2.0
        assert await leads(b, session)
        version, condition = await availability(b, session)
        assert condition["status"] == "False"
        assert "holds" in b.log and "now holds" in b.log
        # And it stays put from then on.
        await asyncio.sleep(2 * RESYNC)
        assert await availability(b, session) == (version, condition)
