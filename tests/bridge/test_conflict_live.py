"""A manifest file and a stored object claiming one group/version, on a real bridge.

The manifest, a file the operator configured, holds the mount: requests go to its plugin,
and the stored object's status says Available=False/Conflict and names the manifest's file.
Once the file is gone, the stored object takes the mount over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.bridge.bridge_process import (
    DPS_PATH,
    BridgeProcess,
    free_port,
    running_bridges,
    write_bridge_config,
)
from tests.bridge.conftest import dataplane_service
from tests.helpers import GO_FIXTURE_ID, PY_FIXTURE_ID

pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.usefixtures("go_fixture_binary")]

GROUP = "conflict.grafana.app"
NAME = f"v0alpha1.{GROUP}"
QUERY_ONLY = ({"type": "query"},)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def query(
    bridge: BridgeProcess, session: aiohttp.ClientSession, uid: str, *, group: str = GROUP
) -> tuple[int, Any]:
    body = {"from": "now-1h", "to": "now", "queries": [{"refId": "A", "datasource": {"uid": uid}}]}
    path = f"/apis/{group}/v0alpha1/namespaces/default/datasources/{uid}/query"
    return await bridge.request(session, "POST", path, json=body)


async def condition(
    bridge: BridgeProcess,
    session: aiohttp.ClientSession,
    status: str,
    reason: str,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """The stored object's Available condition, once it has ``status`` and ``reason``."""
    deadline = time.monotonic() + timeout
    obj: Any = None
    while time.monotonic() < deadline:
        code, obj = await bridge.request(session, "GET", f"{DPS_PATH}/{NAME}")
        assert code == 200, obj
        for found in obj.get("status", {}).get("conditions") or []:
            if found["type"] == "Available" and (found["status"], found["reason"]) == (
                status,
                reason,
            ):
                return dict(found)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{NAME} never became {status}/{reason}: {obj}\n{bridge.log}")


@asynccontextmanager
async def bridge_with_manifest(
    tmp_path: Path, session: aiohttp.ClientSession, plugin_id: str
) -> AsyncIterator[tuple[BridgeProcess, Path]]:
    """A real bridge on SQLite whose manifest directory mounts GROUP for ``plugin_id``."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    manifest = manifests / "conflict.yaml"
    manifest.write_text(yaml.safe_dump(dataplane_service(plugin_id, GROUP, services=QUERY_ONLY)))
    port = free_port()
    config = write_bridge_config(
        tmp_path,
        port,
        storage={"backend": "sqlite", "sqlite_path": str(tmp_path / "bridge.db")},
        dataplane={"manifests": [str(manifests)], "reload_interval": 0.5},
    )
    with running_bridges() as bridges:
        bridge = BridgeProcess(config, port=port)
        bridges.append(bridge)
        bridge.start()
        await bridge.wait_ready(session)
        yield bridge, manifest


async def test_the_manifest_holds_the_mount_and_the_stored_object_names_it(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with bridge_with_manifest(tmp_path, session, PY_FIXTURE_ID) as (bridge, manifest):
        # Served by the manifest's plugin (the Python fixture) before and after the create.
        code, answer = await query(bridge, session, "pyfixture")
        assert code == 200, answer
        stored = dataplane_service(GO_FIXTURE_ID, GROUP, services=QUERY_ONLY)
        code, answer = await bridge.request(session, "POST", DPS_PATH, json=stored)
        assert code == 201, answer

        found = await condition(bridge, session, "False", "Conflict")
        assert found["message"] == (
            f"{GROUP}/v0alpha1 is already served by manifest {manifest}; "
            "manifests take precedence over stored objects"
        )
        code, answer = await query(bridge, session, "pyfixture")
        assert code == 200, answer
        # The Go fixture's data source is not the mounted plugin's.
        code, answer = await query(bridge, session, "gofixture")
        assert code == 404, answer
        assert f"not '{PY_FIXTURE_ID}'" in answer["message"], answer
        assert f"not served: manifest {manifest} already claims" in bridge.log

        # The file is removed: the stored object takes the mount over.
        manifest.unlink()
        await condition(bridge, session, "True", "Passed")
        code, answer = await query(bridge, session, "gofixture")
        assert code == 200, answer
        code, answer = await query(bridge, session, "pyfixture")
        assert code == 404, answer

        # The name encodes group and version: an update cannot move the object (422); a
        # delete and a create move the mount.
        code, current = await bridge.request(session, "GET", f"{DPS_PATH}/{NAME}")
        current["spec"]["group"] = "moved.grafana.app"
        code, answer = await bridge.request(session, "PUT", f"{DPS_PATH}/{NAME}", json=current)
        assert code == 422, answer
        assert "metadata.name" in answer["message"], answer
        code, answer = await bridge.request(session, "DELETE", f"{DPS_PATH}/{NAME}")
        assert code == 200, answer
        moved = dataplane_service(GO_FIXTURE_ID, "moved.grafana.app", services=QUERY_ONLY)
        code, answer = await bridge.request(session, "POST", DPS_PATH, json=moved)
        assert code == 201, answer
        deadline = time.monotonic() + 5
        while True:  # the registration controller picks the create up from its watch
            code, answer = await query(bridge, session, "gofixture", group="moved.grafana.app")
            if code == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert code == 200, answer


async def test_a_manifest_whose_plugin_is_missing_is_refused_with_503_despite_its_twin(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The mount's holder is judged on its own plugin, not as the loser of the conflict."""
    missing = "missing-conflict-datasource"
    async with bridge_with_manifest(tmp_path, session, missing) as (bridge, _):
        stored = dataplane_service(GO_FIXTURE_ID, GROUP, services=QUERY_ONLY)
        code, answer = await bridge.request(session, "POST", DPS_PATH, json=stored)
        assert code == 201, answer
        await condition(bridge, session, "False", "Conflict")
        code, answer = await query(bridge, session, "gofixture")
        assert code == 503, answer
        assert answer["reason"] == "ServiceUnavailable", answer
        assert "(PluginNotFound)" in answer["message"], answer
        assert f"plugin {missing} is not loaded" in answer["message"], answer
