"""What the executable re-check adds to a plugin (re)start.

Before every start the supervisor re-hashes the executable in a worker thread
(``plugin_host.signature.executable_changed`` through ``asyncio.to_thread``). This times that
check on the Go fixture binary (built with the real hashicorp/go-plugin) next to a baseline
measured in the same run: the start itself through the host's code path —
``PluginProcess.start`` (spawn + handshake), a first ``BackendClient.ping``. ``stop`` is not
counted. Runs are interleaved so that drift affects both alike; one warm-up of each is dropped.

    python -m benchmarks.executable_recheck [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import GO_PLUGIN_ID, ROOT, plugin_env
from plugin_host.client import BackendClient, open_channel
from plugin_host.process import PluginProcess, make_socket_root
from plugin_host.signature import executable_changed, sha256_file

GO_BINARY = ROOT / "fixtures" / "plugins" / "go-datasource" / "gpx_gofixture_linux_amd64"
PLUGIN_ID = GO_PLUGIN_ID


async def recheck(path: Path, expected: str) -> float:
    started = time.perf_counter()
    problem = await asyncio.to_thread(executable_changed, path, expected)
    took = time.perf_counter() - started
    if problem is not None:
        raise SystemExit(problem)
    return took


async def start_to_ready(root: Path) -> float:
    env = plugin_env()
    workdir = Path(tempfile.mkdtemp(dir=root, prefix="bench-"))
    started = time.perf_counter()
    process = await PluginProcess.start(
        plugin_id=PLUGIN_ID, executable=GO_BINARY, env=env, workdir=workdir, start_timeout=30
    )
    client = BackendClient(PLUGIN_ID, open_channel(process.handshake.grpc_target))
    try:
        if not await client.ping(timeout=10):
            raise SystemExit("the Go fixture says NOT_SERVING")
        return time.perf_counter() - started
    finally:
        await process.stop(grace=2.0, request_shutdown=lambda: client.shutdown(timeout=2.0))
        await client.close()


def row(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"| {name} | {ms[0]:.2f} | {statistics.median(ms):.2f} | {p90:.2f} | {ms[-1]:.2f} |"


async def main(runs: int) -> None:
    if not GO_BINARY.exists():
        raise SystemExit(f"{GO_BINARY} is missing: run scripts/build_go_fixture.py")
    expected = sha256_file(GO_BINARY)
    root = make_socket_root()
    checks: list[float] = []
    starts: list[float] = []
    try:
        for i in range(runs + 1):
            check = await recheck(GO_BINARY, expected)
            start = await start_to_ready(root)
            if i:  # the first of each is a warm-up
                checks.append(check)
                starts.append(start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = GO_BINARY.stat().st_size / 2**20
    print(f"Go fixture binary: {size:.1f} MiB; {runs} runs; load average {os.getloadavg()[0]:.2f}")
    print("| ms | min | p50 | p90 | max |")
    print("|---|---:|---:|---:|---:|")
    print(row("re-check (SHA-256 in a worker thread)", checks))
    print(row("baseline: start → first ping answered", starts))
    ratio = statistics.median(checks) / statistics.median(starts)
    print(f"re-check / start (p50): {ratio:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
