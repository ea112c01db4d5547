"""Launching real plugin processes: the handshake, its failures, stopping, reaping."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import psutil
import pytest

from plugin_host.client import BackendClient, open_channel
from plugin_host.errors import (
    HandshakeError,
    HandshakeTimeout,
    IncompatibleVersion,
    MalformedHandshake,
    PluginExitedBeforeHandshake,
    PluginSpawnError,
    UnsupportedProtocol,
    describe_exit,
)
from plugin_host.handshake import Network
from plugin_host.process import PluginProcess
from tests.helpers import PY_FIXTURE, PY_FIXTURE_ID, plugin_env, zombies


async def start(
    workdir: Path, behaviour: str = "", *, start_timeout: float = 20.0
) -> PluginProcess:
    return await PluginProcess.start(
        plugin_id=PY_FIXTURE_ID,
        executable=PY_FIXTURE,
        env=plugin_env(behaviour),
        workdir=workdir / "p",
        start_timeout=start_timeout,
    )


async def test_start_handshake_and_clean_stop(short_tmp: Path) -> None:
    process = await start(short_tmp)
    info = process.handshake
    assert info.network is Network.UNIX
    assert info.address.startswith(str(short_tmp / "p"))
    assert Path(info.address).is_socket()
    client = BackendClient(PY_FIXTURE_ID, open_channel(info.grpc_target))
    assert await client.ping()
    code = await process.stop(grace=5.0, request_shutdown=client.shutdown)
    await client.close()
    assert code == 0
    assert not Path(info.address).exists()
    assert not (short_tmp / "p").exists()
    assert (
        not psutil.pid_exists(process.pid)
        or psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert zombies() == []


BAD_HANDSHAKES: list[tuple[str, type[HandshakeError], list[str]]] = [
    ("garbage_stdout", MalformedHandshake, ["'hello from a broken plugin'"]),
    ("wrong_version", IncompatibleVersion, ["plugin protocol version 1, which is not supported"]),
    ("netrpc", UnsupportedProtocol, ["'netrpc'"]),
    ("exit_before_handshake", PluginExitedBeforeHandshake, ["exited with status 2"]),
]


@pytest.mark.parametrize(("behaviour", "error", "fragments"), BAD_HANDSHAKES)
async def test_bad_handshakes_fail_precisely_and_leave_nothing(
    short_tmp: Path, behaviour: str, error: type[HandshakeError], fragments: list[str]
) -> None:
    with pytest.raises(error) as info:
        await start(short_tmp, behaviour)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert f"{PY_FIXTURE_ID}: plugin " not in str(info.value)
    assert "\n" not in str(info.value)
    assert not (short_tmp / "p").exists()
    assert zombies() == []
    assert [c for c in psutil.Process().children(recursive=True) if c.is_running()] == []


async def test_exit_before_handshake_carries_exit_code_and_stderr(short_tmp: Path) -> None:
    with pytest.raises(PluginExitedBeforeHandshake) as info:
        await start(short_tmp, "exit_before_handshake")
    assert info.value.exit_code == 2
    assert "panic: " in info.value.stderr_tail
    assert "panic" not in str(info.value)  # the plugin's output is for operators, not callers


async def test_never_handshaking_plugin_times_out_and_is_killed(short_tmp: Path) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(HandshakeTimeout) as info:
        await start(short_tmp, "never_handshake", start_timeout=1.5)
    assert 1.4 < loop.time() - began < 6.0
    assert "within 1.5s" in str(info.value)
    assert "never handshaking" in info.value.stderr_tail
    assert [c for c in psutil.Process().children(recursive=True) if c.is_running()] == []


@pytest.mark.parametrize("behaviour", ["tcp", "five_fields", "slow_start=1"])
async def test_other_valid_handshakes(short_tmp: Path, behaviour: str) -> None:
    process = await start(short_tmp, behaviour)
    client = BackendClient(PY_FIXTURE_ID, open_channel(process.handshake.grpc_target))
    try:
        assert await client.ping()
        if behaviour == "tcp":
            assert process.handshake.network is Network.TCP
            assert process.handshake.address.startswith("127.0.0.1:")
    finally:
        assert await process.stop(grace=5.0, request_shutdown=client.shutdown) == 0
        await client.close()


async def test_missing_and_non_executable_binaries(short_tmp: Path) -> None:
    with pytest.raises(PluginSpawnError, match=r"cannot execute .*nope"):
        await PluginProcess.start(
            plugin_id="x", executable=short_tmp / "nope", env={}, workdir=short_tmp / "w"
        )
    script = short_tmp / "plain"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with pytest.raises(PluginSpawnError, match="Permission denied"):
        await PluginProcess.start(plugin_id="x", executable=script, env={}, workdir=short_tmp / "w")
    # A bare name is looked up in PATH when the plugin is executed.
    with pytest.raises(PluginSpawnError, match=r"cannot execute no-such-plugin.*No such file"):
        await PluginProcess.start(
            plugin_id="x", executable=Path("no-such-plugin"), env={}, workdir=short_tmp / "w"
        )
    assert not (short_tmp / "w").exists()


async def test_plugin_ignoring_shutdown_is_killed_after_grace(short_tmp: Path) -> None:
    process = await start(short_tmp, "ignore_shutdown")
    client = BackendClient(PY_FIXTURE_ID, open_channel(process.handshake.grpc_target))
    loop = asyncio.get_running_loop()
    began = loop.time()
    code = await process.stop(grace=1.0, request_shutdown=client.shutdown)
    await client.close()
    assert code == -9
    assert loop.time() - began < 4.0
    assert not Path(process.handshake.address).exists()  # stale socket removed by the host
    assert zombies() == []


async def test_log_flood_never_blocks_the_plugin(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(1, logger=f"plugin.{PY_FIXTURE_ID}")
    # 20,000 lines on each pipe is far beyond the 64 KiB a pipe holds.
    process = await start(short_tmp, "log_flood=20000")
    client = BackendClient(PY_FIXTURE_ID, open_channel(process.handshake.grpc_target))
    try:
        for _ in range(50):
            flooded = sum(1 for r in caplog.records if r.name == f"plugin.{PY_FIXTURE_ID}")
            if flooded >= 40000:
                break
            await asyncio.sleep(0.1)
        assert flooded >= 40000
        assert await client.ping(timeout=2.0)
        assert all(
            r.__dict__.get("plugin_id") == PY_FIXTURE_ID
            for r in caplog.records
            if r.name.startswith("plugin.")
        )
    finally:
        await process.stop(grace=5.0, request_shutdown=client.shutdown)
        await client.close()


async def test_stop_is_idempotent_and_reaps(short_tmp: Path) -> None:
    process = await start(short_tmp)
    os.kill(process.pid, 9)
    assert await process.wait() == -9
    assert await process.stop(grace=0.5) == -9
    assert await process.stop(grace=0.5) == -9
    assert zombies() == []


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (0, "exited with status 0"),
        (3, "exited with status 3"),
        (-9, "was killed by SIGKILL"),
        (-3, "was killed by SIGQUIT"),
        (-99, "was killed by signal 99"),
    ],
)
def test_exit_statuses_in_words(code: int, words: str) -> None:
    assert describe_exit(code) == words
