"""What the etcd store adds to the contract: Kubernetes' key layout, settings, TLS, endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc  # type: ignore[import-untyped]
from pydantic import ValidationError

from bridge.controllers.autoregister import ledger_prefix
from bridge.controllers.leader import EtcdElector, lease_key
from bridge.storage import NotFound, StoreError, Unavailable, WatchEvent, WatchEventType
from bridge.storage.etcd import DEFAULT_PREFIX, EtcdSettings, EtcdStore
from tests.bridge.storage.conformance import dataplaneservice, rv
from tests.bridge.storage.conftest import unique_prefix
from tests.bridge.storage.etcd_server import EtcdServer, free_port


def raw_channel(server: EtcdServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(server.endpoint.removeprefix("http://"))


def tls_settings(server: EtcdServer, prefix: str) -> EtcdSettings:
    """Settings for ``server`` (from the ``tls_etcd`` fixture) with our client certificate."""
    assert server.tls is not None
    return EtcdSettings(
        endpoints=(server.endpoint,),
        prefix=prefix,
        request_timeout=2.0,
        ca_file=server.tls.ca,
        cert_file=server.tls.client_cert,
        key_file=server.tls.client_key,
    )


async def grant_only(server: EtcdServer, prefix: str) -> None:
    """Turn on etcd's authentication with an RBAC role as an operator would give the bridge:
    read/write on ``prefix`` and every key under it, nothing else. etcd takes the client
    certificate's common name (``client``) for the user."""
    assert server.tls is not None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server.tls.ca.read_bytes(),
        private_key=server.tls.client_key.read_bytes(),
        certificate_chain=server.tls.client_cert.read_bytes(),
    )
    target = server.endpoint.removeprefix("https://")
    async with grpc.aio.secure_channel(target, credentials) as channel:
        auth = rpc.AuthStub(channel)
        no_password = rpc.UserAddOptions(no_password=True)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", options=no_password), timeout=5)
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name="client", options=no_password), timeout=5)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="bridge"), timeout=5)
        permission = rpc.Permission(
            permType=rpc.Permission.READWRITE,
            key=prefix.encode(),
            range_end=prefix[:-1].encode() + b"0",  # "/" + 1: every key under the prefix
        )
        await auth.RoleGrantPermission(
            rpc.AuthRoleGrantPermissionRequest(name="bridge", perm=permission), timeout=5
        )
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="client", role="bridge"))
        await auth.AuthEnable(rpc.AuthEnableRequest(), timeout=5)


async def test_objects_are_kept_where_kubernetes_keeps_them(etcd_server: EtcdServer) -> None:
    assert DEFAULT_PREFIX == "/registry/aggregation.grafana.app/dataplaneservices/"
    async with EtcdStore([etcd_server.endpoint]) as store, raw_channel(etcd_server) as channel:
        name = "v0alpha1.layout.test.grafana.app"
        created = await store.create(dataplaneservice(name))
        try:
            response = await rpc.KVStub(channel).Range(
                rpc.RangeRequest(key=f"{DEFAULT_PREFIX}{name}".encode()), timeout=5
            )
            (kv,) = response.kvs
            stored = json.loads(kv.value)
            # As kube-apiserver stores objects: JSON, without the resource version, which is
            # the key's mod_revision.
            assert "resourceVersion" not in stored["metadata"]
            assert stored["metadata"]["uid"] == created["metadata"]["uid"]
            assert kv.mod_revision == kv.create_revision == rv(created)
        finally:
            await store.delete(name)


async def test_the_list_version_is_etcds_revision(etcd_server: EtcdServer) -> None:
    async with (
        EtcdStore([etcd_server.endpoint], prefix=unique_prefix()) as store,
        raw_channel(etcd_server) as channel,
    ):
        created = await store.create(dataplaneservice("a"))
        put = await rpc.KVStub(channel).Put(rpc.PutRequest(key=b"/elsewhere", value=b"x"))
        items, version = await store.list()
        assert items == [created]
        assert version == put.header.revision > rv(created)


async def test_a_list_spans_several_pages_of_one_snapshot(etcd_server: EtcdServer) -> None:
    prefix = unique_prefix()
    async with EtcdStore([etcd_server.endpoint], prefix=prefix, list_page_size=3) as store:
        created = [await store.create(dataplaneservice(f"n{i:02}")) for i in range(10)]
        items, version = await store.list()
        assert items == created
        assert version == rv(created[-1])


