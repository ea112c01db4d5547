"""Stream fan-out: messages per second to 1, 10 and 100 WebSocket subscribers of one channel,
against reading the plugin's ``RunStream`` directly over gRPC in the same run.

The bridge runs as a real ``grafana-bridge serve`` process and *attaches* to a Python fixture
plugin this script starts, so the direct gRPC baseline and the bridge read the very same
plugin process. The stream is the fixture's ``ticks`` with ``intervalMs: 0``: the plugin sends
as fast as it can and gRPC flow control paces it to its reader. The subscribers are aiohttp
WebSocket clients in this process; the bridge uses its default ``streams`` settings
(256-message buffers, drop-oldest), so a subscriber that falls behind loses messages and the
figures say how many.

    .venv/bin/python -m benchmarks.stream_fanout [--seconds 3] [--subscribers 1 10 100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._common import (
    PY_FIXTURE,
    PY_PLUGIN_ID,
    TOKEN,
    attached_plugin,
    free_port,
    start_bridge,
    stop_bridge,
    wait_ready,
    write_bench_config,
)
from plugin_host.client import BackendClient
from protos.pluginv2 import backend_pb2 as pb

PLUGIN_ID = PY_PLUGIN_ID
GROUP = "bench.datasource.grafana.app"
FLOOD = {"intervalMs": 0}


async def direct(client: BackendClient, seconds: float) -> float:
    """Packets per second reading RunStream straight from the plugin (after a warm-up)."""
    request = pb.RunStreamRequest(
        pluginContext=pb.PluginContext(
            orgId=1,
            pluginId=PLUGIN_ID,
            dataSourceInstanceSettings=pb.DataSourceInstanceSettings(uid="bench", name="bench"),
        ),
        path="ticks/direct",
        data=json.dumps(FLOOD).encode(),
    )
    count = 0
    began = 0.0
    warm_until = time.perf_counter() + 0.5
    async for _ in client.run_stream(request):
        now = time.perf_counter()
        if now < warm_until:
            continue
        if not began:
            began = now
        count += 1
        if now - began >= seconds:
            break
    return count / (time.perf_counter() - began)


async def bridge_counter(session: aiohttp.ClientSession, base: str, name: str) -> float:
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    )


async def fan_out(
    session: aiohttp.ClientSession, base: str, subscribers: int, seconds: float
) -> dict[str, float]:
    url = (
        f"{base}/apis/{GROUP}/v0alpha1/namespaces/default/datasources/bench/stream/"
        f"ticks/fanout?data={json.dumps(FLOOD)}"
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    sockets = [await session.ws_connect(url, headers=headers) for _ in range(subscribers)]
    counts = [0] * subscribers
    counting = asyncio.Event()
    stop = asyncio.Event()

    async def read(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not stop.is_set():
            message = await ws.receive()
            if message.type is not aiohttp.WSMsgType.TEXT:
                return
            if counting.is_set():
                counts[i] += 1

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
    await asyncio.sleep(0.5)  # warm-up
    packets = await bridge_counter(session, base, "grafana_bridge_stream_packets_total")
    dropped = await bridge_counter(session, base, "grafana_bridge_stream_dropped_messages_total")
    counting.set()
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    counting.clear()
    elapsed = time.perf_counter() - began
    packets = await bridge_counter(session, base, "grafana_bridge_stream_packets_total") - packets
    dropped = (
        await bridge_counter(session, base, "grafana_bridge_stream_dropped_messages_total")
        - dropped
    )
    stop.set()
    for ws in sockets:
        await ws.close()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    delivered = sum(counts)
    return {
        "subscribers": float(subscribers),
        "plugin_packets_per_s": packets / elapsed,
        "per_subscriber_msgs_per_s": delivered / subscribers / elapsed,
        "total_msgs_per_s": delivered / elapsed,
        "dropped_fraction": dropped / (delivered + dropped) if delivered + dropped else 0.0,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="gfb-stream-bench-", dir="/tmp"))
    out: dict[str, Any] = {"cases": []}
    try:
        async with attached_plugin(PLUGIN_ID, PY_FIXTURE, workdir / "plugin") as (plugin, client):
            port = free_port()
            config = write_bench_config(
                workdir,
                port=port,
                plugin_id=PLUGIN_ID,
                group=GROUP,
                service="stream",
                plugins={"directories": [], "attach": {PLUGIN_ID: plugin.handshake.grpc_target}},
                dataplane={"auto_register": "none"},
                storage={"backend": "memory"},
                logging={"level": "error"},
            )
            bridge = start_bridge(config)
            base = f"http://127.0.0.1:{port}"
            try:
                # No connection limit: 100 WebSockets plus the /metrics scrapes.
                connector = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=connector) as session:
                    await wait_ready(session, base, bridge)
                    for subscribers in args.subscribers:
                        baseline = await direct(client, args.seconds)
                        figures = await fan_out(session, base, subscribers, args.seconds)
                        figures["direct_grpc_msgs_per_s"] = baseline
                        figures["per_subscriber_ratio"] = (
                            figures["per_subscriber_msgs_per_s"] / baseline
                        )
                        figures["total_ratio"] = figures["total_msgs_per_s"] / baseline
                        out["cases"].append(figures)
            finally:
                stop_bridge(bridge)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def report(out: dict[str, Any]) -> None:
    print("Stream fan-out: RunStream read directly over gRPC vs through the bridge (WebSocket)")
    print(
        f"  {'subs':>4} | {'direct msg/s':>12} | {'plugin pkt/s':>12} {'per-sub msg/s':>13}"
        f" {'total msg/s':>11} {'dropped':>8} | {'per-sub ratio':>13} {'total ratio':>11}"
    )
    for case in out["cases"]:
        print(
            f"  {case['subscribers']:>4.0f} | {case['direct_grpc_msgs_per_s']:>12,.0f} |"
            f" {case['plugin_packets_per_s']:>12,.0f} {case['per_subscriber_msgs_per_s']:>13,.0f}"
            f" {case['total_msgs_per_s']:>11,.0f} {case['dropped_fraction']:>8.1%} |"
            f" {case['per_subscriber_ratio']:>13.2f} {case['total_ratio']:>11.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
