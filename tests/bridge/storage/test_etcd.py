"""What the etcd store adds to the contract: Kubernetes' key layout, settings, TLS, endpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
from aetcd import rpc  # type: ignore[import-untyped]
from pydantic import ValidationError

from bridge.storage import StoreError, Unavailable
from bridge.storage.etcd import DEFAULT_PREFIX, EtcdSettings, EtcdStore
from tests.bridge.storage.conformance import dataplaneservice, rv
from tests.bridge.storage.conftest import unique_prefix
from tests.bridge.storage.etcd_server import EtcdServer, free_port


def raw_channel(server: EtcdServer) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(server.endpoint.removeprefix("http://"))


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
