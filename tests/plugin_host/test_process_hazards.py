"""Hazards a plugin process meets: spawning next to live gRPC, stray children, odd output."""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from plugin_host.client import BackendClient, open_channel
from plugin_host.errors import (
    HandshakeError,
    PluginExitedBeforeHandshake,
    PluginSpawnError,
)
from plugin_host.process import PluginProcess
from tests.helpers import PY_FIXTURE, PY_FIXTURE_ID, ROOT, plugin_env, zombies
from tests.plugin_host.supervision import handshake_echo, shell_plugin


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
async def live_grpc_channel(short_tmp: Path) -> AsyncIterator[BackendClient]:
    """A real plugin with a connected, idle gRPC channel to it, as a host has while serving."""
    process = await PluginProcess.start(
        plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=plugin_env(), workdir=short_tmp / "b"
    )
    client = BackendClient(PY_FIXTURE_ID, open_channel(process.handshake.grpc_target))
    try:
        assert await client.ping()
        yield client
    finally:
        await process.stop(grace=3.0, request_shutdown=client.shutdown)
        await client.close()


async def test_spawning_while_grpc_calls_run_never_aborts(
    short_tmp: Path, live_grpc_channel: BackendClient
) -> None:
    # A host restarts one plugin while it serves calls to another. With a preexec_fn, Python
    # forks instead of vforking, and gRPC's fork handlers made about one child in fifteen
    # abort before exec (grpc/grpc#43055).
    plugin = shell_plugin(short_tmp, "quick", handshake_echo() + "exec /bin/sleep 30\n")
    serving = asyncio.Event()

    async def traffic() -> int:
        calls = 0
        while not serving.is_set():
            assert await live_grpc_channel.ping()
            calls += 1
        return calls

    callers = [asyncio.create_task(traffic()) for _ in range(4)]
    failures: list[str] = []
    try:
        for i in range(150):
            try:
                process = await PluginProcess.start(
                    plugin_id="quick", executable=plugin, env={}, workdir=short_tmp / f"q{i}"
                )
            except HandshakeError as exc:
                failures.append(f"{exc}: {exc.stderr_tail}")
                continue
            await process.stop(grace=0.0)
    finally:
        serving.set()
        calls = await asyncio.gather(*callers)
    assert failures == []
    assert min(calls) > 0
    assert zombies() == []


FALLBACK_SCRIPT = """
import asyncio, json, os, sys
from pathlib import Path
from plugin_host import process
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def main(root):
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    failures = []
    for i in range(150):
        try:
            p = await process.PluginProcess.start(
                plugin_id="quick", executable=root / "quick", env={}, workdir=root / f"q{i}")
        except Exception as exc:
            failures.append(str(exc))
            continue
        await p.stop(grace=0.0)
    await channel.close()
    await server.stop(None)
    print(json.dumps({
        "via": process.PARENT_DEATH_SIGNAL_VIA,
        "fork_support": os.environ.get("GRPC_ENABLE_FORK_SUPPORT"),
        "failures": failures,
    }))

asyncio.run(main(Path(sys.argv[1])))
"""


