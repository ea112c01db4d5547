"""Soak: steady load through a real ``grafana-bridge serve`` process; the bridge must not grow.

The bridge (subprocess, both fixture plugins, a stand-in Grafana as delegate, a stand-in
datasource behind the datasource proxy) gets a warm-up of load, then the bridge's RSS, open
fds and asyncio tasks are taken from its /metrics with no load running (connections closed,
in-flight work drained) — *start*; then steady load for half of ``BRIDGE_SOAK_SECONDS``, the
same figures again — *mid*; the second half of the load; the figures again — *end*.

``BRIDGE_SOAK_SECONDS`` defaults to 150 under ``CI=true`` (the bounded CI run) and to 20
otherwise (a quick local check); set e.g. 600 for a long run.

Tolerances (docs/reliability.md): fds and asyncio tasks must not grow at all (start → mid →
end). RSS is judged where warm-up is over: over the second half, *mid → end*, it may grow by at
most ``RSS_SECOND_HALF_MB``, so a leak of ``RSS_SECOND_HALF_MB / requests in the second half``
bytes per request or more fails the test; the test prints that figure, and under CI requires
the second half to be long enough for it to be at most ``CI_CATCHES_BYTES`` per request.
start → end (allocator arenas and caches that CPython keeps after the first minutes of varied
traffic included) may grow by at most ``RSS_TOTAL_MB``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.reliability.figures import record
from tests.reliability.served import (
    GO,
    PY,
    TICKS,
    LoadStats,
    StandIn,
    leftover_plugins,
    query_body,
    run_load,
    serve_bridge,
    write_config,
)

SOAK_SECONDS = float(os.environ.get("BRIDGE_SOAK_SECONDS", "150" if IN_CI else "20"))
pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.timeout(SOAK_SECONDS + 150)]
WARM_UP_SECONDS = 4.0
RSS_SECOND_HALF_MB = 2.0
RSS_TOTAL_MB = 8.0
CI_CATCHES_BYTES = 128
WORKERS = 6
SUITE = "soak"
API = "/apis/aggregation.grafana.app/v0alpha1/dataplaneservices"


async def test_soak(go_fixture_binary: Path, tmp_path: Path) -> None:
    delegate, upstream = StandIn(), StandIn()
    await delegate.start()
    await upstream.start()
    config = write_config(
        tmp_path,
        plugins=(PY, GO),
        delegate=delegate.url,
        storage={"backend": "memory"},
        upstream=upstream.url,
    )
    mix: list[tuple[str, tuple[str, str, bytes | None]]] = [
        ("query py", ("POST", PY.query_path, query_body("py"))),
        ("query go", ("POST", GO.query_path, query_body("go"))),
        ("resource py", ("GET", PY.resource_path("echo?x=1"), None)),
        ("resource py stream", ("GET", PY.resource_path("stream?chunks=3"), None)),
        ("resource go", ("GET", GO.resource_path("echo/x"), None)),
        ("stream py", ("GET", PY.stream_path(TICKS), None)),
        ("proxy py route", ("GET", PY.proxy_path("api/v1/labels?x=1"), None)),
        ("proxy go", ("POST", GO.proxy_path("other/x"), b'{"q": 1}')),
        ("delegated", ("GET", "/api/search?query=x", None)),
        ("api read", ("GET", API, None)),
        ("health", ("GET", PY.query_path.replace("/query", "/health"), None)),
    ]
    stats = LoadStats()
    samples: list[str] = []
    try:
        async with serve_bridge(config, tmp_path) as bridge:

            async def load_for(seconds: float, phase: str) -> float:
                stop = asyncio.Event()
                load = asyncio.create_task(
                    run_load(
                        bridge.url,
                        mix,
                        stats,
                        stop,
                        workers=WORKERS,
                        deadline=10,
                        allowed=frozenset(),
                    )
                )
                started = time.monotonic()
                while time.monotonic() - started < seconds:
                    await asyncio.sleep(min(5.0, seconds))
                    live = await bridge.figures()
                    samples.append(
                        f"{phase} t={time.monotonic() - started:4.0f}s: "
                        f"rss {live['rss_mb']:.1f} MB, "
                        f"fds {live['fds']:.0f}, tasks {live['tasks']:.0f} (under load)"
                    )
                stop.set()
                await load
                return time.monotonic() - started

            async def idle_figures(than: dict[str, float] | None = None) -> dict[str, float]:
                figures = await bridge.settled_figures()
                for _ in range(10):  # in-flight work may still be draining
                    if than is None or all(figures[k] <= than[k] for k in ("tasks", "fds")):
                        break
                    figures = await bridge.settled_figures(quiet=0.5)
                return figures

            await load_for(WARM_UP_SECONDS, "warm-up")
            start = await idle_figures()
            sent_before = stats.sent
            took = await load_for(SOAK_SECONDS / 2, "first half")
            mid = await idle_figures(start)
            sent_mid = stats.sent
            took += await load_for(SOAK_SECONDS / 2, "second half")
            end = await idle_figures(mid)
            run = bridge.run
        left = await leftover_plugins(run)
    finally:
        await delegate.stop()
        await upstream.stop()

    sent = stats.sent - sent_before
    second_half = stats.sent - sent_mid
    catches = RSS_SECOND_HALF_MB * 2**20 / max(second_half, 1)
    total = {k: end[k] - start[k] for k in start}
    late = {k: end[k] - mid[k] for k in start}
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(stats.by_kind.items()))
    record(
        SUITE,
        f"{took:.0f}s of steady load, {WORKERS} workers: {sent} requests "
        f"({sent / took:.0f}/s), failed {len(stats.bad)}, longest {stats.longest:.2f}s",
    )
    record(SUITE, f"by kind (warm-up included): {kinds}")
    for line in samples[-3:]:
        record(SUITE, line)
    record(
        SUITE,
        f"idle start -> mid -> end: rss {start['rss_mb']:.1f} -> {mid['rss_mb']:.1f} -> "
        f"{end['rss_mb']:.1f} MB, fds {start['fds']:.0f} -> {mid['fds']:.0f} -> "
        f"{end['fds']:.0f}, tasks {start['tasks']:.0f} -> {mid['tasks']:.0f} -> "
        f"{end['tasks']:.0f}; plugin processes after SIGTERM {left}",
    )
    record(
        SUITE,
        f"rss over the second half ({second_half} requests): {late['rss_mb']:+.2f} MB "
        f"(tolerance {RSS_SECOND_HALF_MB} MB: catches a leak of >= {catches:.0f} B/request); "
        f"start -> end {total['rss_mb']:+.2f} MB (tolerance {RSS_TOTAL_MB} MB)",
    )
    assert stats.bad == [], "\n".join(stats.bad[:20])
    assert mid["fds"] <= start["fds"] and end["fds"] <= start["fds"], (start, mid, end)
    assert mid["tasks"] <= start["tasks"] and end["tasks"] <= start["tasks"], (start, mid, end)
    assert late["rss_mb"] <= RSS_SECOND_HALF_MB, (mid, end)
    assert total["rss_mb"] <= RSS_TOTAL_MB, (start, end)
    if IN_CI:
        assert catches <= CI_CATCHES_BYTES, f"second half too short: {second_half} requests"
    assert left == 0
