"""The etcd store: one registry shared by several bridge replicas, laid out as Kubernetes does.

An object lives at ``<prefix><name>`` (by default
``/registry/aggregation.grafana.app/dataplaneservices/<name>``, where kube-apiserver would keep
a cluster-scoped resource of that group) as JSON without ``metadata.resourceVersion``. Its
resource version is the key's ``mod_revision``; a list's is the response header's revision.
Writes are transactions, as kube-apiserver's: create only if ``create_revision == 0``, update
and delete only if ``mod_revision`` is still the one read.

Only keys directly under the prefix are objects. The bridge keeps its own bookkeeping in
nested keys under the same prefix (the leader-election lease at ``<prefix>leases/...``, the
auto-registration ledger at ``<prefix>autoregistrations/...``), so an etcd role granting the
prefix is all it needs; list, get, watch and delete never take a key with a further ``/`` for
an object (object names never contain one).

The client is :mod:`aetcd`'s generated gRPC stubs over our own ``grpc.aio`` channel, which gives
TLS, a deadline on every call (so an outage is :class:`~bridge.storage.Unavailable` within
``request_timeout``, usually at once) and a watch stream we own: when etcd goes away the watch
reconnects and resumes after the last revision it delivered, so nothing is lost or repeated.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aetcd import rpc  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/registry/aggregation.grafana.app/dataplaneservices/"

# Reconnect soon after etcd comes back (gRPC's default backoff grows to two minutes), and
# notice a dead connection under a running watch. etcd refuses pings more often than every 5 s.
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging under a watch that is quiet
    ("grpc.max_receive_message_length", 64 * 2**20),
]
_GONE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_DENIED = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
_MAX_UPDATE_ATTEMPTS = 32
_WATCH_BUFFER = 16
_RESUME_DELAY = (0.05, 1.0)  # first and longest pause between watch reconnects


class EtcdSettings(BaseModel):
    """``storage.etcd``: where the shared registry is and how to talk to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = DEFAULT_PREFIX
    request_timeout: float = Field(default=5.0, gt=0)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one etcd endpoint is needed")
        for endpoint in value:
            _parse_endpoint(endpoint)
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or not value.endswith("/") or len(value) < 3:
            raise ValueError("the key prefix must start and end with '/', e.g. " + DEFAULT_PREFIX)
        return value

    @model_validator(mode="after")
    def _client_pair(self) -> EtcdSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (a client certificate and key)")
        return self


def _parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """``http(s)://host:port`` or ``host:port`` as a gRPC target and whether it wants TLS."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "http", endpoint
    if scheme not in ("http", "https"):
        raise ValueError(f"etcd endpoint {endpoint!r}: the scheme must be http or https")
    target = rest.rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r}: expected host:port, e.g. 127.0.0.1:2379")
    return target, scheme == "https"


@dataclass(slots=True)
class _Endpoint:
    target: str
    channel: grpc.aio.Channel
    kv: Any
    watch: Any
    lease: Any


class PermissionDenied(StoreError):
    """etcd refused the call: the client's role lacks access to ``key_range``."""

    def __init__(self, name: str, message: str, key_range: str) -> None:
        super().__init__(name, message)
        self.key_range = key_range


class _StreamBroken(Exception):
    """The watch stream ended; the watch reconnects."""


class _RevisionCompacted(Exception):
    """A read at an old revision (a later page of a list) came after a compaction."""


_END = object()
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs does not declare it
_Objects = list[dict[str, Any]]  # `list` is a method of the store


