"""The host against a plugin built with the real hashicorp/go-plugin library."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from plugin_host.client import BackendClient, open_channel
from plugin_host.errors import PluginExitedBeforeHandshake
from plugin_host.handshake import Network
from plugin_host.process import PluginProcess
from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginState, PluginTarget, SupervisorOptions
from protos.pluginv2 import backend_pb2 as pb
from tests.helpers import GO_FIXTURE_ID, open_fds, plugin_env, zombies

pytestmark = pytest.mark.go


def context() -> pb.PluginContext:
    return pb.PluginContext(
        orgId=1,
        pluginId=GO_FIXTURE_ID,
        dataSourceInstanceSettings=pb.DataSourceInstanceSettings(id=1, uid="go", name="go"),
    )


@pytest.fixture
async def registry(short_tmp: Path, go_fixture_binary: Path) -> AsyncIterator[PluginRegistry]:
    reg = PluginRegistry(options=SupervisorOptions(start_timeout=20.0), socket_root=short_tmp)
    reg.add(PluginTarget(plugin_id=GO_FIXTURE_ID, executable=go_fixture_binary, env=plugin_env()))
    try:
        yield reg
    finally:
        await reg.stop()


async def test_go_plugin_serves_through_the_host(registry: PluginRegistry) -> None:
    [status] = await registry.start(wait=30)
    assert status.state is PluginState.RUNNING, status.last_error
    client = registry.client(GO_FIXTURE_ID)

    health = await client.check_health(pb.CheckHealthRequest(pluginContext=context()))
    assert health.status == pb.CheckHealthResponse.OK
    assert health.message == "go fixture is healthy"

    query = pb.DataQuery(
        refId="A",
        maxDataPoints=7,
        intervalMS=1000,
        timeRange=pb.TimeRange(fromEpochMS=0, toEpochMS=60_000),
        json=b"{}",
    )
    answer = await client.query_data(
        pb.QueryDataRequest(pluginContext=context(), queries=[query], format=pb.JSON)
    )
    result = answer.responses["A"]
    assert result.format == pb.JSON
    frame = json.loads(result.frames[0])
    assert [f["name"] for f in frame["schema"]["fields"]] == ["time", "value"]
    assert len(frame["data"]["values"][0]) == 7

    chunks = [
        c
        async for c in client.call_resource(
            pb.CallResourceRequest(
                pluginContext=context(), path="stream", method="GET", url="stream"
            )
        )
    ]
    assert len(chunks) == 4
    assert chunks[0].code == 200 and all(c.code == 0 for c in chunks[1:])

    metrics = await client.collect_metrics(pb.CollectMetricsRequest(pluginContext=context()))
    assert b"# TYPE" in metrics.metrics.prometheus


async def test_go_plugin_shutdown_exits_zero_and_removes_socket(
    short_tmp: Path, go_fixture_binary: Path
) -> None:
    process = await PluginProcess.start(
        plugin_id=GO_FIXTURE_ID,
        executable=go_fixture_binary,
        env=plugin_env(),
        workdir=short_tmp / "w",
    )
    assert process.handshake.network is Network.UNIX
    socket = Path(process.handshake.address)
    assert socket.is_socket()
    client = BackendClient(GO_FIXTURE_ID, open_channel(process.handshake.grpc_target))
    # go-plugin 1.0.1 answers Shutdown with UNAVAILABLE; the host treats the exit as success.
    assert await process.stop(grace=5.0, request_shutdown=client.shutdown) == 0
    await client.close()
    assert not socket.exists()


async def test_go_plugin_without_magic_cookie_explains_itself(
    short_tmp: Path, go_fixture_binary: Path
) -> None:
    env = plugin_env()
    env["grafana_plugin_type"] = "wrong"
    # The cookie is part of the host's environment contract; bypass it to see the plugin refuse.
    with pytest.raises(PluginExitedBeforeHandshake) as info:
        await PluginProcess.start(
            plugin_id=GO_FIXTURE_ID,
            executable=Path("/usr/bin/env"),
            args=("grafana_plugin_type=wrong", str(go_fixture_binary)),
            env=env,
            workdir=short_tmp / "w",
        )
    assert info.value.exit_code == 1
    assert "This binary is a plugin" in info.value.stderr_tail


async def test_hundred_start_stop_cycles_leak_nothing(
    short_tmp: Path, go_fixture_binary: Path
) -> None:
    env = plugin_env()
    baseline_fds = open_fds()
    for i in range(100):
        process = await PluginProcess.start(
            plugin_id=GO_FIXTURE_ID,
            executable=go_fixture_binary,
            env=env,
            workdir=short_tmp / f"c{i}",
        )
        client = BackendClient(GO_FIXTURE_ID, open_channel(process.handshake.grpc_target))
        assert await client.ping()
        assert await process.stop(grace=5.0, request_shutdown=client.shutdown) == 0
        await client.close()
    assert list(short_tmp.iterdir()) == []
    assert zombies() == []
    assert [c for c in psutil.Process().children(recursive=True) if c.is_running()] == []
    # grpc keeps a few fds of its own (epoll, wakeup pipes); allow a small constant, not growth.
    assert open_fds() <= baseline_fds + 8


async def test_a_hung_go_plugin_is_asked_for_its_goroutines_before_sigkill(
    short_tmp: Path, go_fixture_binary: Path, caplog: pytest.LogCaptureFixture
) -> None:
    process = await PluginProcess.start(
        plugin_id=GO_FIXTURE_ID,
        executable=go_fixture_binary,
        env=plugin_env(),
        workdir=short_tmp / "w",
    )
    await process.quit_then_kill("failed 3 health checks in a row", wait=5.0)
    # The Go runtime answers SIGQUIT with a stack dump and exit status 2, before any SIGKILL.
    assert await process.wait() == 2
    assert process.kill_reason == "failed 3 health checks in a row"
    await process.stop(grace=0.0)
    # The dump is in the plugin's log, at ERROR (the tail only keeps its last lines).
    dump = [r for r in caplog.records if r.name == f"plugin.{GO_FIXTURE_ID}"]
    assert any(r.levelno == logging.ERROR and r.getMessage() == "SIGQUIT: quit" for r in dump)
    assert any(r.getMessage().startswith("goroutine 1 [") for r in dump)
