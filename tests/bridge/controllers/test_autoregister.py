"""Auto-registration: the derived service list, the ledger that makes deletes stick, and the
winner rule of a manifest against a stored object (on real SQLite files and a real etcd)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import yaml
from aetcd import rpc  # type: ignore[import-untyped]

from bridge.apis import DataPlaneService
from bridge.controllers.autoregister import (
    DECLINED,
    MANAGED_BY,
    PRESENT,
    SPEC_HASH,
    Candidate,
    auto_register,
    declined,
    derived_object,
    ledger_prefix,
    make_ledger,
    service_types,
)
from bridge.controllers.availability import judge
from bridge.controllers.leader import LEASE_NAME
from bridge.manifests import ManifestService, load_manifests
from bridge.routing import RouteTable
from bridge.storage import StorageSettings, Store
from bridge.storage.etcd import EtcdStore
from bridge.storage.memory import MemoryStore
from bridge.storage.sqlite import SQLiteStore
from plugin_host.plugin_json import parse_plugin_json
from tests.bridge.bridge_process import (
    ADMIN_TOKEN,
    DPS_PATH,
    BridgeProcess,
    free_port,
    running_bridges,
    write_bridge_config,
)
from tests.bridge.storage.conftest import running_etcd, unique_prefix
from tests.bridge.storage.etcd_server import EtcdServer
from tests.bridge.storage.test_etcd import grant_only, raw_channel, tls_settings
from tests.conftest import FIXTURE_PLUGINS
from tests.helpers import GO_FIXTURE_ID, PY_FIXTURE_ID

NAME = "v0alpha1.acme-x-datasource.grafana.app"
REFLECTED = frozenset({"pluginv2.Data", "pluginv2.Resource", "pluginv2.Diagnostics"})


def types_of(candidate: Candidate) -> list[str]:
    return [str(t) for t in service_types(candidate)]


def test_service_list_follows_reflection_then_plugin_json() -> None:
    # Reflection is the plugin's own word: streaming in plugin.json adds nothing it lacks.
    assert types_of(Candidate("a-b-datasource", "datasource", REFLECTED, streaming=True)) == [
        "query",
        "route",
    ]
    everything = REFLECTED | {
        "pluginv2.Stream",
        "pluginv2.AdmissionControl",
        "pluginv2.ResourceConversion",
    }
    assert types_of(Candidate("a-b-app", "app", everything)) == [
        "query",
        "route",
        "stream",
        "admission",
        "conversion",
    ]
    # Without reflection: query and route for any backend plugin, stream when it streams.
    assert types_of(Candidate("a-b-datasource", "datasource", None)) == ["query", "route"]
    assert types_of(Candidate("a-b-datasource", "datasource", None, streaming=True)) == [
        "query",
        "route",
        "stream",
    ]
    # Data source proxy routes in plugin.json: datasource-proxy, for data sources only.
    assert types_of(Candidate("a-b-datasource", "datasource", None, routes=True)) == [
        "query",
        "route",
        "datasource-proxy",
    ]
    assert types_of(Candidate("a-b-app", "app", None, routes=True)) == ["query", "route"]


def test_the_bundled_fixtures_plugin_json_decide_without_reflection() -> None:
    go = parse_plugin_json((FIXTURE_PLUGINS / "go-datasource" / "plugin.json").read_bytes())
    py = parse_plugin_json((FIXTURE_PLUGINS / "python-datasource" / "plugin.json").read_bytes())
    assert types_of(Candidate.of(go, None)) == ["query", "route", "stream"]
    assert types_of(Candidate.of(py, None)) == ["query", "route", "stream", "datasource-proxy"]
    obj = derived_object(Candidate.of(go, None))
    # What is derived is a valid object.
    assert (
        DataPlaneService.from_object(obj).name == "v0alpha1.bridge-gofixture-datasource.grafana.app"
    )


async def states(ledger: Store) -> dict[str, str]:
    records, _ = await ledger.list()
    return {r["metadata"]["name"]: r["spec"]["state"] for r in records}


async def delete_sticks(store: Store, ledger: Store) -> None:
    plugin = Candidate("acme-x-datasource", "datasource", REFLECTED)
    assert await auto_register(store, [plugin], ledger=ledger) == [NAME]
    assert await states(ledger) == {NAME: PRESENT}
    # The ledger is not part of the DataPlaneServices.
    assert [o["metadata"]["name"] for o in (await store.list())[0]] == [NAME]

    await store.delete(NAME)
    assert await auto_register(store, [plugin], ledger=ledger) == []
    assert (await store.list())[0] == []
    assert await states(ledger) == {NAME: DECLINED}
    assert await declined(ledger) == [NAME]
    assert await auto_register(store, [plugin], ledger=ledger) == []  # and stays so

    # Re-created by hand: served again, and the user's.
    mine = derived_object(plugin)
    del mine["metadata"]["annotations"]
    mine["spec"]["services"] = [{"type": "query"}]
    await store.create(mine)
    assert await auto_register(store, [plugin], ledger=ledger) == []
    assert (await store.get(NAME))["spec"]["services"] == [{"type": "query"}]
    assert await states(ledger) == {NAME: PRESENT}

    # Handed back: the managed-by annotation without a hash; adopted and refreshed.
    current = await store.get(NAME)
    handed = copy.deepcopy(current)
    handed["metadata"]["annotations"] = {MANAGED_BY: "auto-registration"}
    await store.update(handed, expected_version=int(current["metadata"]["resourceVersion"]))
    assert await auto_register(store, [plugin], ledger=ledger) == [NAME]
    adopted = await store.get(NAME)
    assert [s["type"] for s in adopted["spec"]["services"]] == ["query", "route"]
    assert adopted["metadata"]["annotations"][SPEC_HASH]
    assert await states(ledger) == {NAME: PRESENT}
    assert await auto_register(store, [plugin], ledger=ledger) == []


async def test_a_delete_sticks_in_memory() -> None:
    store, ledger = MemoryStore(), MemoryStore()
    await delete_sticks(store, ledger)
    await store.close()
    await ledger.close()


async def test_a_delete_sticks_in_sqlite_across_reopening(tmp_path: Path) -> None:
    settings = StorageSettings(backend="sqlite", sqlite_path=tmp_path / "bridge.db")
    store = SQLiteStore(settings.sqlite_path)
    ledger = make_ledger(settings)
    assert isinstance(ledger, SQLiteStore) and ledger.path == store.path
    await delete_sticks(store, ledger)
    await store.delete(NAME)
    await store.close()
    await ledger.close()
    # A bridge started again on the same file: the record is still there.
    store = SQLiteStore(settings.sqlite_path)
    ledger = make_ledger(settings)
    plugin = Candidate("acme-x-datasource", "datasource", REFLECTED)
    assert await auto_register(store, [plugin], ledger=ledger) == []
    assert await states(ledger) == {NAME: DECLINED}
    assert (await store.list())[0] == []
    await store.close()
    await ledger.close()


async def test_a_delete_sticks_on_etcd_for_every_replica() -> None:
    prefix = f"/registry/t-{uuid.uuid4().hex[:8]}/dataplaneservices/"
    with running_etcd() as etcd:
        settings = StorageSettings(
            backend="etcd", etcd={"endpoints": [etcd.endpoint], "prefix": prefix}
        )
        store = EtcdStore.from_settings(settings.etcd)
        ledger = make_ledger(settings)
        assert isinstance(ledger, EtcdStore)
        assert ledger.prefix == f"{prefix}autoregistrations/"
        try:
            await delete_sticks(store, ledger)
            await store.delete(NAME)
            # Another replica's ledger: its own client, the same records.
            other = make_ledger(settings)
            plugin = Candidate("acme-x-datasource", "datasource", REFLECTED)
            assert await auto_register(store, [plugin], ledger=other) == []
            assert await states(other) == {NAME: DECLINED}
            await other.close()
        finally:
            await store.close()
            await ledger.close()


async def test_objects_registered_before_the_ledger_get_a_record() -> None:
    store, ledger = MemoryStore(), MemoryStore()
    plugin = Candidate("acme-x-datasource", "datasource", REFLECTED)
    # Written without a ledger (an older bridge, or one that died between the two writes).
    assert await auto_register(store, [plugin]) == [NAME]
    assert await auto_register(store, [plugin], ledger=ledger) == []
    assert await states(ledger) == {NAME: PRESENT}
    await store.delete(NAME)
    assert await auto_register(store, [plugin], ledger=ledger) == []
    assert await states(ledger) == {NAME: DECLINED}


async def test_deleting_a_users_own_object_of_that_name_sticks_too() -> None:
    store, ledger = MemoryStore(), MemoryStore()
    plugin = Candidate("acme-x-datasource", "datasource", REFLECTED)
    mine = derived_object(plugin)
    del mine["metadata"]["annotations"]
    await store.create(mine)
    assert await auto_register(store, [plugin], ledger=ledger) == []
    await store.delete(NAME)
    assert await auto_register(store, [plugin], ledger=ledger) == []
    assert (await store.list())[0] == []
    assert await states(ledger) == {NAME: DECLINED}


async def test_an_etcd_role_granting_only_the_prefix_is_enough(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With etcd RBAC on, the ledger inside the prefix works; one outside (where it used to
    be) is refused and auto-registration stops with a permission message naming the range."""
    prefix = unique_prefix()
    with running_etcd(tls=True) as etcd:
        await grant_only(etcd, prefix)
        settings = StorageSettings(backend="etcd", etcd=tls_settings(etcd, prefix))
        plugin = Candidate("acme-x-datasource", "datasource", REFLECTED)
        async with EtcdStore.from_settings(settings.etcd) as store:
            ledger = make_ledger(settings)
            try:
                assert await auto_register(store, [plugin], ledger=ledger) == [NAME]
                assert await states(ledger) == {NAME: PRESENT}
            finally:
                await ledger.close()
            outside = prefix.replace("/dataplaneservices/", "/autoregistrations/")
            async with EtcdStore.from_settings(settings.etcd, prefix=outside) as elsewhere:
                other = Candidate("acme-y-datasource", "datasource", REFLECTED)
                with caplog.at_level(logging.WARNING, logger="bridge.controllers.autoregister"):
                    assert await auto_register(store, [other], ledger=elsewhere) == []
            assert [o["metadata"]["name"] for o in (await store.list())[0]] == [NAME]
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("auto-registration stopped: etcd denies the bridge access to")
    assert outside in message and "PERMISSION_DENIED" in message