class EtcdStore:
    """One resource's objects under a key prefix of an etcd cluster."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        request_timeout: float = 5.0,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        bookmark_interval: float = 60.0,
        list_page_size: int = 1000,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError("the key prefix must start and end with '/'")
        parsed = [_parse_endpoint(endpoint) for endpoint in endpoints]
        self._targets = [target for target, _ in parsed]
        self._prefix = prefix.encode()
        self._range_end = _prefix_end(self._prefix)
        self._request_timeout = request_timeout
        self._bookmark_interval = bookmark_interval
        self._page_size = list_page_size
        tls = any(wants_tls for _, wants_tls in parsed) or ca_file is not None
        self._credentials = _credentials(ca_file, cert_file, key_file) if tls else None
        self._endpoints: dict[int, _Endpoint] = {}
        self._current = 0
        self._closed = False

    @classmethod
    def from_settings(cls, settings: EtcdSettings, **options: Any) -> EtcdStore:
        """The store ``settings`` describe; keyword ``options`` override or add to them."""
        configured: dict[str, Any] = {
            "prefix": settings.prefix,
            "request_timeout": settings.request_timeout,
            "ca_file": settings.ca_file,
            "cert_file": settings.cert_file,
            "key_file": settings.key_file,
        }
        return cls(settings.endpoints, **{**configured, **options})

    async def get(self, name: str) -> dict[str, Any]:
        if not _is_name(name):
            raise NotFound(name)  # a nested key (the bridge's bookkeeping) is no object
        response = await self._call("Range", rpc.RangeRequest(key=self._key(name)), name)
        if not response.kvs:
            raise NotFound(name)
        kv = response.kvs[0]
        return self._decode(kv.value, kv.mod_revision, name)

    async def list(self) -> tuple[list[dict[str, Any]], int]:
        while True:
            try:
                return await self._list_pages()
            except _RevisionCompacted:
                continue  # compacted between two pages: start again at the newest revision

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = object_name(obj)
        if not _is_name(name):
            raise StoreError(name, f"an object name cannot contain '/': {name!r}")
        key = self._key(name)
        value = encode(new_body(obj)).encode()
        request = rpc.TxnRequest(
            compare=[_compare_created(key, 0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
        )
        response = await self._call("Txn", request, name)
        if not response.succeeded:
            raise AlreadyExists(name)
        return decode(value, response.header.revision)

    async def update(self, obj: dict[str, Any], *, expected_version: int | None) -> dict[str, Any]:
        name = object_name(obj)
        if not _is_name(name):
            raise NotFound(name)
        key = self._key(name)
        response = await self._call("Range", rpc.RangeRequest(key=key), name)
        if not response.kvs:
            raise NotFound(name)
        kv = response.kvs[0]
        # kube-apiserver's GuaranteedUpdate: compute from what was read, write only if nobody
        # wrote since; when someone did, start again from their version (or report the
        # conflict, when the caller named the version it started from).
        for _ in range(_MAX_UPDATE_ATTEMPTS):
            current = int(kv.mod_revision)
            if expected_version is not None and expected_version != current:
                raise Conflict(name, expected=expected_version, actual=current)
            stored = self._load(kv.value, name)
            body = updated_body(stored, obj)
            if body == stored:
                return decode(kv.value, current)
            value = encode(body).encode()
            request = rpc.TxnRequest(
                compare=[_compare_modified(key, current)],
                success=[rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value))],
                failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
            )
            response = await self._call("Txn", request, name)
            if response.succeeded:
                return decode(value, response.header.revision)
            kvs = response.responses[0].response_range.kvs
            if not kvs:
                raise NotFound(name)
            kv = kvs[0]
        raise Conflict(name, expected=current, actual=int(kv.mod_revision))

    async def delete(self, name: str, *, expected_version: int | None = None) -> dict[str, Any]:
        if not _is_name(name):
            raise NotFound(name)
        key = self._key(name)
        if expected_version is None:
            request = rpc.DeleteRangeRequest(key=key, prev_kv=True)
            deleted = await self._call("DeleteRange", request, name)
            if not deleted.deleted:
                raise NotFound(name)
            return self._decode(deleted.prev_kvs[0].value, deleted.header.revision, name)
        txn = rpc.TxnRequest(
            compare=[_compare_modified(key, expected_version)],
            success=[
                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, prev_kv=True))
            ],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key))],
        )
        response = await self._call("Txn", txn, name)
        if not response.succeeded:
            kvs = response.responses[0].response_range.kvs
            if not kvs:
                raise NotFound(name)
            raise Conflict(name, expected=expected_version, actual=int(kvs[0].mod_revision))
        previous = response.responses[0].response_delete_range.prev_kvs
        if not previous:
            raise NotFound(name)
        return self._decode(previous[0].value, response.header.revision, name)

    def watch(
        self, *, since: int | None = None, bookmarks: bool = False
    ) -> AsyncGenerator[WatchEvent, None]:
        """See the contract; ``since=None`` means the revision when iteration starts.

        The first connection failing raises :class:`~bridge.storage.Unavailable`; once the
        watch has started it outlives etcd restarts, resuming where it stopped.
        """
        self._check_open()
        return self._watch(since, bookmarks)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        endpoints, self._endpoints = self._endpoints, {}
        for endpoint in endpoints.values():
            await endpoint.channel.close(None)

    async def __aenter__(self) -> EtcdStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- leases (for leader election: bridge/controllers/leader.py) --------------------------

    @property
    def prefix(self) -> str:
        """The key prefix the objects live under."""
        return self._prefix.decode()

    async def grant_lease(self, ttl: int) -> tuple[int, int]:
        """A new etcd lease of ``ttl`` seconds: its id and the TTL etcd granted."""
        request = rpc.LeaseGrantRequest(TTL=ttl)
        response = await self._call("LeaseGrant", request, lease=True)
        if response.error:
            raise StoreError("", f"etcd refused a lease: {response.error}")
        return int(response.ID), int(response.TTL)

    async def keep_lease_alive(self, lease_id: int) -> int:
        """Renew a lease once: the TTL it has again in seconds, 0 if it had already expired."""
        index, endpoint = self._endpoint()
        call = endpoint.lease.LeaseKeepAlive(timeout=self._request_timeout)
        try:
            await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
            response = await call.read()
        except grpc.aio.UsageError as exc:
            raise StoreError("", "the store is closed") from exc
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            if self._closed:
                raise StoreError("", "the store is closed") from exc
            details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "call ended"
            message = f"etcd at {endpoint.target}: {details}"
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _DENIED:
                raise self._denied("", endpoint.target, exc) from exc
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _GONE:
                raise StoreError("", message) from exc
            self._failed(index)
            raise Unavailable("", message) from exc
        finally:
            call.cancel()
        if response is _EOF:
            self._failed(index)
            raise Unavailable("", f"etcd at {endpoint.target} ended the lease keep-alive")
        return max(0, int(response.TTL))

    async def revoke_lease(self, lease_id: int) -> None:
        """End a lease now; etcd deletes the keys attached to it."""
        await self._call("LeaseRevoke", rpc.LeaseRevokeRequest(ID=lease_id), lease=True)

    async def claim_key(self, key: str, value: bytes, lease_id: int) -> tuple[bool, bytes, int]:
        """Put ``value`` at ``key`` (a full key; the bridge keeps it nested under the prefix),
        attached to the lease, unless the key exists. Whether it was put, and the value and
        lease id the key has now.
        """
        raw = key.encode()
        request = rpc.TxnRequest(
            compare=[_compare_created(raw, 0)],
            success=[
                rpc.RequestOp(request_put=rpc.PutRequest(key=raw, value=value, lease=lease_id))
            ],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=raw))],
        )
        response = await self._call("Txn", request, key)
        if response.succeeded:
            return True, value, lease_id
        kvs = response.responses[0].response_range.kvs
        if not kvs:
            return False, b"", 0
        return False, bytes(kvs[0].value), int(kvs[0].lease)

    # -- connection --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("", "the store is closed")

    def _endpoint(self) -> tuple[int, _Endpoint]:
        self._check_open()
        index = self._current
        endpoint = self._endpoints.get(index)
        if endpoint is None:
            target = self._targets[index]
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(
                    target, self._credentials, options=_CHANNEL_OPTIONS
                )
            endpoint = _Endpoint(
                target,
                channel,
                rpc.KVStub(channel),
                rpc.WatchStub(channel),
                rpc.LeaseStub(channel),
            )
            self._endpoints[index] = endpoint
        return index, endpoint

    def _failed(self, index: int) -> None:
        """The endpoint at ``index`` did not answer: the next call tries the next one."""
        if index == self._current:
            self._current = (index + 1) % len(self._targets)

    async def _call(self, method: str, request: Any, name: str = "", *, lease: bool = False) -> Any:
        """One KV (or, with ``lease``, Lease) call with a deadline; etcd's failures mapped onto
        the storage errors.

        A read that finds its endpoint down goes on to the next endpoint. A write does not:
        it may have been applied, so the caller gets ``Unavailable`` and decides.
        """
        attempts = len(self._targets) if method == "Range" else 1
        while True:
            attempts -= 1
            index, endpoint = self._endpoint()
            try:
                stub = endpoint.lease if lease else endpoint.kv
                return await getattr(stub, method)(request, timeout=self._request_timeout)
            except grpc.aio.UsageError as exc:  # the channel was closed under the call
                raise StoreError(name, "the store is closed") from exc
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    raise _RevisionCompacted from exc
                if self._closed:
                    raise StoreError(name, "the store is closed") from exc
                if code in _DENIED:
                    raise self._denied(name, endpoint.target, exc) from exc
                message = f"etcd at {endpoint.target}: {exc.details()}"
                if code not in _GONE:
                    raise StoreError(name, message) from exc
                self._failed(index)
                if attempts <= 0:
                    raise Unavailable(name, message) from exc

    def _denied(self, name: str, target: str, exc: grpc.aio.AioRpcError) -> PermissionDenied:
        """etcd's refusal, naming the key range the bridge's etcd role must grant."""
        key_range = f"{self.prefix}* (the prefix and every key under it)"
        if name.startswith("/"):  # a full key (the election's)
            key_range = f"{name} (under the prefix {self.prefix})"
        message = (
            f"etcd at {target} denied access ({exc.code().name}: {exc.details()}); the bridge's "
            f"etcd role needs read/write on {key_range}"
        )
        return PermissionDenied(name, message, key_range)

    # -- keys and values ---------------------------------------------------------------------

    def _key(self, name: str) -> bytes:
        return self._prefix + name.encode()

    def _name(self, key: bytes) -> str | None:
        """The object's name for a key directly under the prefix, else ``None``."""
        rest = key[len(self._prefix) :]
        if not key.startswith(self._prefix) or not rest or b"/" in rest:
            return None
        return rest.decode(errors="replace")

    def _load(self, value: bytes, name: str) -> dict[str, Any]:
        try:
            body: dict[str, Any] = json.loads(value)
        except ValueError as exc:
            raise StoreError(name, f"the value stored for {name!r} is not JSON") from exc
        return body

    def _decode(self, value: bytes, version: int, name: str) -> dict[str, Any]:
        try:
            return decode(value, version)
        except ValueError as exc:
            raise StoreError(name, f"the value stored for {name!r} is not JSON") from exc

    async def _list_pages(self) -> tuple[_Objects, int]:
        items: _Objects = []
        revision = 0
        start = self._prefix
        while True:
            request = rpc.RangeRequest(
                key=start, range_end=self._range_end, limit=self._page_size, revision=revision
            )
            response = await self._call("Range", request)
            if revision == 0:
                revision = int(response.header.revision)  # later pages read the same snapshot
            for kv in response.kvs:
                name = self._name(kv.key)
                if name is None:
                    continue
                try:
                    items.append(self._decode(kv.value, kv.mod_revision, name))
                except StoreError as exc:
                    log.error("skipping %s in etcd: %s", kv.key.decode(errors="replace"), exc)
            if not response.more or not response.kvs:
                return items, revision
            start = response.kvs[-1].key + b"\x00"

    # -- watch -------------------------------------------------------------------------------

    def _event(self, event: Any) -> WatchEvent | None:
        kv = event.kv
        name = self._name(kv.key)
        if name is None:
            return None
        version = int(kv.mod_revision)
        try:
            if event.type == rpc.Event.DELETE:
                previous = event.prev_kv
                if previous.key:
                    obj = decode(previous.value, version)
                else:  # the previous value was compacted away: all we know is the name
                    obj = {"metadata": {"name": name, "resourceVersion": str(version)}}
                return WatchEvent(WatchEventType.DELETED, obj, version)
            kind = (
                WatchEventType.ADDED
                if kv.create_revision == kv.mod_revision
                else WatchEventType.MODIFIED
            )
            return WatchEvent(kind, decode(kv.value, version), version)
        except ValueError:
            log.error("skipping a change of %s in etcd: the value is not JSON", name)
            return None

    async def _watch(self, since: int | None, bookmarks: bool) -> AsyncGenerator[WatchEvent, None]:
        if since is None:
            request = rpc.RangeRequest(key=self._prefix, range_end=self._range_end, count_only=True)
            since = int((await self._call("Range", request)).header.revision)
        delivered = since  # every change up to this revision has been yielded
        started = False  # a stream was established once: from now on, outages are waited out
        connected = False  # the current stream is established (so its loss is worth a warning)
        delay = _RESUME_DELAY[0]
        loop = asyncio.get_running_loop()
        bookmark_at = loop.time() + self._bookmark_interval
        while not self._closed:
            index, endpoint = self._endpoint()
            stream = _WatchStream(endpoint.watch)
            resumed_after = delivered
            try:
                await stream.start(
                    rpc.WatchCreateRequest(
                        key=self._prefix,
                        range_end=self._range_end,
                        start_revision=delivered + 1,
                        prev_kv=True,
                        progress_notify=bookmarks,
                    )
                )
                while True:
                    timeout = max(0.0, bookmark_at - loop.time()) if bookmarks else None
                    response = await stream.next(timeout)
                    if response is None:
                        yield bookmark(delivered)
                        bookmark_at = loop.time() + self._bookmark_interval
                        continue
                    if response.compact_revision:
                        raise Expired(delivered, int(response.compact_revision))
                    if response.canceled:
                        raise _StreamBroken(response.cancel_reason or "watch cancelled by etcd")
                    if response.created:
                        if started:
                            log.info("etcd watch resumed after revision %d", resumed_after)
                        started = connected = True
                        delay = _RESUME_DELAY[0]
                        continue
                    if not response.events:
                        # A progress notification: nothing of ours changed up to this revision.
                        delivered = max(delivered, int(response.header.revision))
                        continue
                    for change in response.events:
                        event = self._event(change)
                        if event is None or event.resource_version <= resumed_after:
                            continue
                        yield event
                        delivered = event.resource_version
                    bookmark_at = loop.time() + self._bookmark_interval
            except _StreamBroken as exc:
                if self._closed:
                    return
                self._failed(index)
                if not started:
                    raise Unavailable("", f"cannot watch etcd at {endpoint.target}: {exc}") from exc
                log.log(
                    logging.WARNING if connected else logging.DEBUG,
                    "etcd watch at %s interrupted (%s); resuming after revision %d",
                    endpoint.target,
                    exc,
                    delivered,
                )
                connected = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESUME_DELAY[1])
            finally:
                await stream.close()


