"""Shared pieces for supervisor tests: fast options, waiting on a status, small plugins."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path

from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginStatus, RestartPolicy, SupervisorOptions
from protos.pluginv2 import backend_pb2 as pb
from tests.helpers import PY_FIXTURE_ID, ROOT

FAST_RESTARTS = RestartPolicy(
    initial_backoff=0.2,
    max_backoff=1.0,
    multiplier=2.0,
    jitter=0.1,
    crash_loop_threshold=3,
    stable_after=60.0,
)
OPTIONS = SupervisorOptions(
    start_timeout=20.0,
    stop_grace=3.0,
    call_timeout=5.0,
    health_interval=0.3,
    health_timeout=0.5,
    health_failures=2,
    stats_interval=0.2,
    restart=FAST_RESTARTS,
)
MINI_PLUGIN = Path(__file__).with_name("mini_plugin.py")


async def wait_for(
    registry: PluginRegistry,
    plugin_id: str,
    predicate: Callable[[PluginStatus], bool],
    timeout: float = 20.0,
) -> PluginStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = registry.status(plugin_id)
        if predicate(status):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not reached; last status: {registry.status(plugin_id)}")


def health_request() -> pb.CheckHealthRequest:
    return pb.CheckHealthRequest(pluginContext=pb.PluginContext(orgId=1, pluginId=PY_FIXTURE_ID))


def shell_plugin(directory: Path, name: str, body: str) -> Path:
    """An executable /bin/sh script (the body follows the shebang line)."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def handshake_echo() -> str:
    """The shell line that prints a handshake for a socket in the plugin's private dir."""
    return 'echo "1|2|unix|$PLUGIN_UNIX_SOCKET_DIR/s|grpc|"\n'


def mini_plugin(directory: Path, behaviour: str) -> Path:
    """An executable that runs mini_plugin.py with the given MINI_PLUGIN behaviours."""
    return shell_plugin(
        directory,
        "mini",
        f"export PYTHONPATH={ROOT} MINI_PLUGIN='{behaviour}'\n"
        f"exec {sys.executable} {MINI_PLUGIN}\n",
    )