def test_without_setpriv_the_fallback_spawns_safely_too(short_tmp: Path) -> None:
    shell_plugin(short_tmp, "quick", handshake_echo() + "exec /bin/sleep 30\n")
    empty = short_tmp / "empty-path"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(short_tmp)],
        env={"PATH": str(empty), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome == {"via": "preexec_fn", "fork_support": "false", "failures": []}


async def test_exit_is_seen_although_a_child_keeps_the_pipes_open(short_tmp: Path) -> None:
    helper_pid = short_tmp / "helper.pid"
    plugin = shell_plugin(
        short_tmp,
        "leaves-a-child",
        f"/bin/sleep 300 &\necho $! > {helper_pid}\n" + handshake_echo() + "sleep 0.3\nexit 3\n",
    )
    process = await PluginProcess.start(
        plugin_id="g", executable=plugin, env={}, workdir=short_tmp / "w"
    )
    assert await asyncio.wait_for(process.wait(), 3.0) == 3
    began = time.monotonic()
    assert await process.stop(grace=0.5) == 3
    assert time.monotonic() - began < 1.5
    assert not running(int(helper_pid.read_text()))  # the process group goes with it
    assert not (short_tmp / "w").exists()


async def test_early_exit_with_a_child_holding_stdout_is_not_a_timeout(short_tmp: Path) -> None:
    plugin = shell_plugin(
        short_tmp, "dies-early", "/bin/sleep 300 &\necho 'bad config' >&2\nexit 4\n"
    )
    began = time.monotonic()
    with pytest.raises(PluginExitedBeforeHandshake) as info:
        await PluginProcess.start(
            plugin_id="g", executable=plugin, env={}, workdir=short_tmp / "w", start_timeout=30
        )
    assert time.monotonic() - began < 5.0
    assert info.value.exit_code == 4
    assert "bad config" in info.value.stderr_tail
    assert [c for c in psutil.Process().children(recursive=True) if running(c.pid)] == []


async def test_closing_stdout_without_a_handshake_is_reported_as_such(short_tmp: Path) -> None:
    plugin = shell_plugin(short_tmp, "closes-stdout", "exec >&-\nexec /bin/sleep 30\n")
    with pytest.raises(HandshakeError, match="closed its stdout") as info:
        await PluginProcess.start(
            plugin_id="g", executable=plugin, env={}, workdir=short_tmp / "w", start_timeout=30
        )
    assert not isinstance(info.value, PluginExitedBeforeHandshake)
    assert [c for c in psutil.Process().children(recursive=True) if running(c.pid)] == []


NESTED_LOG_PLUGIN = """
import os, sys
sys.stdout.write("1|2|unix|%s/s|grpc|\\n" % os.environ["PLUGIN_UNIX_SOCKET_DIR"])
sys.stdout.flush()
depth = 5000
sys.stderr.write('{"@level":"info","@message":"x","k":' + '{"a":' * depth + "1" + "}" * depth + "}\\n")
for _ in range(400):
    sys.stderr.write("x" * 1023 + "\\n")
sys.stderr.flush()
"""


async def test_a_line_the_log_parser_chokes_on_does_not_stop_the_draining(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    process = await PluginProcess.start(
        plugin_id="nested",
        executable=Path(sys.executable),
        args=("-c", NESTED_LOG_PLUGIN),
        env={},
        workdir=short_tmp / "w",
    )
    # 400 KiB after the bad line: far more than a pipe holds, so the plugin only gets to
    # exit if its stderr is still read.
    assert await asyncio.wait_for(process.wait(), 10.0) == 0
    assert await process.stop(grace=0.5) == 0
    assert not (short_tmp / "w").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "plugin nested wrote a line its log parser cannot handle (RecursionError); "
        "such lines are logged as they are, at DEBUG"
    ]


async def test_host_only_variables_never_reach_the_plugin(short_tmp: Path) -> None:
    elsewhere = short_tmp / "elsewhere"
    elsewhere.mkdir()
    env = plugin_env(
        extra={
            "PLUGIN_UNIX_SOCKET_DIR": str(elsewhere),
            "PLUGIN_MULTIPLEX_GRPC": "true",
            "PLUGIN_UNIX_SOCKET_GROUP": "nogroup",
        }
    )
    # Set after build_environment, as a caller of PluginProcess might.
    env["GF_PLUGIN_GRPC_ADDRESS_BRIDGE_PYFIXTURE_DATASOURCE"] = "127.0.0.1:1"
    env["PLUGIN_UNIX_SOCKET_DIR"] = str(elsewhere)
    process = await PluginProcess.start(
        plugin_id=PY_FIXTURE_ID, executable=PY_FIXTURE, env=env, workdir=short_tmp / "w"
    )
    try:
        # go-plugin >= 1.5 (and the fixture) put the socket in PLUGIN_UNIX_SOCKET_DIR.
        assert Path(process.handshake.address).parent == short_tmp / "w"
        seen = psutil.Process(process.pid).environ()
        assert seen["PLUGIN_UNIX_SOCKET_DIR"] == seen["TMPDIR"] == str(short_tmp / "w")
        for name in (
            "PLUGIN_MULTIPLEX_GRPC",
            "PLUGIN_UNIX_SOCKET_GROUP",
            "GF_PLUGIN_GRPC_ADDRESS_BRIDGE_PYFIXTURE_DATASOURCE",
        ):
            assert name not in seen
    finally:
        await process.stop(grace=0.5)
    assert list(elsewhere.iterdir()) == []


async def test_a_socket_path_outside_the_private_directory_is_not_deleted(
    short_tmp: Path,
) -> None:
    victim = short_tmp / "victim"
    victim.write_text("not the plugin's")
    plugin = shell_plugin(
        short_tmp, "points-elsewhere", f'echo "1|2|unix|{victim}|grpc|"\nexec /bin/sleep 30\n'
    )
    process = await PluginProcess.start(
        plugin_id="u", executable=plugin, env={}, workdir=short_tmp / "w"
    )
    await process.stop(grace=0.0)
    assert victim.read_text() == "not the plugin's"
    assert not (short_tmp / "w").exists()


def _foreign_elf(directory: Path) -> Path:
    """A copy of /bin/true claiming another machine (aarch64 here, or x86-64 on arm64)."""
    machine = (62).to_bytes(2, "little") if platform.machine() == "aarch64" else b"\xb7\x00"
    path = directory / "foreign"
    shutil.copyfile("/bin/true", path)
    with path.open("r+b") as file:
        file.seek(18)
        file.write(machine)
    path.chmod(0o755)
    return path


async def test_a_file_that_is_no_program_here_says_so(short_tmp: Path) -> None:
    text = short_tmp / "text"
    text.write_text("echo this has no #! line\n")
    text.chmod(0o755)
    for executable in (text, _foreign_elf(short_tmp)):
        with pytest.raises(PluginSpawnError) as info:
            await PluginProcess.start(
                plugin_id="x", executable=executable, env={}, workdir=short_tmp / "w"
            )
        assert "Exec format error" in str(info.value)
        assert "built for another OS or architecture?" in str(info.value)
    assert not (short_tmp / "w").exists()


async def test_killing_after_exit_still_reaches_what_the_plugin_left(short_tmp: Path) -> None:
    helper_pid = short_tmp / "helper.pid"
    plugin = shell_plugin(
        short_tmp,
        "leaves-a-child",
        f"/bin/sleep 300 &\necho $! > {helper_pid}\n" + handshake_echo() + "exit 0\n",
    )
    process = await PluginProcess.start(
        plugin_id="g", executable=plugin, env={}, workdir=short_tmp / "w"
    )
    assert await process.wait() == 0
    process.kill("late")
    assert process.kill_reason is None  # it had exited on its own
    for _ in range(40):
        if not running(int(helper_pid.read_text())):
            break
        await asyncio.sleep(0.05)
    assert not running(int(helper_pid.read_text()))
    await process.stop(grace=0.0)