class _WatchStream:
    """One Watch RPC; a reader task moves its responses into a queue.

    Reading through a task lets the watch wait with a timeout (for bookmarks): cancelling a
    pending ``read()`` of a gRPC call would cancel the whole call.
    """

    def __init__(self, stub: Any) -> None:
        self._call = stub.Watch()
        self._responses: asyncio.Queue[Any] = asyncio.Queue(maxsize=_WATCH_BUFFER)
        self._reader: asyncio.Task[None] | None = None

    async def start(self, create: Any) -> None:
        try:
            await self._call.write(rpc.WatchRequest(create_request=create))
        except grpc.aio.AioRpcError as exc:
            raise _StreamBroken(exc.details() or exc.code().name) from exc
        except asyncio.InvalidStateError as exc:  # the call already ended
            raise _StreamBroken("the watch call ended") from exc
        self._reader = asyncio.create_task(self._read(), name="etcd-watch-reader")

    async def _read(self) -> None:
        try:
            # read(), not `async for`: the call's iterator is an async generator that, left
            # suspended by a cancelled reader, would be closed later by a task of its own.
            while (response := await self._call.read()) is not _EOF:
                await self._responses.put(response)
            await self._responses.put(_END)
        except grpc.aio.AioRpcError as exc:
            await self._responses.put(_StreamBroken(exc.details() or exc.code().name))

    async def next(self, timeout: float | None) -> Any:
        """The next response, or ``None`` when ``timeout`` passed without one."""
        # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the item instead of
        # raising when a cancellation arrives as the item does, so a watch cancelled as an event
        # came in went on waiting for the next one, and the bridge never finished stopping.
        try:
            async with asyncio.timeout(timeout):
                item = await self._responses.get()
        except TimeoutError:
            return None
        if item is _END:
            raise _StreamBroken("etcd ended the watch")
        if isinstance(item, _StreamBroken):
            raise item
        return item

    async def close(self) -> None:
        self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def _is_name(name: str) -> bool:
    """Whether ``name`` can be an object's: not empty and no ``/`` (which nests a key)."""
    return bool(name) and "/" not in name


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range_end for a prefix)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


def _compare_created(key: bytes, revision: int) -> Any:
    return rpc.Compare(
        key=key, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=revision
    )


def _compare_modified(key: bytes, revision: int) -> Any:
    return rpc.Compare(
        key=key, target=rpc.Compare.MOD, result=rpc.Compare.EQUAL, mod_revision=revision
    )


def _credentials(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> grpc.ChannelCredentials:
    def read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise StoreError("", f"cannot read etcd TLS file {path}: {exc.strerror}") from exc

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )
