"""Supervision of real plugin processes: restarts, crash loops, hung plugins, memory, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from plugin_host.errors import PluginError, PluginNotFound, PluginUnavailable
from plugin_host.process import PluginProcess
from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginState, PluginTarget
from protos.pluginv2 import backend_pb2 as pb
from tests.helpers import PY_FIXTURE, PY_FIXTURE_ID, plugin_env, zombies
from tests.plugin_host.supervision import OPTIONS, health_request, wait_for


@pytest.fixture
async def registry(short_tmp: Path) -> AsyncIterator[PluginRegistry]:
    reg = PluginRegistry(options=OPTIONS, socket_root=short_tmp / "sockets")
    (short_tmp / "sockets").mkdir()
    try:
        yield reg
    finally:
        await reg.stop()
        assert zombies() == []
        assert list((short_tmp / "sockets").iterdir()) == []


async def test_start_call_and_stop(registry: PluginRegistry) -> None:
    registry.add(PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env()))
    [status] = await registry.start(wait=30)
    assert status.state is PluginState.RUNNING
    assert status.pid is not None and psutil.pid_exists(status.pid)
    assert (
        status.services is not None and {"pluginv2.Data", "pluginv2.Diagnostics"} <= status.services
    )
    response = await registry.client(PY_FIXTURE_ID).check_health(health_request())
    assert response.status == pb.CheckHealthResponse.OK
    stats = (await wait_for(registry, PY_FIXTURE_ID, lambda s: s.stats is not None)).stats
    assert (
        stats is not None
        and stats.rss_bytes > 1_000_000
        and stats.threads >= 1
        and stats.open_fds > 2
    )
    pid = status.pid
    await registry.stop()
    assert registry.status(PY_FIXTURE_ID).state is PluginState.STOPPED
    assert not psutil.pid_exists(pid)


async def test_unknown_plugin_and_not_started(registry: PluginRegistry) -> None:
    with pytest.raises(PluginNotFound):
        registry.client("nope")
    registry.add(PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env()))
    with pytest.raises(PluginUnavailable, match="not running"):
        registry.client(PY_FIXTURE_ID)


async def test_crash_restarts_and_recovers(
    registry: PluginRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    registry.add(
        PluginTarget(
            plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env("crash_after=1")
        )
    )
    await registry.start(wait=30)
    first_pid = registry.status(PY_FIXTURE_ID).pid
    await registry.client(PY_FIXTURE_ID).check_health(health_request())
    with pytest.raises(PluginError):  # the second call makes the plugin exit with status 3
        await registry.client(PY_FIXTURE_ID).check_health(health_request())
    down = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.state is not PluginState.RUNNING)
    assert down.last_exit_code in (3, None)
    # Nothing of the dead run is left in the status.
    assert (down.pid, down.address, down.services, down.started_at) == (None, None, None, None)
    # While down, calls fail at once instead of hanging.
    began = time.monotonic()
    with pytest.raises(PluginUnavailable):
        await registry.client(PY_FIXTURE_ID).check_health(health_request())
    assert time.monotonic() - began < 0.5
    up = await wait_for(
        registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.RUNNING and s.pid != first_pid
    )
    assert up.restarts == 1
    assert up.last_exit_code == 3
    assert first_pid is not None and not psutil.pid_exists(first_pid)
    response = await registry.client(PY_FIXTURE_ID).check_health(health_request())
    assert response.status == pb.CheckHealthResponse.OK
    # Releasing a process that already died is quiet: no shutdown was asked for.
    assert not [r for r in caplog.records if "did not exit within" in r.getMessage()]


async def test_crash_loop_is_visible_and_recovers(
    registry: PluginRegistry, short_tmp: Path
) -> None:
    # A launcher that fails until a flag file appears, then becomes the real plugin.
    flag = short_tmp / "healthy"
    launcher = short_tmp / "launcher"
    launcher.write_text(
        f"#!/bin/sh\nif [ -f {flag} ]; then exec {PY_FIXTURE}; fi\necho 'panic: not yet' >&2\nexit 7\n"
    )
    launcher.chmod(0o755)
    registry.add(PluginTarget(plugin_id=PY_FIXTURE_ID, executable=launcher, env=plugin_env()))
    await registry.start()
    looping = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.CRASH_LOOP)
    assert looping.consecutive_failures >= 3
    assert looping.last_exit_code == 7
    assert looping.last_error == "process exited with status 7 before the handshake"
    assert looping.last_output is not None and "panic: not yet" in looping.last_output
    with pytest.raises(PluginUnavailable, match="crash-looping") as info:
        registry.client(PY_FIXTURE_ID)
    assert info.value.retry_after is not None and info.value.retry_after >= 1.0
    flag.touch()
    recovered = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.RUNNING)
    assert recovered.last_error is None
    assert recovered.restarts >= 3


async def test_hung_plugin_is_restarted(registry: PluginRegistry) -> None:
    registry.add(PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env()))
    [status] = await registry.start(wait=30)
    assert status.pid is not None
    os.kill(status.pid, signal.SIGSTOP)
    up = await wait_for(
        registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.RUNNING and s.pid != status.pid
    )
    assert up.restarts == 1
    assert not psutil.pid_exists(status.pid)
    assert (
        await registry.client(PY_FIXTURE_ID).check_health(health_request())
    ).status == pb.CheckHealthResponse.OK


async def test_memory_ceiling_restarts_the_plugin(
    registry: PluginRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    options = dataclasses.replace(OPTIONS, memory_limit_bytes=150 * 2**20, stats_interval=0.1)
    registry.add(
        PluginTarget(
            plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env("memory_hog=300")
        ),
        options=options,
    )
    await registry.start()
    failed = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.restarts >= 1)
    assert failed.last_error is not None and "over its limit of 150 MiB" in failed.last_error


async def test_stop_during_start_leaves_nothing(registry: PluginRegistry) -> None:
    registry.add(
        PluginTarget(
            plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env("never_handshake")
        )
    )
    await registry.start()
    await wait_for(registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.STARTING)
    await asyncio.sleep(0.5)
    await registry.stop()
    assert registry.status(PY_FIXTURE_ID).state is PluginState.STOPPED
    assert [c for c in psutil.Process().children(recursive=True) if c.is_running()] == []


async def test_attach_to_a_running_plugin(registry: PluginRegistry, short_tmp: Path) -> None:
    # Someone else runs the plugin (Grafana's standalone mode); the host only connects.
    external = await PluginProcess.start(
        plugin_id=PY_FIXTURE_ID,
        executable=PY_FIXTURE,
        env=plugin_env("tcp"),
        workdir=short_tmp / "ext",
    )
    try:
        registry.add(
            PluginTarget(plugin_id=PY_FIXTURE_ID, attach_address=external.handshake.address)
        )
        [status] = await registry.start(wait=10)
        assert status.state is PluginState.RUNNING and status.attached and status.pid is None
        response = await registry.client(PY_FIXTURE_ID).check_health(health_request())
        assert response.status == pb.CheckHealthResponse.OK
        await registry.stop()
        # Stopping the host does not stop a plugin it did not start.
        assert external.returncode is None
    finally:
        await external.stop(grace=0.5)


async def test_attach_to_nothing_backs_off(registry: PluginRegistry) -> None:
    registry.add(PluginTarget(plugin_id="ghost", attach_address="127.0.0.1:1"))
    await registry.start()
    status = await wait_for(registry, "ghost", lambda s: s.state is PluginState.BACKING_OFF)
    assert (
        status.last_error is not None and "cannot reach plugin at 127.0.0.1:1" in status.last_error
    )


async def test_parallel_stop_of_many_plugins(short_tmp: Path) -> None:
    (short_tmp / "s").mkdir()
    registry = PluginRegistry(options=OPTIONS, socket_root=short_tmp / "s")
    for i in range(4):
        registry.add(
            PluginTarget(
                plugin_id=f"p{i}", executable=PY_FIXTURE, env=plugin_env("ignore_shutdown")
            )
        )
    statuses = await registry.start(wait=60)
    assert all(s.state is PluginState.RUNNING for s in statuses)
    began = time.monotonic()
    await registry.stop()
    # Four plugins that each need the full grace period stop together, not one after another.
    assert time.monotonic() - began < OPTIONS.stop_grace * 2
    assert all(not psutil.pid_exists(s.pid) for s in statuses if s.pid)
