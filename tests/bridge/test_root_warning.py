"""The root warning as an operator sees it: a real ``grafana-bridge serve`` process, its log.

tests/plugin_host/test_plugin_dir_safety.py::test_root_warning calls ``warn_if_root`` itself;
this shows that ``serve`` calls it, once, however long the bridge runs and whatever its plugins
do. The test machine decides which half applies: as root the warning must be there exactly
once, as any other user it must not be there at all (never a skip).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
import psutil

from tests.bridge.bridge_process import (
    BridgeProcess,
    free_port,
    running_bridges,
    write_bridge_config,
)
from tests.bridge.conftest import eventually

WARNING = "grafana-bridge runs as root"


def python_fixtures(bridge: BridgeProcess) -> list[psutil.Process]:
    found = []
    for process in bridge.plugin_processes():
        try:
            if any(part.endswith("fixture_plugin.py") for part in process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


async def test_serve_warns_once_when_it_runs_as_root(tmp_path: Path) -> None:
    port = free_port()
    config = write_bridge_config(tmp_path, port, storage={"backend": "memory"})
    with running_bridges() as bridges:
        bridge = BridgeProcess(config, port=port)
        bridges.append(bridge)
        bridge.start()
        async with aiohttp.ClientSession() as session:
            await bridge.wait_ready(session)
            # A plugin that dies is restarted: that is no start-up, so it brings no warning.
            (first,) = python_fixtures(bridge)
            os.kill(first.pid, signal.SIGKILL)

            async def restarted() -> bool:
                return [p.pid for p in python_fixtures(bridge)] not in ([], [first.pid])

            await eventually(restarted, what="the Python fixture to be restarted")
            assert (await bridge.request(session, "GET", "/readyz", token=None))[0] == 200
        bridge.stop()
    log = bridge.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if WARNING in line]
    if os.geteuid() == 0:
        assert len(lines) == 1, log[-4000:]
        assert "plugins.run_as_user" in lines[0]
        assert "warning" in lines[0].lower()  # the level, whatever the log format
    else:
        assert lines == [], lines
