"""The availability controller against real plugin processes, seen only through the HTTP API.

One bridge runs the Python fixture under two plugin ids: a healthy one, and one that exits
before the handshake (``FIXTURE_BEHAVIOUR=exit_before_handshake``), which the restart policy
turns into a crash loop at its second failure. A third DataPlaneService names a plugin id that
no plugin directory holds. The objects are created through the DataPlaneService API; their
``Available`` condition is read back from it, and requests to their groups show what the
condition promises: 200 from the healthy one, 503 with ``Retry-After`` from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from tests.bridge.conftest import (
    VERSION,
    Answer,
    FrontDoor,
    assert_status,
    bridge_config,
    dataplane_service,
    datasource,
    eventually,
    front_door,
    python_fixture_as,
    write_datasources,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

HEALTHY = "bridge-pyok-datasource"
CRASHING = "bridge-pycrashing-datasource"
MISSING = "bridge-nowhere-datasource"  # no plugin directory holds it
GROUPS = {
    HEALTHY: "pyok.datasource.grafana.app",
    CRASHING: "pycrashing.datasource.grafana.app",
    MISSING: "nowhere.datasource.grafana.app",
}
UID = {HEALTHY: "ok", CRASHING: "crashing", MISSING: "nowhere"}

DPS = "/apis/aggregation.grafana.app/v0alpha1/dataplaneservices"
RESYNC = 1.0  # dataplane.availability_resync: the controller pings running plugins this often
CALL_TIMEOUT = 2.0
BACKOFF = 5.0  # the first restart waits this long: long enough to be seen through the API
CRASH_LOOP_WAIT = 60.0  # longer than this module runs


def name_of(plugin_id: str) -> str:
    return f"{VERSION}.{GROUPS[plugin_id]}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def door(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FrontDoor]:
    root = tmp_path_factory.mktemp("availability-live")
    plugins = root / "plugins"
    for plugin_id in (HEALTHY, CRASHING):
        python_fixture_as(plugins, plugin_id)
    write_datasources(root / "provisioning", *(datasource(p, uid) for p, uid in UID.items()))
    config = bridge_config(
        root,
        plugin_dirs=(plugins,),
        allow_unsigned=(HEALTHY, CRASHING),
        overrides={
            "plugins.call_timeout": CALL_TIMEOUT,
            "plugins.env": {CRASHING: {"FIXTURE_BEHAVIOUR": "exit_before_handshake"}},
            "plugins.restart": {
                "initial_backoff": BACKOFF,
                "multiplier": CRASH_LOOP_WAIT / BACKOFF,
                "max_backoff": CRASH_LOOP_WAIT,
                "jitter": 0,
                "crash_loop_threshold": 2,
            },
            "dataplane.availability_resync": RESYNC,
        },
    )
    async with front_door(config) as running:
        for plugin_id, group in GROUPS.items():
            created = await running.call("POST", DPS, body=dataplane_service(plugin_id, group))
            assert created.status == 201, created.text
        yield running


async def condition(door: FrontDoor, plugin_id: str) -> dict[str, Any] | None:
    """The object's Available condition as the API serves it (None before the first one)."""
    answer = await door.call("GET", f"{DPS}/{name_of(plugin_id)}", user="viewer")
    assert answer.status == 200, answer.text
    conditions = (answer.json().get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Available"), None)


async def wait_for_reason(door: FrontDoor, plugin_id: str, reason: str) -> dict[str, Any]:
    seen: list[dict[str, Any] | None] = []

    async def reached() -> bool:
        seen.append(await condition(door, plugin_id))
        return seen[-1] is not None and seen[-1]["reason"] == reason

    await eventually(reached, what=f"{name_of(plugin_id)} Available reason {reason}", timeout=30)
    found = seen[-1]
    assert found is not None
    return found


async def query(door: FrontDoor, plugin_id: str) -> Answer:
    uid = UID[plugin_id]
    body = {
        "from": "now-1h",
        "to": "now",
        "queries": [{"refId": "A", "points": 2, "datasource": {"type": plugin_id, "uid": uid}}],
    }
    path = f"/apis/{GROUPS[plugin_id]}/{VERSION}/namespaces/default/datasources/{uid}/query"
    return await door.call("POST", path, user="viewer", body=body)


def assert_refused(answer: Answer, plugin_id: str, reason: str, *, most_wait: float) -> None:
    """A 503 that names the DataPlaneService and the condition's reason, with Retry-After."""
    assert_status(answer, 503, "ServiceUnavailable", f"{name_of(plugin_id)} is not available")
    status = answer.json()
    assert f"({reason})" in status["message"], status["message"]
    assert status["details"]["name"] == name_of(plugin_id)
    assert [c["reason"] for c in status["details"]["causes"]] == [reason]
    assert 1 <= int(answer.headers["Retry-After"]) <= most_wait, answer.headers


def pid_of(door: FrontDoor, plugin_id: str) -> int:
    pid = door.bridge.host.registry.status(plugin_id).pid
    assert pid is not None
    return pid


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block; SIGCONT afterwards whatever happened (if it still runs)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# -- the three verdicts -------------------------------------------------------------------------


async def test_healthy_plugin_is_available_and_answers(door: FrontDoor) -> None:
    available = await wait_for_reason(door, HEALTHY, "Passed")
    assert (available["status"], available["message"]) == ("True", "all checks passed")
    answer = await query(door, HEALTHY)
    assert answer.status == 200, answer.text
    assert answer.json()["results"]["A"]["status"] == 200


async def test_missing_plugin_is_plugin_not_found_and_refused(door: FrontDoor) -> None:
    available = await wait_for_reason(door, MISSING, "PluginNotFound")
    assert available["status"] == "False"
    assert f"plugin {MISSING} is not loaded" in available["message"]
    answer = await query(door, MISSING)
    assert_refused(answer, MISSING, "PluginNotFound", most_wait=RESYNC)
    # The refusal gives the condition's stable words (one source of truth: the same verdict);
    # why the plugin did not load stays in the status, out of answers to any caller.
    refused = answer.json()["message"]
    assert f"plugin {MISSING} is not loaded" in refused
    assert "(no plugin with that id" in available["message"]
    assert "no plugin with that id" not in refused and "/" not in refused


async def test_crash_looping_plugin_is_refused_until_its_next_start(door: FrontDoor) -> None:
    available = await wait_for_reason(door, CRASHING, "CrashLooping")
    assert available["status"] == "False"
    assert f"plugin {CRASHING} is crash-looping" in available["message"]
    for answer in (
        await query(door, CRASHING),
        await door.call(
            "GET",
            f"/apis/{GROUPS[CRASHING]}/{VERSION}/namespaces/default/datasources/crashing/health",
            user="viewer",
        ),
    ):
        assert_refused(answer, CRASHING, "CrashLooping", most_wait=CRASH_LOOP_WAIT)
    # Every object is listed with its own verdict, as `kubectl get dataplaneservices` shows.
    listed = await door.call("GET", DPS, user="viewer")
    reasons = {
        item["metadata"]["name"]: [c["reason"] for c in item["status"]["conditions"]]
        for item in listed.json()["items"]
    }
    assert reasons[name_of(CRASHING)] == ["CrashLooping"]
    assert reasons[name_of(MISSING)] == ["PluginNotFound"]


# -- transitions -----------------------------------------------------------------------------


async def test_transition_time_moves_only_when_the_status_does(door: FrontDoor) -> None:
    """Passed → HealthCheckFailed (SIGSTOP) → PluginNotRunning (SIGKILL) → Passed.

    The middle step changes the reason but not the status, so ``lastTransitionTime`` stays.
    A hung plugin is not refused up front: its calls still go out and time out (504); one that
    dies under a call fails that call with 503.
    """
    passed = await wait_for_reason(door, HEALTHY, "Passed")
    pid = pid_of(door, HEALTHY)
    # Timestamps have one-second resolution: make the first transition land in a later second.
    await asyncio.sleep(max(0.0, 1.05 - (time.time() % 1)))
    with stopped(pid):
        unhealthy = await wait_for_reason(door, HEALTHY, "HealthCheckFailed")
        assert unhealthy["status"] == "False"
        assert unhealthy["lastTransitionTime"] > passed["lastTransitionTime"]
        started = time.monotonic()
        answer = await query(door, HEALTHY)
        assert_status(answer, 504, "Timeout", "no answer before the deadline")
        assert time.monotonic() - started >= CALL_TIMEOUT

        # A plugin that dies under a call: that call is a 503 too (it may succeed once the
        # plugin is back), not a 502 (which is for a plugin that answered something).
        in_flight = asyncio.create_task(query(door, HEALTHY))
        await asyncio.sleep(0.5)
        assert not in_flight.done()
        os.kill(pid, signal.SIGKILL)
        died = await in_flight
        assert_status(died, 503, "ServiceUnavailable", f"plugin {HEALTHY}: QueryData: ")
        assert int(died.headers["Retry-After"]) >= 1
        assert "/" not in died.json()["message"]  # no socket path, no gRPC internals
        not_running = await wait_for_reason(door, HEALTHY, "PluginNotRunning")
    assert not_running["status"] == "False"
    assert not_running["lastTransitionTime"] == unhealthy["lastTransitionTime"]
    assert_refused(await query(door, HEALTHY), HEALTHY, "PluginNotRunning", most_wait=BACKOFF)

    back = await wait_for_reason(door, HEALTHY, "Passed")
    assert back["status"] == "True"
    assert back["lastTransitionTime"] > not_running["lastTransitionTime"]
    answer = await query(door, HEALTHY)
    assert answer.status == 200, answer.text
    assert pid_of(door, HEALTHY) != pid


async def test_conditions_are_written_only_on_change(door: FrontDoor) -> None:
    """Several resyncs later, nothing was rewritten: the objects' resourceVersions stand."""
    await wait_for_reason(door, HEALTHY, "Passed")
    await wait_for_reason(door, CRASHING, "CrashLooping")

    async def versions() -> dict[str, str]:
        listed = await door.call("GET", DPS, user="viewer")
        items = listed.json()["items"]
        return {i["metadata"]["name"]: i["metadata"]["resourceVersion"] for i in items}

    before = await versions()
    assert sorted(before) == sorted(name_of(p) for p in GROUPS)
    await asyncio.sleep(RESYNC * 3.5)
    assert await versions() == before
