"""How the supervisor counts, explains and survives failures of real plugin processes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from plugin_host.client import BackendClient
from plugin_host.errors import PluginError, PluginUnavailable
from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginState, PluginTarget, RestartPolicy
from tests.helpers import PY_FIXTURE, PY_FIXTURE_ID, plugin_env, zombies
from tests.plugin_host.supervision import (
    FAST_RESTARTS,
    OPTIONS,
    health_request,
    mini_plugin,
    shell_plugin,
    wait_for,
)

SECRET = "hunter2-do-not-show"


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


def test_backoff_never_overflows() -> None:
    policy = RestartPolicy(initial_backoff=1.0, max_backoff=300.0, multiplier=2.0, jitter=0.0)
    assert policy.delay(1) == 1.0
    assert policy.delay(1025) == 300.0  # 2.0 ** 1024 overflows a float
    assert RestartPolicy(multiplier=1e200, jitter=0.0).delay(3) == 300.0
    assert RestartPolicy(initial_backoff=0.0, multiplier=1e200).delay(9) == 0.0


async def test_backoff_overflow_does_not_end_supervision(registry: PluginRegistry) -> None:
    fast = RestartPolicy(initial_backoff=0.01, max_backoff=0.01, multiplier=1e200, jitter=0.0)
    registry.add(
        PluginTarget(plugin_id="x-datasource", executable=Path("/bin/false")),
        options=dataclasses.replace(OPTIONS, restart=fast),
    )
    await registry.start()
    looping = await wait_for(registry, "x-datasource", lambda s: s.consecutive_failures >= 6)
    assert looping.state in (PluginState.CRASH_LOOP, PluginState.STARTING)
    await registry.stop()
    assert registry.status("x-datasource").state is PluginState.STOPPED


async def test_invalid_environment_is_a_failed_start(
    registry: PluginRegistry, short_tmp: Path
) -> None:
    registry.add(PluginTarget(plugin_id="y-datasource", executable=PY_FIXTURE, env={"A=B": "1"}))
    [status] = await registry.start(wait=10)
    assert status.state is PluginState.BACKING_OFF
    assert status.last_error is not None and "invalid environment" in status.last_error
    assert list((short_tmp / "sockets").iterdir()) == []  # no private directory leaked
    await registry.stop()
    assert registry.status("y-datasource").state is PluginState.STOPPED


async def test_unexpected_error_is_a_failure_and_supervision_goes_on(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The socket root is a file: making a private directory in it fails every time.
    (short_tmp / "not-a-dir").write_text("")
    registry = PluginRegistry(options=OPTIONS, socket_root=short_tmp / "not-a-dir")
    registry.add(PluginTarget(plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env()))
    try:
        await registry.start()
        looping = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.consecutive_failures >= 3)
        assert looping.state is PluginState.CRASH_LOOP
        assert looping.last_error is not None
        assert looping.last_error.startswith("internal error in the plugin host: FileExistsError")
    finally:
        await registry.stop()
    assert registry.status(PY_FIXTURE_ID).state is PluginState.STOPPED
    # Logged with its traceback once, not at every retry.
    assert len([r for r in caplog.records if r.exc_info and "unexpected error" in r.msg]) == 1


async def test_a_start_that_never_succeeds_reaches_crash_loop(registry: PluginRegistry) -> None:
    # The start attempt takes longer than stable_after: that must not count as a stable run.
    policy = dataclasses.replace(
        FAST_RESTARTS, initial_backoff=0.05, max_backoff=0.1, stable_after=0.5
    )
    registry.add(
        PluginTarget(
            plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env("never_handshake")
        ),
        options=dataclasses.replace(OPTIONS, start_timeout=1.0, restart=policy),
    )
    await registry.start()
    looping = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.CRASH_LOOP)
    assert looping.consecutive_failures == 3
    assert looping.last_error is not None and "no handshake line" in looping.last_error


async def test_a_kill_reason_belongs_to_its_own_run(
    registry: PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow first health check keeps the first run in STARTING long enough to kill it there.
    real_ping = BackendClient.ping
    pings = 0

    async def slow_first_ping(self: BackendClient, *, timeout: float = 5.0) -> bool:
        nonlocal pings
        pings += 1
        if pings == 1:
            await asyncio.sleep(0.5)
        return await real_ping(self, timeout=timeout)

    monkeypatch.setattr(BackendClient, "ping", slow_first_ping)
    registry.add(
        PluginTarget(
            plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env("crash_after=1")
        ),
        options=dataclasses.replace(OPTIONS, health_interval=100.0),
    )
    supervisor = registry.supervisor(PY_FIXTURE_ID)
    await registry.start()
    await wait_for(registry, PY_FIXTURE_ID, lambda s: s.pid is not None)
    supervisor.restart_now("operator asked for it")
    failed = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.restarts == 1)
    assert failed.last_error == "operator asked for it"
    await wait_for(registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.RUNNING)
    await registry.client(PY_FIXTURE_ID).check_health(health_request())
    with pytest.raises(PluginError):  # the second call makes the plugin exit with status 3
        await registry.client(PY_FIXTURE_ID).check_health(health_request())
    crashed = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.restarts == 2)
    assert crashed.last_error == "process exited with status 3"
    assert crashed.last_exit_code == 3
    # After the process is gone, a late request to restart it changes nothing.
    supervisor.restart_now("too late")
    up = await wait_for(registry, PY_FIXTURE_ID, lambda s: s.state is PluginState.RUNNING)
    assert up.last_error is None and up.restarts == 2


async def test_plugin_output_stays_out_of_errors_for_callers(
    registry: PluginRegistry, short_tmp: Path
) -> None:
    launcher = shell_plugin(
        short_tmp,
        "leaky",
        f"echo 'connecting with AWS_SECRET_ACCESS_KEY={SECRET}' >&2\n"
        "echo 'panic: cannot connect' >&2\nexit 5\n",
    )
    registry.add(
        PluginTarget(
            plugin_id=PY_FIXTURE_ID,
            executable=launcher,
            env={"AWS_SECRET_ACCESS_KEY": SECRET, **plugin_env()},
        )
    )
    [status] = await registry.start(wait=10)
    assert status.last_error == "process exited with status 5 before the handshake"
    assert status.last_output is not None and SECRET in status.last_output
    with pytest.raises(PluginUnavailable) as info:
        registry.client(PY_FIXTURE_ID)
    shown = str(info.value)
    assert "\n" not in shown and SECRET not in shown and "panic" not in shown
    assert SECRET not in repr(status)
    assert SECRET not in repr(registry.supervisor(PY_FIXTURE_ID).target)


async def test_exit_is_noticed_while_a_child_of_the_plugin_holds_its_pipes(
    registry: PluginRegistry, short_tmp: Path
) -> None:
    # The launcher leaves a helper behind that inherits stdout and stderr, then becomes the
    # plugin; the plugin crashes on its second call.
    helper_pid = short_tmp / "helper.pid"
    launcher = shell_plugin(
        short_tmp, "launcher", f"sleep 300 &\necho $! > {helper_pid}\nexec {PY_FIXTURE}\n"
    )
    registry.add(
        PluginTarget(plugin_id=PY_FIXTURE_ID, executable=launcher, env=plugin_env("crash_after=1"))
    )
    [first] = await registry.start(wait=30)
    assert first.state is PluginState.RUNNING
    helper = int(helper_pid.read_text())
    await registry.client(PY_FIXTURE_ID).check_health(health_request())
    with pytest.raises(PluginError):
        await registry.client(PY_FIXTURE_ID).check_health(health_request())
    up = await wait_for(
        registry,
        PY_FIXTURE_ID,
        lambda s: s.state is PluginState.RUNNING and s.pid != first.pid,
        timeout=10,
    )
    assert up.restarts == 1
    assert not _running(helper)  # killed with its process group


async def test_hung_plugin_is_asked_for_a_stack_dump_then_killed(
    registry: PluginRegistry, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    registry.add(
        PluginTarget(
            plugin_id="mini-datasource", executable=mini_plugin(short_tmp, "health_hangs_after=1")
        )
    )
    [status] = await registry.start(wait=30)
    assert status.state is PluginState.RUNNING, status.last_error
    failed = await wait_for(registry, "mini-datasource", lambda s: s.restarts >= 1)
    assert failed.last_error is not None
    assert failed.last_error.startswith("failed 2 health checks in a row")
    # SIGQUIT came first: the plugin wrote its goroutines and exited by itself (status 2).
    assert failed.last_exit_code == 2
    assert failed.last_output is not None and "goroutine 1 [select" in failed.last_output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("health check failed (1 of 2 in a row)" in w for w in warnings)
    assert any("health check failed (2 of 2 in a row)" in w for w in warnings)
    dump = [r for r in caplog.records if r.name == "plugin.mini-datasource"]
    assert any(r.levelno == logging.ERROR and r.getMessage() == "SIGQUIT: quit" for r in dump)


async def test_stdio_is_read_again_after_the_stream_breaks_and_split_into_lines(
    registry: PluginRegistry, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(1, logger="plugin.mini-datasource")
    registry.add(
        PluginTarget(
            plugin_id="mini-datasource", executable=mini_plugin(short_tmp, "stdio_breaks_once")
        ),
        options=dataclasses.replace(OPTIONS, health_interval=100.0),
    )
    [status] = await registry.start(wait=30)
    assert status.state is PluginState.RUNNING, status.last_error
    expected = [
        (logging.DEBUG, "mini stdout one"),
        (logging.WARNING, "mini stdout two"),
        (logging.ERROR, "mini stderr"),
    ]
    for _ in range(100):
        seen = [
            (r.levelno, r.getMessage())
            for r in caplog.records
            if r.name == "plugin.mini-datasource" and r.getMessage().startswith("mini ")
        ]
        if len(seen) >= 3:
            break
        await asyncio.sleep(0.05)
    assert seen == expected


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
