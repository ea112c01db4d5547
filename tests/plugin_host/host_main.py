"""A tiny host process for tests: start the given plugins, print their pids and socket root
(one JSON line), then wait forever."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from plugin_host.registry import PluginRegistry
from plugin_host.supervisor import PluginTarget, SupervisorOptions
from tests.helpers import plugin_env


async def main(executables: list[str]) -> None:
    registry = PluginRegistry(options=SupervisorOptions(start_timeout=30.0))
    for i, exe in enumerate(executables):
        registry.add(PluginTarget(plugin_id=f"p{i}", executable=Path(exe), env=plugin_env()))
    statuses = await registry.start(wait=60)
    report = {"pids": [s.pid for s in statuses], "socket_root": str(registry.socket_root)}
    print(json.dumps(report), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