async def raw_keys(etcd: EtcdServer, prefix: str) -> list[str]:
    """Every key under ``prefix``, read straight from etcd."""
    async with raw_channel(etcd) as channel:
        request = rpc.RangeRequest(
            key=prefix.encode(), range_end=prefix[:-1].encode() + b"0", keys_only=True
        )
        response = await rpc.KVStub(channel).Range(request, timeout=5)
    return [kv.key.decode() for kv in response.kvs]


async def watched(
    session: aiohttp.ClientSession, bridge: BridgeProcess, query: str
) -> list[tuple[str, str]]:
    """The (type, name) of every event of a watch through the HTTP API ending after 1 s."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    url = f"{bridge.url}{DPS_PATH}?watch=true&timeoutSeconds=1&{query}"
    async with session.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        lines = (await response.text()).splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events]


@pytest.mark.go
@pytest.mark.slow
@pytest.mark.usefixtures("go_fixture_binary")
async def test_the_lease_and_ledger_keys_never_show_through_the_http_api(
    tmp_path: Path,
) -> None:
    """A bridge on etcd auto-registers the fixtures (ledger records) and leads (lease key),
    all under its prefix; list, watch (from the start of history too) and deletecollection
    through the HTTP API see only the DataPlaneServices, and leave the bookkeeping alone."""
    prefix = unique_prefix()
    port = free_port()
    with running_etcd() as etcd, running_bridges() as bridges:
        storage = {"backend": "etcd", "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix}}
        config = write_bridge_config(
            tmp_path, port, storage=storage, dataplane={"auto_register": "all"}
        )
        bridge = BridgeProcess(config, port=port)
        bridges.append(bridge)
        bridge.start()
        async with aiohttp.ClientSession() as session:
            await bridge.wait_ready(session)
            names = sorted(
                f"v0alpha1.{plugin}.grafana.app" for plugin in (GO_FIXTURE_ID, PY_FIXTURE_ID)
            )
            ledger_keys = [f"{prefix}autoregistrations/{name}" for name in names]
            bookkeeping = [f"{prefix}leases/{LEASE_NAME}", *ledger_keys]
            deadline = time.monotonic() + 20
            while not set(bookkeeping) <= set(await raw_keys(etcd, prefix)):
                assert time.monotonic() < deadline, (await raw_keys(etcd, prefix), bridge.log)
                await asyncio.sleep(0.1)

            code, listed = await bridge.request(session, "GET", DPS_PATH)
            assert code == 200, listed
            assert sorted(o["metadata"]["name"] for o in listed["items"]) == names
            initial = await watched(session, bridge, "")
            assert sorted(initial) == [("ADDED", name) for name in names]
            # From revision 1: every change under the prefix, the bookkeeping's included.
            history = await watched(session, bridge, "resourceVersion=1")
            assert {name for _, name in history} == set(names), history

            code, answer = await bridge.request(session, "DELETE", DPS_PATH)
            assert code == 200, answer
            code, listed = await bridge.request(session, "GET", DPS_PATH)
            assert code == 200 and listed["items"] == [], listed
            left = await raw_keys(etcd, prefix)
            assert sorted(left) == sorted(bookkeeping), left


def test_ledger_prefix_is_nested_inside_the_objects_prefix() -> None:
    default = "/registry/aggregation.grafana.app/dataplaneservices/"
    assert ledger_prefix(default) == f"{default}autoregistrations/"
    assert ledger_prefix("/bridge/objects/") == "/bridge/objects/autoregistrations/"
    assert ledger_prefix("/x/") == "/x/autoregistrations/"
    for prefix in (default, "/bridge/objects/", "/x/"):
        # Inside the prefix (one etcd role suffices), one segment deeper (never an object).
        assert ledger_prefix(prefix).startswith(prefix)
        assert ledger_prefix(prefix).removeprefix(prefix).count("/") == 1


def write_manifest(directory: Path, plugin_id: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "same.yaml"
    obj = derived_object(Candidate(plugin_id, "datasource", REFLECTED))
    path.write_text(yaml.safe_dump(obj))
    return path


def test_a_manifest_holds_its_mount_against_a_stored_object(tmp_path: Path) -> None:
    path = write_manifest(tmp_path / "manifests", "acme-x-datasource")
    manifests = load_manifests([tmp_path / "manifests"])
    assert manifests.problems == ()
    [from_file] = manifests.services
    assert isinstance(from_file, ManifestService) and from_file.source == path
    stored_obj = derived_object(Candidate("acme-other-datasource", "datasource", REFLECTED))
    stored_obj["metadata"]["name"] = from_file.name
    stored_obj["spec"]["group"] = from_file.group
    stored = DataPlaneService.from_object(stored_obj)
    for order in ([stored, from_file], [from_file, stored]):
        table = RouteTable.build(order)
        mount = table.mounts[(from_file.group, from_file.version)]
        assert mount.service.plugin_id == "acme-x-datasource"
        assert mount.origin == f"manifest {path}"
        assert table.conflicts == {from_file.name: f"manifest {path}"}
    verdict = judge(stored_obj, table=table, plugins={}, load_errors={}, healthy={})
    assert (verdict.status, verdict.reason) == ("False", "Conflict")
    assert f"is already served by manifest {path}" in verdict.message
    # Alone, a stored object's mount says so.
    assert RouteTable.build([stored]).mounts[(stored.group, stored.version)].origin == (
        f"stored object {stored.name}"
    )
