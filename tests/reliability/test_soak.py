"""Soak: steady load through a real ``grafana-bridge serve`` process; the bridge must not grow.

The bridge (subprocess, both fixture plugins, a stand-in Grafana as delegate) gets a warm-up
of load, then the bridge's RSS, open fds and asyncio tasks are taken from its /metrics with no
load running (connections closed, in-flight work drained); then steady load for
``BRIDGE_SOAK_SECONDS`` (default 20; set e.g. 600 for a long run), then the same figures again.

Tolerances (docs/reliability.md): fds and asyncio tasks must not grow at all; RSS may grow by at
most ``RSS_TOLERANCE_MB`` (allocator arenas and caches that a CPython process keeps after the
first minutes of varied traffic; a leak of a few hundred bytes per request exceeds it within
the CI run's ~10^4 requests).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.reliability.figures import record
from tests.reliability.served import (
    GO,
    PY,
    LoadStats,
    StandIn,
    leftover_plugins,
    query_body,
    run_load,
    serve_bridge,
    write_config,
)

SOAK_SECONDS = float(os.environ.get("BRIDGE_SOAK_SECONDS", "20"))
pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.timeout(SOAK_SECONDS + 120)]
WARM_UP_SECONDS = 4.0
RSS_TOLERANCE_MB = 8.0
WORKERS = 6
SUITE = "soak"
API = "/apis/aggregation.grafana.app/v0alpha1/dataplaneservices"


async def test_soak(go_fixture_binary: Path, tmp_path: Path) -> None:
    delegate = StandIn()
    await delegate.start()
    config = write_config(
        tmp_path, plugins=(PY, GO), delegate=delegate.url, storage={"backend": "memory"}
    )
    mix: list[tuple[str, tuple[str, str, bytes | None]]] = [
        ("query py", ("POST", PY.query_path, query_body("py"))),
        ("query go", ("POST", GO.query_path, query_body("go"))),
        ("resource py", ("GET", PY.resource_path("echo?x=1"), None)),
        ("resource py stream", ("GET", PY.resource_path("stream?chunks=3"), None)),
        ("resource go", ("GET", GO.resource_path("echo/x"), None)),
        ("delegated", ("GET", "/api/search?query=x", None)),
        ("api read", ("GET", API, None)),
        ("health", ("GET", PY.query_path.replace("/query", "/health"), None)),
    ]
    stats = LoadStats()
    samples: list[str] = []
    try:
        async with serve_bridge(config, tmp_path) as bridge:

            async def load_for(seconds: float) -> None:
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
                        f"t={time.monotonic() - started:5.0f}s rss {live['rss_mb']:.1f} MB, "
                        f"fds {live['fds']:.0f}, tasks {live['tasks']:.0f} (under load)"
                    )
                stop.set()
                await load

            await load_for(WARM_UP_SECONDS)
            start = await bridge.settled_figures()
            warm_sent = stats.sent
            began = time.monotonic()
            await load_for(SOAK_SECONDS)
            took = time.monotonic() - began
            end = await bridge.settled_figures()
            for _ in range(10):  # in-flight work may still be draining
                if end["tasks"] <= start["tasks"] and end["fds"] <= start["fds"]:
                    break
                end = await bridge.settled_figures(quiet=0.5)
            run = bridge.run
        left = await leftover_plugins(run)
    finally:
        await delegate.stop()

    sent = stats.sent - warm_sent
    growth = {k: end[k] - start[k] for k in start}
    record(
        SUITE,
        f"{took:.0f}s of steady load, {WORKERS} workers: {sent} requests "
        f"({sent / took:.0f}/s), failed {len(stats.bad)}, longest {stats.longest:.2f}s",
    )
    for line in samples[-3:]:
        record(SUITE, line)
    record(
        SUITE,
        f"start -> end (idle, after warm-up): rss {start['rss_mb']:.1f} -> {end['rss_mb']:.1f} MB "
        f"({growth['rss_mb']:+.1f}, tolerance {RSS_TOLERANCE_MB}), fds {start['fds']:.0f} -> "
        f"{end['fds']:.0f} ({growth['fds']:+.0f}), tasks {start['tasks']:.0f} -> "
        f"{end['tasks']:.0f} ({growth['tasks']:+.0f}); plugin processes after SIGTERM {left}",
    )
    assert stats.bad == [], "\n".join(stats.bad[:20])
    assert growth["fds"] <= 0, (start, end)
    assert growth["tasks"] <= 0, (start, end)
    assert growth["rss_mb"] <= RSS_TOLERANCE_MB, (start, end)
    assert left == 0