async def test_values_that_are_not_json_are_skipped(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = unique_prefix()
    async with (
        EtcdStore([etcd_server.endpoint], prefix=prefix) as store,
        raw_channel(etcd_server) as channel,
    ):
        good = await store.create(dataplaneservice("good"))
        await rpc.KVStub(channel).Put(rpc.PutRequest(key=f"{prefix}bad".encode(), value=b"\x00"))
        await rpc.KVStub(channel).Put(rpc.PutRequest(key=f"{prefix}a/b".encode(), value=b"{}"))
        with caplog.at_level(logging.ERROR, logger="bridge.storage.etcd"):
            assert (await store.list())[0] == [good]
        assert "bad" in caplog.text
        with pytest.raises(StoreError, match="not JSON"):
            await store.get("bad")


async def test_the_bridges_nested_keys_are_never_objects(etcd_server: EtcdServer) -> None:
    """The election lease and the auto-registration ledger live under the prefix (one etcd
    role suffices), and get, list, watch (from now, or resumed from an older revision) and
    deleting every listed object see only the objects."""
    prefix = unique_prefix()
    async with (
        EtcdStore([etcd_server.endpoint], prefix=prefix) as store,
        EtcdStore([etcd_server.endpoint], prefix=ledger_prefix(prefix)) as ledger,
        raw_channel(etcd_server) as channel,
    ):
        kv = rpc.KVStub(channel)
        _, before = await store.list()
        live = store.watch()
        first = asyncio.create_task(anext(live))  # started: watching from now
        await asyncio.sleep(0.2)
        a = await store.create(dataplaneservice("v0alpha1.a.grafana.app"))
        elector = EtcdElector(store, lease_duration=6, retry_period=1)
        assert await elector.try_once()
        await ledger.create({"metadata": {"name": "v0alpha1.a.grafana.app"}, "spec": {}})
        b = await store.create(dataplaneservice("v0alpha1.b.grafana.app"))
        keys = [lease_key(prefix), f"{ledger_prefix(prefix)}v0alpha1.a.grafana.app"]
        assert all(key.startswith(prefix) for key in keys)
        for key in keys:
            assert (await kv.Range(rpc.RangeRequest(key=key.encode()))).kvs

        items, _ = await store.list()
        assert items == [a, b]
        for key in keys:
            nested = key.removeprefix(prefix)
            with pytest.raises(NotFound):
                await store.get(nested)
            with pytest.raises(NotFound):
                await store.delete(nested)
        # Deleting the collection (every listed object) leaves the bookkeeping alone.
        for item in items:
            await store.delete(item["metadata"]["name"])
        assert (await store.list())[0] == []
        for key in keys:
            assert (await kv.Range(rpc.RangeRequest(key=key.encode()))).kvs
        await ledger.delete("v0alpha1.a.grafana.app")
        await elector.stop()  # revokes the lease: etcd deletes the lease key
        assert not (await kv.Range(rpc.RangeRequest(key=keys[0].encode()))).kvs
        last = await store.create(dataplaneservice("v0alpha1.c.grafana.app"))

        async def names(
            watch: AsyncGenerator[WatchEvent, None], head: list[WatchEvent]
        ) -> list[tuple[str, str]]:
            seen = list(head)
            while seen[-1].resource_version < rv(last):
                seen.append(await asyncio.wait_for(anext(watch), 5))
            await watch.aclose()
            return [(e.type, e.object["metadata"]["name"]) for e in seen]

        expected = [
            (WatchEventType.ADDED, "v0alpha1.a.grafana.app"),
            (WatchEventType.ADDED, "v0alpha1.b.grafana.app"),
            (WatchEventType.DELETED, "v0alpha1.a.grafana.app"),
            (WatchEventType.DELETED, "v0alpha1.b.grafana.app"),
            (WatchEventType.ADDED, "v0alpha1.c.grafana.app"),
        ]
        assert await names(live, [await asyncio.wait_for(first, 5)]) == expected
        resumed = store.watch(since=before)
        assert await names(resumed, [await anext(resumed)]) == expected
        await store.delete("v0alpha1.c.grafana.app")


async def test_reads_go_on_to_the_next_endpoint(etcd_server: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with EtcdStore([dead, etcd_server.endpoint], prefix=unique_prefix()) as store:
        assert await store.list() == ([], (await store.list())[1])
        created = await store.create(dataplaneservice("a"))
        assert await store.get("a") == created


async def test_nothing_listening_is_unavailable() -> None:
    async with EtcdStore([f"127.0.0.1:{free_port()}"], request_timeout=1.0) as store:
        with pytest.raises(Unavailable, match=r"127\.0\.0\.1"):
            await store.get("a")
        with pytest.raises(Unavailable):
            await store.create(dataplaneservice("a"))
        with pytest.raises(Unavailable):
            await anext(store.watch())


async def test_tls_with_a_client_certificate(tls_etcd: EtcdServer) -> None:
    assert tls_etcd.tls is not None
    settings = EtcdSettings(
        endpoints=(tls_etcd.endpoint,),
        prefix=unique_prefix(),
        ca_file=tls_etcd.tls.ca,
        cert_file=tls_etcd.tls.client_cert,
        key_file=tls_etcd.tls.client_key,
    )
    async with EtcdStore.from_settings(settings) as store:
        created = await store.create(dataplaneservice("a"))
        assert await store.get("a") == created
    without_client_cert = settings.model_copy(update={"cert_file": None, "key_file": None})
    async with EtcdStore.from_settings(without_client_cert, request_timeout=2.0) as store:
        with pytest.raises(StoreError):
            await store.get("a")


def test_an_unreadable_tls_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot read etcd TLS file"):
        EtcdStore(["https://127.0.0.1:2379"], ca_file=tmp_path / "missing.crt")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"endpoints": []}, "at least one etcd endpoint"),
        ({"endpoints": ["etcd.example"]}, "expected host:port"),
        ({"endpoints": ["unix:///run/etcd.sock"]}, "http or https"),
        ({"prefix": "registry/x/"}, "start and end with '/'"),
        ({"prefix": "/registry/x"}, "start and end with '/'"),
        ({"request_timeout": 0}, "greater than 0"),
        ({"cert_file": "client.crt"}, "go together"),
        ({"endpont": ["x:1"]}, "Extra inputs are not permitted"),
    ],
)
def test_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EtcdSettings.model_validate(settings)


def test_settings_defaults() -> None:
    settings = EtcdSettings()
    assert settings.endpoints == ("http://127.0.0.1:2379",)
    assert settings.prefix == DEFAULT_PREFIX
    assert settings.request_timeout == 5.0
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (None, None, None)
