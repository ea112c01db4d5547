"""Leader election on a real etcd: one elector wins, release and expiry hand over, a leader
that loses etcd stops counting itself the leader."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aetcd import rpc  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry

from bridge.controllers.leader import (
    LEASE_NAME,
    EtcdElector,
    SingleReplica,
    lease_key,
    make_elector,
)
from bridge.storage.etcd import DEFAULT_PREFIX, EtcdStore
from bridge.storage.memory import MemoryStore
from tests.bridge.storage.conftest import running_etcd, unique_prefix
from tests.bridge.storage.etcd_server import EtcdServer
from tests.bridge.storage.test_etcd import grant_only, raw_channel, tls_settings

TTL = 2.0  # etcd's shortest lease (its minimum is 1.5 s with the default election timeout)
RETRY = 0.25


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with running_etcd() as server:
        yield server


@pytest.fixture
async def stores(etcd: EtcdServer) -> AsyncIterator[list[EtcdStore]]:
    """Stores (one per replica) that the test opens with ``open_store``; closed at the end."""
    opened: list[EtcdStore] = []
    yield opened
    for store in opened:
        await store.close()


def open_store(etcd: EtcdServer, into: list[EtcdStore], prefix: str) -> EtcdStore:
    store = EtcdStore([etcd.endpoint], prefix=prefix, request_timeout=1.0)
    into.append(store)
    return store


async def stored(etcd: EtcdServer, key: str) -> tuple[dict[str, Any], int] | None:
    """The lease record at ``key`` and the etcd lease it is attached to, read directly."""
    channel = raw_channel(etcd)
    try:
        response = await rpc.KVStub(channel).Range(rpc.RangeRequest(key=key.encode()))
    finally:
        await channel.close(None)
    if not response.kvs:
        return None
    return json.loads(response.kvs[0].value), int(response.kvs[0].lease)


async def wait_for(predicate: Any, limit: float) -> float:
    """Seconds until ``predicate()`` is true; fails after ``limit`` seconds."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < limit, f"not within {limit}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def test_the_lease_key_is_nested_inside_the_configured_prefix() -> None:
    # Inside the prefix, so an etcd role granting only the prefix suffices.
    assert lease_key(DEFAULT_PREFIX) == (
        f"/registry/aggregation.grafana.app/dataplaneservices/leases/{LEASE_NAME}"
    )
    assert lease_key("/x/y/things/") == f"/x/y/things/leases/{LEASE_NAME}"
    assert lease_key("/solo/") == f"/solo/leases/{LEASE_NAME}"
    for prefix in (DEFAULT_PREFIX, "/x/y/things/", "/solo/"):
        rest = lease_key(prefix).removeprefix(prefix)
        assert lease_key(prefix).startswith(prefix) and "/" in rest
    # Different registries elect separately.
    assert lease_key("/registry/a/dataplaneservices/") != lease_key(
        "/registry/b/dataplaneservices/"
    )


async def test_without_shared_storage_the_only_replica_leads() -> None:
    registry = CollectorRegistry()
    elector = make_elector(MemoryStore(), registry=registry)
    assert isinstance(elector, SingleReplica)
    assert elector.is_leader
    assert registry.get_sample_value("grafana_bridge_leader") == 1.0


async def test_two_electors_one_wins_and_the_record_names_it(
    etcd: EtcdServer, stores: list[EtcdStore]
) -> None:
    prefix = unique_prefix()
    registry = CollectorRegistry()
    first = make_elector(
        open_store(etcd, stores, prefix),
        lease_duration=TTL * 3,
        retry_period=RETRY,
        registry=registry,
    )
    second = EtcdElector(open_store(etcd, stores, prefix), lease_duration=TTL * 3)
    assert isinstance(first, EtcdElector)
    assert registry.get_sample_value("grafana_bridge_leader") == 0.0
    results = await asyncio.gather(first.try_once(), second.try_once())
    assert sorted(results) == [False, True]
    leader, follower = (first, second) if results[0] else (second, first)
    assert leader.is_leader and not follower.is_leader
    assert follower.holder == leader.identity
    assert leader.identity != follower.identity
    # Trying again changes nothing: the leader renews, the follower still follows.
    assert await leader.try_once() and not await follower.try_once()
    assert registry.get_sample_value("grafana_bridge_leader") == (1.0 if first.is_leader else 0.0)

    found = await stored(etcd, first.key)
    assert found is not None
    record, lease_id = found
    assert lease_id != 0  # attached to an etcd lease, so it expires with its holder
    assert record["kind"] == "Lease" and record["apiVersion"] == "coordination.k8s.io/v1"
    assert first.key == f"{prefix}leases/{LEASE_NAME}"
    assert record["metadata"] == {"name": LEASE_NAME}
    assert record["spec"]["holderIdentity"] == leader.identity
    assert record["spec"]["leaseDurationSeconds"] == 6
    await asyncio.gather(leader.stop(), follower.stop())


