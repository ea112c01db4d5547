"""Datasource-proxy overhead: a datasource's HTTP API called directly vs through the bridge.

The bridge runs as a real ``grafana-bridge serve`` process with a ``datasource-proxy``
DataPlaneService for a copy of the Python fixture plugin whose plugin.json has one templated
route. A small aiohttp server in this process stands in for the datasource; the baseline calls
it directly in the same run. Cases: a small GET with no route (path join, header scrubbing),
a small GET through the templated route (url, urlParams and header templates rendered per
request, datasource basic auth), a 1 MiB answer streamed back, and — as a reference for the
front door's own cost — the same small GET passed to the same server by the bridge's delegate.
Each side runs in alternating short rounds; the median round is kept.

    .venv/bin/python -m benchmarks.proxy_overhead [--seconds 3] [--concurrency 1 8 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from benchmarks._common import (
    PY_FIXTURE,
    TOKEN,
    free_port,
    load,
    start_bridge,
    stop_bridge,
    wait_ready,
    write_bench_config,
)

FIXTURE = PY_FIXTURE.parent
PLUGIN_ID = "bridge-benchproxy-datasource"
GROUP = "benchproxy.datasource.grafana.app"
BIG = b"x" * (1 << 20)
ROUTES = [
    {
        "path": "api",
        "method": "GET",
        "reqRole": "Viewer",
        "url": "{{.JsonData.url}}/base/api",
        "urlParams": [{"name": "tenant", "content": "{{.JsonData.tenant}}"}],
        "headers": [{"name": "X-Api-Key", "content": "{{.SecureJsonData.apiKey}}"}],
    }
]


def write_workdir(workdir: Path, *, datasource_url: str, port: int) -> Path:
    plugin = workdir / "plugins" / PLUGIN_ID
    plugin.mkdir(parents=True)
    manifest = json.loads((FIXTURE / "plugin.json").read_text())
    manifest.update(id=PLUGIN_ID, routes=ROUTES)
    (plugin / "plugin.json").write_text(json.dumps(manifest))
    executable = f"{manifest['executable']}_linux_amd64"
    launcher = plugin / executable
    launcher.write_text(f'#!/bin/sh\nexec "{FIXTURE / executable}" "$@"\n')
    launcher.chmod(0o755)
    datasource = {
        "name": "bench",
        "uid": "bench",
        "type": PLUGIN_ID,
        "url": f"{datasource_url}/base",
        "basicAuth": True,
        "basicAuthUser": "bench",
        "jsonData": {"url": datasource_url, "tenant": "t1"},
        "secureJsonData": {"apiKey": "k", "basicAuthPassword": "p"},
    }
    return write_bench_config(
        workdir,
        port=port,
        plugin_id=PLUGIN_ID,
        group=GROUP,
        service="datasource-proxy",
        plugins={"directories": ["plugins"], "allow_unsigned": [PLUGIN_ID]},
        datasource=datasource,
        dataplane={"auto_register": "none"},
        storage={"backend": "memory"},
        delegate={"url": datasource_url},
    )


async def interleaved(
    direct: Callable[[], Awaitable[None]],
    proxied: Callable[[], Awaitable[None]],
    seconds: float,
    concurrency: int,
    bridge: psutil.Process,
    rounds: int = 3,
) -> tuple[dict[str, float], dict[str, float]]:
    """Alternate short runs of both sides and keep each side's median round, so a machine
    whose load drifts during the run skews baseline and bridge alike. The bridge process's
    CPU time per proxied request (all rounds) is added as ``cpu_us``: it hardly depends on
    what else the machine runs."""
    sides: tuple[list[dict[str, float]], list[dict[str, float]]] = ([], [])
    cpu = 0.0
    calls = 0.0
    for _ in range(rounds):
        sides[0].append(await load(direct, seconds=seconds / rounds, concurrency=concurrency))
        before = sum(bridge.cpu_times()[:2])
        figures = await load(proxied, seconds=seconds / rounds, concurrency=concurrency)
        cpu += sum(bridge.cpu_times()[:2]) - before
        calls += figures["calls"]
        sides[1].append(figures)
    d, p = (dict(sorted(side, key=lambda r: r["rps"])[rounds // 2]) for side in sides)
    p["cpu_us"] = cpu / calls * 1e6
    return d, p


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/big"):
            return web.Response(body=BIG, content_type="application/octet-stream")
        return web.json_response({"path": request.path, "status": "success"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ds_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", ds_port).start()
    direct_base = f"http://127.0.0.1:{ds_port}"
    workdir = Path(tempfile.mkdtemp(prefix="gfb-proxy-bench-", dir="/tmp"))
    port = free_port()
    config = write_workdir(workdir, datasource_url=direct_base, port=port)
    bridge = start_bridge(config)
    base = f"http://127.0.0.1:{port}"
    proxy = f"{base}/apis/{GROUP}/v0alpha1/namespaces/default/datasources/bench/proxy"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        ("no route, small GET", f"{direct_base}/base/x/y", f"{proxy}/x/y"),
        ("templated route, small GET", f"{direct_base}/base/api/v1?tenant=t1", f"{proxy}/api/v1"),
        ("no route, 1 MiB answer", f"{direct_base}/base/big", f"{proxy}/big"),
        # The bridge's plain delegate path to the same server: the front door's own cost.
        ("reference: delegated GET", f"{direct_base}/base/x/y", f"{base}/base/x/y"),
    ]
    out: list[dict[str, Any]] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
            await wait_ready(session, base, bridge)
            for name, direct_url, proxied_url in cases:

                async def direct(url: str = direct_url) -> None:
                    async with session.get(url) as response:
                        await response.read()

                async def proxied(url: str = proxied_url) -> None:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        if response.status != 200:
                            raise RuntimeError(f"bridge answered {response.status}")

                await load(proxied, seconds=0.5, concurrency=4)  # warm-up
                for concurrency in args.concurrency:
                    d, p = await interleaved(
                        direct, proxied, args.seconds, concurrency, psutil.Process(bridge.pid)
                    )
                    out.append(
                        {
                            "case": name,
                            "concurrency": concurrency,
                            "direct": d,
                            "through_bridge": p,
                            "throughput_ratio": p["rps"] / d["rps"],
                            "added_p50_ms": p["p50_ms"] - d["p50_ms"],
                        }
                    )
    finally:
        stop_bridge(bridge)
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"proxy": out}


def print_table(result: dict[str, Any]) -> None:
    print(
        "| case | concurrency | direct req/s | p50 ms | bridge req/s | p50 ms | p99 ms "
        "| throughput ratio | added p50 ms | bridge CPU µs/req |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["proxy"]:
        d, p = row["direct"], row["through_bridge"]
        print(
            f"| {row['case']} | {row['concurrency']} | {d['rps']:,.0f} | {d['p50_ms']:.2f} "
            f"| {p['rps']:,.0f} | {p['p50_ms']:.2f} | {p['p99_ms']:.2f} "
            f"| {row['throughput_ratio']:.2f} | {row['added_p50_ms']:.2f} "
            f"| {p['cpu_us']:,.0f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)
