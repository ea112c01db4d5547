"""Auto-registration on a real ``grafana-bridge serve`` with the two bundled fixture plugins.

At start-up each fixture gets a DataPlaneService (the Python fixture's services from gRPC
reflection, the Go fixture's from its plugin.json), which becomes Available and routes
queries. A user's edit is not overwritten and a user's delete is not undone by a restart,
both kept in the SQLite file the bridge uses.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.controllers.autoregister import MANAGED_BY, SPEC_HASH
from tests.bridge.bridge_process import (
    DPS_PATH,
    BridgeProcess,
    free_port,
    running_bridges,
    write_bridge_config,
)
from tests.helpers import GO_FIXTURE_ID, PY_FIXTURE_ID

pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.usefixtures("go_fixture_binary")]

PY_GROUP = f"{PY_FIXTURE_ID}.grafana.app"
GO_GROUP = f"{GO_FIXTURE_ID}.grafana.app"
PY_NAME = f"v0alpha1.{PY_GROUP}"
GO_NAME = f"v0alpha1.{GO_GROUP}"
# The Python fixture answers gRPC reflection with every pluginv2 service; its plugin.json has
# data source proxy routes. The Go fixture has no reflection: its plugin.json says
# backend and streaming.
PY_SERVICES = ["query", "route", "stream", "admission", "conversion", "datasource-proxy"]
GO_SERVICES = ["query", "route", "stream"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def query_path(group: str, uid: str) -> str:
    return f"/apis/{group}/v0alpha1/namespaces/default/datasources/{uid}/query"


async def query(
    bridge: BridgeProcess, session: aiohttp.ClientSession, group: str, uid: str
) -> tuple[int, Any]:
    """A query through ``group``'s mount for the provisioned data source ``uid``."""
    body = {
        "from": "now-1h",
        "to": "now",
        "queries": [{"refId": "A", "datasource": {"uid": uid}, "maxDataPoints": 5}],
    }
    return await bridge.request(session, "POST", query_path(group, uid), json=body)


def services_of(obj: dict[str, Any]) -> list[str]:
    return [s["type"] for s in obj["spec"]["services"]]


def available(obj: dict[str, Any]) -> tuple[str, str] | None:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Available":
            return condition.get("status"), condition.get("reason")
    return None


async def wait_available(
    bridge: BridgeProcess, session: aiohttp.ClientSession, name: str, timeout: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: Any = None
    while time.monotonic() < deadline:
        code, obj = await bridge.request(session, "GET", f"{DPS_PATH}/{name}")
        if code == 200 and available(obj) == ("True", "Passed"):
            return dict(obj)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{name} never became Available: {obj}\n{bridge.log}")


async def restart(bridge: BridgeProcess, session: aiohttp.ClientSession) -> None:
    bridge.stop()
    bridge.start()
    await bridge.wait_ready(session)


async def test_fixtures_are_registered_and_users_edits_and_deletes_survive_restarts(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    config = write_bridge_config(
        tmp_path,
        port,
        storage={"backend": "sqlite", "sqlite_path": str(tmp_path / "bridge.db")},
        dataplane={"auto_register": "all"},
    )
    with running_bridges() as bridges:
        bridge = BridgeProcess(config, port=port)
        bridges.append(bridge)
        bridge.start()
        await bridge.wait_ready(session)

        code, listed = await bridge.request(session, "GET", DPS_PATH)
        assert code == 200, listed
        assert sorted(o["metadata"]["name"] for o in listed["items"]) == [GO_NAME, PY_NAME]
        py = await wait_available(bridge, session, PY_NAME)
        go = await wait_available(bridge, session, GO_NAME)
        assert services_of(py) == PY_SERVICES
        assert services_of(go) == GO_SERVICES
        for obj, plugin_id in ((py, PY_FIXTURE_ID), (go, GO_FIXTURE_ID)):
            assert obj["spec"]["pluginID"] == plugin_id
            assert obj["metadata"]["annotations"][MANAGED_BY] == "auto-registration"
        for group, uid in ((PY_GROUP, "pyfixture"), (GO_GROUP, "gofixture")):
            code, answer = await query(bridge, session, group, uid)
            assert code == 200, answer
            assert "A" in answer["results"] and not answer["results"]["A"].get("error"), answer

        # A user narrows the Go fixture's object and deletes the Python fixture's.
        edited = copy.deepcopy(go)
        edited["spec"]["services"] = [{"type": "query"}]
        code, answer = await bridge.request(session, "PUT", f"{DPS_PATH}/{GO_NAME}", json=edited)
        assert code == 200, answer
        code, answer = await bridge.request(session, "DELETE", f"{DPS_PATH}/{PY_NAME}")
        assert code == 200, answer

        await restart(bridge, session)
        code, kept = await bridge.request(session, "GET", f"{DPS_PATH}/{GO_NAME}")
        assert code == 200, kept
        assert services_of(kept) == ["query"]
        assert (
            kept["metadata"]["annotations"][SPEC_HASH] == go["metadata"]["annotations"][SPEC_HASH]
        )
        code, answer = await bridge.request(session, "GET", f"{DPS_PATH}/{PY_NAME}")
        assert code == 404, answer
        assert f"not registering DataPlaneService {PY_NAME}" in bridge.log
        code, answer = await query(bridge, session, GO_GROUP, "gofixture")
        assert code == 200, answer
        code, listed = await bridge.request(session, "GET", DPS_PATH)
        assert [o["metadata"]["name"] for o in listed["items"]] == [GO_NAME]

        # Still deleted after one more restart; re-created by hand, it is served again.
        await restart(bridge, session)
        code, answer = await bridge.request(session, "GET", f"{DPS_PATH}/{PY_NAME}")
        assert code == 404, answer
        mine = {
            "apiVersion": py["apiVersion"],
            "kind": py["kind"],
            "metadata": {"name": PY_NAME},
            "spec": {**py["spec"], "services": [{"type": "query"}]},
        }
        code, answer = await bridge.request(session, "POST", DPS_PATH, json=mine)
        assert code == 201, answer
        await wait_available(bridge, session, PY_NAME)
        code, answer = await query(bridge, session, PY_GROUP, "pyfixture")
        assert code == 200, answer
