"""Front-door overhead: QueryData through the bridge vs straight over gRPC, route lookups at
10 vs 10,000 services, and delegated requests vs calling the delegate directly.

The bridge runs as a real ``grafana-bridge serve`` process. It *attaches* to a Go fixture
plugin this script starts, so the direct gRPC baseline and the bridge talk to the very same
plugin process. A small aiohttp server stands in for Grafana as the delegate.

    .venv/bin/python -m benchmarks.front_door [--seconds 3] [--concurrency 1 8 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from benchmarks._common import (
    GO_PLUGIN_ID,
    TOKEN,
    attached_plugin,
    free_port,
    go_fixture_binary,
    load,
    start_bridge,
    stop_bridge,
    wait_ready,
    write_bench_config,
)
from bridge.apis import DataPlaneService
from bridge.routing import RouteTable
from plugin_host.client import BackendClient
from protos.pluginv2 import backend_pb2 as pb

PLUGIN_ID = GO_PLUGIN_ID
GROUP = "bench.datasource.grafana.app"


def query_request(points: int) -> pb.QueryDataRequest:
    return pb.QueryDataRequest(
        pluginContext=pb.PluginContext(
            orgId=1,
            pluginId=PLUGIN_ID,
            dataSourceInstanceSettings=pb.DataSourceInstanceSettings(
                id=1, uid="bench", name="bench"
            ),
        ),
        queries=[
            pb.DataQuery(
                refId="A",
                maxDataPoints=points,
                intervalMS=1000,
                timeRange=pb.TimeRange(fromEpochMS=0, toEpochMS=3_600_000),
                json=b"{}",
            )
        ],
        format=pb.JSON,
    )


def query_body(points: int) -> bytes:
    return json.dumps(
        {
            "from": "0",
            "to": "3600000",
            "queries": [
                {
                    "refId": "A",
                    "maxDataPoints": points,
                    "datasource": {"type": PLUGIN_ID, "uid": "bench"},
                }
            ],
        }
    ).encode()


def route_lookup() -> dict[str, float]:
    """ns per resolve with 10 and 10,000 mounted services (median of 7 rounds)."""

    def table(n: int) -> RouteTable:
        return RouteTable.build(
            [
                DataPlaneService.from_object(
                    {
                        "apiVersion": "aggregation.grafana.app/v0alpha1",
                        "kind": "DataPlaneService",
                        "metadata": {"name": f"v1.g{i}.grafana.app"},
                        "spec": {
                            "pluginID": "p",
                            "pluginType": "datasource",
                            "group": f"g{i}.grafana.app",
                            "version": "v1",
                            "services": [{"type": "query"}, {"type": "route"}],
                        },
                    }
                )
                for i in range(n)
            ]
        )

    path = "/apis/g7.grafana.app/v1/namespaces/default/datasources/x/resource/a/b/c"
    result: dict[str, float] = {}
    for n in (10, 10_000):
        routes = table(n)
        rounds = []
        for _ in range(7):
            began = time.perf_counter_ns()
            for _ in range(20_000):
                routes.resolve("GET", path)
            rounds.append((time.perf_counter_ns() - began) / 20_000)
        result[f"resolve_ns_{n}"] = statistics.median(rounds)
    result["ratio_10000_vs_10"] = result["resolve_ns_10000"] / result["resolve_ns_10"]
    return result


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"route_lookup": route_lookup()}
    binary = go_fixture_binary(install=True)
    workdir = Path(tempfile.mkdtemp(prefix="gfb-bench-", dir="/tmp"))
    delegate_app = web.Application()

    async def grafana(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path})

    delegate_app.router.add_route("*", "/{tail:.*}", grafana)
    runner = web.AppRunner(delegate_app, access_log=None)
    try:
        await runner.setup()
        delegate_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", delegate_port).start()
        async with attached_plugin(PLUGIN_ID, binary, workdir / "plugin") as (plugin, client):
            port = free_port()
            config = write_bench_config(
                workdir,
                port=port,
                plugin_id=PLUGIN_ID,
                group=GROUP,
                service="query",
                plugins={"directories": [], "attach": {PLUGIN_ID: plugin.handshake.grpc_target}},
                delegate={"url": f"http://127.0.0.1:{delegate_port}"},
            )
            bridge = start_bridge(config)
            try:
                out.update(await measure(args, client, bridge, port, delegate_port))
            finally:
                stop_bridge(bridge)
    finally:
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


async def measure(
    args: argparse.Namespace,
    client: BackendClient,
    bridge: subprocess.Popen[bytes],
    port: int,
    delegate_port: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = f"http://127.0.0.1:{port}"
    query_url = f"{base}/apis/{GROUP}/v0alpha1/namespaces/default/datasources/bench/query"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_ready(session, base, bridge)
        cases: list[dict[str, Any]] = []
        for points in (1, 1000):
            request = query_request(points)
            body = query_body(points)

            async def direct(request: pb.QueryDataRequest = request) -> None:
                await client.query_data(request, timeout=30)

            async def through(body: bytes = body) -> None:
                async with session.post(query_url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"bridge answered {response.status}")

            await load(through, seconds=0.5, concurrency=4)  # warm-up
            for concurrency in args.concurrency:
                grpc_figures = await load(direct, seconds=args.seconds, concurrency=concurrency)
                http_figures = await load(through, seconds=args.seconds, concurrency=concurrency)
                cases.append(
                    {
                        "points": points,
                        "concurrency": concurrency,
                        "direct_grpc": grpc_figures,
                        "through_bridge": http_figures,
                        "throughput_ratio": http_figures["rps"] / grpc_figures["rps"],
                        "p50_ratio": http_figures["p50_ms"] / grpc_figures["p50_ms"],
                    }
                )
        out["query"] = cases

        delegated: list[dict[str, Any]] = []
        for concurrency in args.concurrency:

            async def straight() -> None:
                async with session.get(f"http://127.0.0.1:{delegate_port}/api/health") as response:
                    await response.read()

            async def proxied() -> None:
                async with session.get(f"{base}/api/health") as response:
                    await response.read()

            direct_figures = await load(straight, seconds=args.seconds, concurrency=concurrency)
            proxied_figures = await load(proxied, seconds=args.seconds, concurrency=concurrency)
            delegated.append(
                {
                    "concurrency": concurrency,
                    "direct": direct_figures,
                    "through_bridge": proxied_figures,
                    "throughput_ratio": proxied_figures["rps"] / direct_figures["rps"],
                    "added_p50_ms": proxied_figures["p50_ms"] - direct_figures["p50_ms"],
                }
            )
        out["delegated"] = delegated
    return out


def report(out: dict[str, Any]) -> None:
    lookup = out["route_lookup"]
    print("Route lookup (RouteTable.resolve, ns per call):")
    print(
        f"  10 services: {lookup['resolve_ns_10']:.0f}   10,000 services: "
        f"{lookup['resolve_ns_10000']:.0f}   ratio {lookup['ratio_10000_vs_10']:.2f}"
    )
    print("\nQueryData: direct gRPC vs through the bridge (HTTP → auth → route → gRPC → JSON)")
    print(
        f"  {'points':>6} {'conc':>4} | {'gRPC rps':>9} {'p50':>7} {'p99':>7} | {'bridge rps':>10} {'p50':>7} {'p99':>7} | {'rps ratio':>9}"
    )
    for case in out["query"]:
        g, b = case["direct_grpc"], case["through_bridge"]
        print(
            f"  {case['points']:>6} {case['concurrency']:>4} | {g['rps']:>9.0f} {g['p50_ms']:>7.2f} {g['p99_ms']:>7.2f} |"
            f" {b['rps']:>10.0f} {b['p50_ms']:>7.2f} {b['p99_ms']:>7.2f} | {case['throughput_ratio']:>9.2f}"
        )
    print("\nDelegated GET: straight to the stand-in Grafana vs through the bridge")
    print(
        f"  {'conc':>4} | {'direct rps':>10} {'p50':>7} | {'bridge rps':>10} {'p50':>7} | {'rps ratio':>9} {'+p50 ms':>8}"
    )
    for case in out["delegated"]:
        d, b = case["direct"], case["through_bridge"]
        print(
            f"  {case['concurrency']:>4} | {d['rps']:>10.0f} {d['p50_ms']:>7.2f} | {b['rps']:>10.0f} {b['p50_ms']:>7.2f} |"
            f" {case['throughput_ratio']:>9.2f} {case['added_p50_ms']:>8.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    results = asyncio.run(main(arguments))
    if not arguments.json:
        report(results)
    print(json.dumps(results))