async def test_a_released_lease_is_taken_over_at_the_next_try(
    etcd: EtcdServer, stores: list[EtcdStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.controllers.leader")
    prefix = unique_prefix()
    a = EtcdElector(open_store(etcd, stores, prefix), lease_duration=30, retry_period=RETRY)
    b = EtcdElector(open_store(etcd, stores, prefix), lease_duration=30, retry_period=RETRY)
    changes: list[bool] = []
    b.add_listener(changes.append)
    assert await a.try_once()
    b.start()
    await wait_for(lambda: b.holder == a.identity, 5)
    assert not b.is_leader
    await a.stop()  # gives the lease back: the key goes with it
    assert not a.is_leader
    # A 30 s lease, yet the takeover takes one retry period, not the lease's lifetime.
    took = await wait_for(lambda: b.is_leader, RETRY + 1.0)
    assert took < RETRY + 1.0
    assert changes == [True]
    found = await stored(etcd, a.key)
    assert found is not None and found[0]["spec"]["holderIdentity"] == b.identity
    await b.stop()
    assert changes == [True, False]
    assert await stored(etcd, a.key) is None
    # Each transition is logged once.
    messages = [r.getMessage() for r in caplog.records]
    assert sum(f"({b.identity}) now holds" in m for m in messages) == 1
    assert sum(f"({b.identity}) is no longer the leader" in m for m in messages) == 1
    assert sum(f"({a.identity}) is no longer the leader" in m for m in messages) == 1


async def test_a_leader_that_stops_renewing_is_replaced_after_its_lease_expires(
    etcd: EtcdServer, stores: list[EtcdStore]
) -> None:
    prefix = unique_prefix()
    silent = EtcdElector(open_store(etcd, stores, prefix), lease_duration=TTL, retry_period=RETRY)
    other = EtcdElector(open_store(etcd, stores, prefix), lease_duration=TTL, retry_period=RETRY)
    assert await silent.try_once()  # leads once, then never renews (as if it hung or died)
    died = time.monotonic()
    other.start()
    try:
        await wait_for(lambda: other.holder == silent.identity, 2)
        took = await wait_for(lambda: other.is_leader, TTL + 3)
        # Not before the lease could expire, and within its TTL plus a retry (and etcd's
        # expiry sweep, which runs every half second).
        assert TTL - 0.3 <= time.monotonic() - died <= TTL + RETRY + 1.5, took
        # The silent one stopped counting itself the leader by then, without asking etcd;
        # when it does ask, it finds its lease gone and follows the new leader.
        assert not silent.is_leader
        assert not await silent.try_once()
        assert silent.holder == other.identity and other.is_leader
        await silent.stop()
    finally:
        await other.stop()


async def test_a_leader_that_loses_etcd_stops_leading_within_the_lease() -> None:
    with running_etcd() as etcd:
        store = EtcdStore([etcd.endpoint], prefix=unique_prefix(), request_timeout=0.5)
        elector = EtcdElector(store, lease_duration=TTL, retry_period=RETRY)
        changes: list[bool] = []
        elector.add_listener(changes.append)
        elector.start()
        try:
            await wait_for(lambda: elector.is_leader, 5)
            etcd.stop()
            lost = time.monotonic()
            took = await wait_for(lambda: not elector.is_leader, TTL + 0.5)
            assert took <= TTL + 0.1
            await wait_for(lambda: changes == [True, False], 2)
            assert time.monotonic() - lost <= TTL + 1.0
        finally:
            await elector.stop()
            await store.close()


@pytest.fixture
def tls_etcd() -> Iterator[EtcdServer]:
    with running_etcd(tls=True) as server:
        yield server


async def test_an_etcd_role_granting_only_the_prefix_is_enough(
    tls_etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With etcd RBAC on, a replica whose role grants only the prefix is elected; a lease key
    outside the prefix (where it used to be) is refused, logged once as a permission problem."""
    prefix = unique_prefix()
    await grant_only(tls_etcd, prefix)
    caplog.set_level(logging.INFO, logger="bridge.controllers.leader")
    async with EtcdStore.from_settings(tls_settings(tls_etcd, prefix)) as store:
        elector = EtcdElector(store, lease_duration=TTL * 3, retry_period=RETRY)
        assert await elector.try_once()
        await elector.stop()

        outside = "/registry/leases/aggregation.grafana.app/" + LEASE_NAME
        denied = EtcdElector(store, lease_duration=TTL * 3, retry_period=RETRY, key=outside)
        denied.start()
        try:
            await wait_for(lambda: "denies this replica access" in caplog.text, 5)
            await asyncio.sleep(RETRY * 3)  # several more rounds fail the same way
            assert not denied.is_leader
        finally:
            await denied.stop()
    messages = [r.getMessage() for r in caplog.records if "denies" in r.getMessage()]
    assert len(messages) == 1, messages
    assert outside in messages[0] and "PERMISSION_DENIED" in messages[0]
    assert "read/write on" in messages[0]
    assert "cannot reach etcd" not in caplog.text
