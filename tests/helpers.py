"""Helpers for tests (and benchmarks) that run real plugin and bridge processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
from aiohttp import web

from plugin_host.handshake import GrafanaIdentity, build_environment

ROOT = Path(__file__).resolve().parent.parent
PY_FIXTURE = ROOT / "fixtures" / "plugins" / "python-datasource" / "gpx_pyfixture_linux_amd64"
PY_FIXTURE_ID = "bridge-pyfixture-datasource"
GO_FIXTURE_ID = "bridge-gofixture-datasource"


def plugin_env(behaviour: str = "", extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a plugin gets from the host, plus a fixture behaviour."""
    env = build_environment(host_env=os.environ, grafana=GrafanaIdentity(), extra_env=extra)
    if behaviour:
        env["FIXTURE_BEHAVIOUR"] = behaviour
    else:
        env.pop("FIXTURE_BEHAVIOUR", None)
    return env


def live_children() -> list[psutil.Process]:
    """Child processes of this test process that still exist (zombies included)."""
    return psutil.Process().children(recursive=True)


def zombies() -> list[psutil.Process]:
    found = []
    for child in live_children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def open_fds() -> int:
    return psutil.Process().num_fds()


def free_port() -> int:
    """A loopback port nobody listens on at the moment of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def without_bridge_settings(**marks: str) -> dict[str, str]:
    """This process's environment minus every ``BRIDGE_*`` variable, plus ``marks``.

    A ``BRIDGE_*`` variable of the machine running the tests must not change what a spawned
    bridge does; a mark variable, inherited by the bridge's plugins, lets a test find them.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(marks)
    return env


def marked_processes(variable: str, mark: str) -> list[psutil.Process]:
    """Live processes (zombies excluded) whose environment has ``variable=mark``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(variable) == mark and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each of ``processes`` that still exists."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue


async def wait_gone(processes: list[psutil.Process], timeout: float = 10.0) -> list[int]:
    """The pids of ``processes`` still alive (zombies aside) after ``timeout`` seconds."""
    _, alive = await asyncio.to_thread(psutil.wait_procs, processes, timeout=timeout)
    left = []
    for process in alive:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return left


def terminate(process: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``timeout`` seconds; reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def terminate_async(process: asyncio.subprocess.Process, timeout: float) -> None:
    """``terminate`` for an asyncio subprocess."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


@asynccontextmanager
async def serving_app(app: web.Application) -> AsyncIterator[tuple[str, int]]:
    """Serve ``app`` on a free loopback port; yields (host, port) and cleans up after."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield host, port
    finally:
        await runner.cleanup()
