"""Leader election: which replica writes DataPlaneService status.

Done as kube-controller-manager does it, with a Lease: one key in etcd names the holder, and
only the holder writes. The key is attached to a real etcd lease, so it disappears on its own
when the holder stops renewing (a killed process, a lost network): another replica then
creates it and takes over, within the lease's time to live plus one retry period.

The key is nested under the configured object prefix, so an etcd role granting that prefix
is all a replica needs: for the default prefix
``/registry/aggregation.grafana.app/dataplaneservices/`` it is
``/registry/aggregation.grafana.app/dataplaneservices/leases/grafana-bridge-availability``
(bridges using different prefixes elect separately). The object store never takes a nested key
for an object. Its value is a ``coordination.k8s.io`` Lease naming the holder; renewals go to
the etcd lease only (keep-alive), so the key is written once per term.

A leader that cannot renew stops counting itself the leader as soon as the lease could have
expired (measured from before the last successful renewal was sent), so it never writes
after another replica may have taken over. With SQLite or in-memory storage there is one
replica, always the leader.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from prometheus_client import CollectorRegistry, Gauge

from bridge.storage import Store, StoreError
from bridge.storage.etcd import EtcdStore, PermissionDenied

log = logging.getLogger(__name__)

LEASE_NAME = "grafana-bridge-availability"
LEASE_SEGMENT = "leases"  # no dot, so never an object's name (those are <version>.<group>)
DEFAULT_LEASE_DURATION = 15.0  # seconds, kube-controller-manager's --leader-elect-lease-duration
DEFAULT_RETRY_PERIOD = 2.0  # seconds, its --leader-elect-retry-period

Listener = Callable[[bool], None]


class Elector(Protocol):
    """Whether this replica may write status now; listeners hear each change."""

    identity: str

    @property
    def is_leader(self) -> bool: ...

    def add_listener(self, listener: Listener) -> None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


def holder_identity() -> str:
    """``hostname_pid_random``: unique per process, and says where the leader runs."""
    return f"{socket.gethostname()}_{os.getpid()}_{secrets.token_hex(4)}"


def lease_key(prefix: str) -> str:
    """Where the lease of the replicas using the object ``prefix`` lives:
    ``<prefix>leases/<LEASE_NAME>``, one lease per registry, inside its key range.

    It cannot collide with an object: object names are ``<version>.<group>`` and so contain a
    dot, and the store takes only keys directly under the prefix (no further ``/``) for
    objects, while ``leases`` has no dot and the lease key has a further ``/``.
    """
    return f"{prefix}{LEASE_SEGMENT}/{LEASE_NAME}"


class SingleReplica:
    """SQLite or in-memory storage: nothing is shared, so this process always leads."""

    def __init__(self, identity: str | None = None) -> None:
        self.identity = identity or holder_identity()

    @property
    def is_leader(self) -> bool:
        return True

    def add_listener(self, listener: Listener) -> None:
        pass  # leadership never changes

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class EtcdElector:
    """Leader election among replicas sharing one etcd, on a key held by an etcd lease.

    Every ``retry_period`` seconds: renew this replica's etcd lease (or grant one), then try
    to create the key under it; the replica whose lease holds the key leads.
    """

    def __init__(
        self,
        store: EtcdStore,
        *,
        lease_duration: float = DEFAULT_LEASE_DURATION,
        retry_period: float = DEFAULT_RETRY_PERIOD,
        key: str | None = None,
        identity: str | None = None,
    ) -> None:
        if retry_period <= 0 or retry_period * 2 > lease_duration:
            raise ValueError("the retry period must be positive and under half the lease")
        self._store = store
        self.key = key or lease_key(store.prefix)
        self.identity = identity or holder_identity()
        self._ttl = max(2, math.ceil(lease_duration))
        self._retry = retry_period
        self._lease_id: int | None = None
        self._valid_until = 0.0  # monotonic time until which our etcd lease surely lives
        self._leading = False
        self._holder: str | None = None  # the last holder seen (for logs and tests)
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._problem: str | None = None  # what the last failed round was, logged once

    @property
    def is_leader(self) -> bool:
        """True only while this replica holds the key and its lease cannot have expired."""
        return self._leading and time.monotonic() < self._valid_until

    @property
    def holder(self) -> str | None:
        """The identity of the leader as last seen (this replica's own while it leads)."""
        return self._holder

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="leader-election")

    async def stop(self) -> None:
        """Stop trying; a leader gives the lease back so another replica takes over at once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        lease_id, self._lease_id = self._lease_id, None
        if lease_id is not None:
            try:
                await self._store.revoke_lease(lease_id)  # deletes the key if we held it
            except StoreError as exc:
                log.info("leader election: could not give the lease back (%s)", exc.message)
        self._step_down("this replica is stopping")

    async def try_once(self) -> bool:
        """One round (what the background task does each retry period); whether we lead."""
        started = time.monotonic()
        if self._lease_id is not None:
            ttl = await self._store.keep_lease_alive(self._lease_id)
            if ttl > 0:
                self._valid_until = started + ttl
            else:
                self._lease_id = None
                self._step_down("its etcd lease expired before it was renewed")
        if self._lease_id is None:
            started = time.monotonic()
            self._lease_id, ttl = await self._store.grant_lease(self._ttl)
            self._valid_until = started + ttl
        won, value, holding_lease = await self._store.claim_key(
            self.key, self._record(), self._lease_id
        )
        if won or holding_lease == self._lease_id:
            self._take_over()
        else:
            self._follow(_holder_of(value))
        return self.is_leader

    async def _run(self) -> None:
        while True:
            try:
                await self.try_once()
            except PermissionDenied as exc:
                if self._problem != "denied":
                    log.error(
                        "leader election: etcd denies this replica access to the lease key %s; "
                        "no replica can lead until the bridge's etcd role grants read/write on "
                        "%s (%s)",
                        self.key,
                        exc.key_range,
                        exc.message,
                    )
                self._problem = "denied"
            except StoreError as exc:
                if self._problem != "unreachable":
                    log.warning("leader election: cannot reach etcd (%s)", exc.message)
                self._problem = "unreachable"
            except Exception:
                log.exception("leader election failed; trying again")
            else:
                if self._problem is not None:
                    log.info("leader election: etcd answers again")
                self._problem = None
            if self._leading and time.monotonic() >= self._valid_until:
                self._step_down("its lease was not renewed in time")
            await asyncio.sleep(self._delay())

    def _delay(self) -> float:
        if not self._leading:
            return self._retry
        # Never sleep past the point where the lease could lapse unnoticed.
        return max(0.0, min(self._retry, self._valid_until - time.monotonic()))

    def _record(self) -> bytes:
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.key.rpartition("/")[2]},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self._ttl,
                "acquireTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        return json.dumps(lease, separators=(",", ":")).encode()

    def _take_over(self) -> None:
        self._holder = self.identity
        if self._leading:
            return
        self._leading = True
        log.info(
            "leader election: this replica (%s) now holds %s and writes DataPlaneService status",
            self.identity,
            self.key,
        )
        self._tell(True)

    def _follow(self, holder: str) -> None:
        if self._leading:
            self._step_down(f"{holder} holds the lease")
        if holder != self._holder:
            log.info(
                "leader election: %s holds %s; this replica (%s) follows",
                holder,
                self.key,
                self.identity,
            )
        self._holder = holder

    def _step_down(self, why: str) -> None:
        if not self._leading:
            return
        self._leading = False
        if self._holder == self.identity:
            self._holder = None
        log.warning(
            "leader election: this replica (%s) is no longer the leader (%s); "
            "it stops writing DataPlaneService status",
            self.identity,
            why,
        )
        self._tell(False)

    def _tell(self, leading: bool) -> None:
        for listener in self._listeners:
            try:
                listener(leading)
            except Exception:
                log.exception("leader election: a leadership listener failed")


def _holder_of(value: bytes) -> str:
    try:
        holder = json.loads(value)["spec"]["holderIdentity"]
    except (ValueError, KeyError, TypeError):
        return "an unknown holder"
    return str(holder)


def make_elector(
    store: Store,
    *,
    lease_duration: float = DEFAULT_LEASE_DURATION,
    retry_period: float = DEFAULT_RETRY_PERIOD,
    registry: CollectorRegistry | None = None,
) -> Elector:
    """The elector for ``store``: elections on etcd, a single leader otherwise.

    With ``registry``, the gauge ``grafana_bridge_leader`` (1 while this replica leads) is
    registered there.
    """
    elector: Elector
    if isinstance(store, EtcdStore):
        elector = EtcdElector(store, lease_duration=lease_duration, retry_period=retry_period)
    else:
        elector = SingleReplica()
    if registry is not None:
        gauge = Gauge(
            "grafana_bridge_leader",
            "1 while this replica is the leader that writes DataPlaneService status, else 0.",
            registry=registry,
        )
        gauge.set_function(lambda: 1.0 if elector.is_leader else 0.0)
    return elector
