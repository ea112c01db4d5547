"""stop(), start() and restarts racing each other, and what callers holding a client see."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from plugin_host.client import BackendClient
from plugin_host.errors import PluginUnavailable
from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginState, PluginTarget
from protos.pluginv2 import backend_pb2 as pb
from tests.helpers import PY_FIXTURE, PY_FIXTURE_ID, plugin_env, zombies
from tests.plugin_host.supervision import OPTIONS, health_request, wait_for


@pytest.fixture
async def registry(short_tmp: Path) -> AsyncIterator[PluginRegistry]:
    (short_tmp / "sockets").mkdir()
    reg = PluginRegistry(options=OPTIONS, socket_root=short_tmp / "sockets")
    try:
        yield reg
    finally:
        await reg.stop()
        assert zombies() == []
        assert list((short_tmp / "sockets").iterdir()) == []


def live_plugins() -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


async def test_stop_while_starting_never_shows_running(
    registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plugin answers the first health check, but the host is slow to carry on (a busy
    # loop): stop() comes in between.
    real_ping = BackendClient.ping

    async def slow_ping(self: BackendClient, *, timeout: float = 5.0) -> bool:
        answer = await real_ping(self, timeout=timeout)
        await asyncio.sleep(0.5)
        return answer

    monkeypatch.setattr(BackendClient, "ping", slow_ping)
    supervisor = registry.add(
        PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env()),
        options=dataclasses.replace(OPTIONS, health_interval=100.0),
    )
    states: list[str] = []
    supervisor.add_listener(
        lambda s: states.append(s.state) if not states or states[-1] != s.state else None
    )
    await registry.start()
    await wait_for(registry, PY_FIXTURE_ID, lambda s: s.pid is not None)
    stopping = asyncio.create_task(registry.stop())
    handed_out = []
    while not stopping.done():
        with contextlib.suppress(PluginUnavailable):
            handed_out.append(supervisor.client())
        await asyncio.sleep(0.01)
    await stopping
    assert states == ["starting", "stopping", "stopped"]
    assert handed_out == []


async def test_cancelled_stop_still_kills_the_plugin_at_once(registry: PluginRegistry) -> None:
    supervisor = registry.add(
        PluginTarget(
            plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env("ignore_shutdown")
        ),
        options=dataclasses.replace(OPTIONS, stop_grace=5.0),
    )
    [status] = await registry.start(wait=30)
    assert status.pid is not None
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(supervisor.stop(), 0.5)  # e.g. a shutdown deadline ran out
    # The plugin ignores Shutdown and its grace is 5 s, but it is killed when stop() gives up.
    for _ in range(30):
        if not psutil.pid_exists(status.pid):
            break
        await asyncio.sleep(0.05)
    assert not psutil.pid_exists(status.pid)
    await supervisor.stop()  # waits for the rest of the clean-up
    assert supervisor.status.state is PluginState.STOPPED
    assert time.monotonic() - began < 3.0
    assert live_plugins() == []


async def test_start_during_stop_leaves_one_plugin_running(registry: PluginRegistry) -> None:
    supervisor = registry.add(
        PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env())
    )
    [first] = await registry.start(wait=30)
    stopping = asyncio.create_task(supervisor.stop())
    await asyncio.sleep(0)
    await supervisor.start()
    await stopping
    up = await wait_for(
        registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.RUNNING and s.pid != first.pid
    )
    await asyncio.sleep(0.5)  # a second supervision loop would have started its plugin by now
    assert [p.pid for p in live_plugins()] == [up.pid]
    assert registry.status(PY_FIXTURE_ID).pid == up.pid


async def test_plugins_never_share_a_private_directory(registry: PluginRegistry) -> None:
    # Ids that agree on their first 24 characters.
    first, second = "acme-timeseries-datasource", "acme-timeseries-datasource-v2"
    for plugin_id in (first, second):
        registry.add(PluginTarget(plugin_id=plugin_id, executable=PY_FIXTURE, env=plugin_env()))
    statuses = await registry.start(wait=30)
    assert all(s.state is PluginState.RUNNING for s in statuses)
    a, b = (Path(s.address or "") for s in statuses)
    assert a.parent != b.parent
    await registry.remove(first)
    assert b.is_socket()
    response = await registry.client(second).check_health(
        pb.CheckHealthRequest(pluginContext=pb.PluginContext(orgId=1, pluginId=second))
    )
    assert response.status == pb.CheckHealthResponse.OK


async def test_callers_holding_a_client_get_plugin_errors_across_a_restart(
    registry: PluginRegistry,
) -> None:
    supervisor = registry.add(
        PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env())
    )
    await registry.start(wait=30)
    stale = registry.client(PY_FIXTURE_ID)

    async def slow_resource_call() -> list[pb.CallResourceResponse]:
        request = pb.CallResourceRequest(
            pluginContext=health_request().pluginContext,
            method="GET",
            path="sleep",
            url="sleep?ms=5000",
        )
        return [m async for m in stale.call_resource(request, timeout=10)]

    in_flight = asyncio.create_task(slow_resource_call())
    await asyncio.sleep(0.3)
    supervisor.restart_now("restarted by the test")
    with pytest.raises(PluginUnavailable):
        await in_flight
    await wait_for(
        registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.RUNNING and s.restarts == 1
    )
    # A client of the previous run says so, instead of grpc's "Channel is closed".
    with pytest.raises(PluginUnavailable, match="restarted since this client was obtained"):
        await stale.check_health(health_request())
    fresh = registry.client(PY_FIXTURE_ID)
    assert (await fresh.check_health(health_request())).status == pb.CheckHealthResponse.OK
