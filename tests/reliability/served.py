"""A real ``grafana-bridge serve`` subprocess for the chaos and soak suites, and a load generator.

The bridge runs as an operator runs it: its own process, a YAML config, the fixture plugins as
its children, token authentication, provisioning and DataPlaneService manifests on disk. Each
plugin gets ``RELIABILITY_PLUGIN=<id>`` in its environment, so the suites can find (and signal)
one plugin's process — and, after the bridge is gone, prove no plugin outlived it.

The bridge's own figures come from its ``/metrics``: ``process_open_fds``,
``process_resident_memory_bytes`` and ``grafana_bridge_asyncio_tasks``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from tests.bridge.bridge_process import spawn_serve
from tests.bridge.conftest import (
    USERS,
    dataplane_service,
    datasource,
    free_port,
    python_fixture_as,
    sample,
    token_for,
    write_datasources,
    write_manifest,
    write_token_file,
)
from tests.conftest import FIXTURE_PLUGINS
from tests.helpers import marked_processes, terminate_async, without_bridge_settings

MARK = "RELIABILITY_PLUGIN"
RUN_MARK = "RELIABILITY_RUN"
ADMIN = {"Authorization": f"Bearer {token_for('admin')}"}
VERSION = "v0alpha1"


@dataclass(frozen=True)
class PluginDef:
    plugin_id: str
    uid: str
    group: str
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def query_path(self) -> str:
        return f"/apis/{self.group}/{VERSION}/namespaces/default/datasources/{self.uid}/query"

    def resource_path(self, rest: str) -> str:
        return f"/apis/{self.group}/{VERSION}/namespaces/default/datasources/{self.uid}/resource/{rest}"

    def stream_path(self, channel: str) -> str:
        return f"/apis/{self.group}/{VERSION}/namespaces/default/datasources/{self.uid}/stream/{channel}"

    def proxy_path(self, rest: str) -> str:
        return (
            f"/apis/{self.group}/{VERSION}/namespaces/default/datasources/{self.uid}/proxy/{rest}"
        )


PY = PluginDef("bridge-pyfixture-datasource", "py", "pyfixture.datasource.grafana.app")
GO = PluginDef("bridge-gofixture-datasource", "go", "gofixture.datasource.grafana.app")
# Every plugin serves queries, resources, Live streams and the datasource proxy (to the
# ``upstream`` URL its provisioned datasource points at).
SERVICES = ({"type": "query"}, {"type": "route"}, {"type": "stream"}, {"type": "datasource-proxy"})
# A Live stream of the fixtures: the subscribe answer's data at once, then a tick every 50 ms.
TICKS = "ticks/load?data=%7B%22intervalMs%22%3A50%7D"


def query_body(uid: str) -> bytes:
    return json.dumps(
        {
            "from": "now-1h",
            "to": "now",
            "queries": [{"refId": "A", "datasource": {"uid": uid}, "maxDataPoints": 5}],
        }
    ).encode()


def write_config(
    root: Path,
    *,
    plugins: tuple[PluginDef, ...],
    delegate: str | None,
    storage: Mapping[str, Any],
    plugin_settings: Mapping[str, Any] | None = None,
    upstream: str | None = None,
    log_level: str = "info",
) -> Path:
    """A bridge config in ``root``; Python-fixture copies are made for ids other than PY/GO.

    ``upstream``: the URL every provisioned datasource points at (its datasource proxy's
    destination). ``log_level``: the bridge's ``logging.level`` (``info`` is its default).
    """
    extra_dir = root / "plugins"
    extra_dir.mkdir(exist_ok=True)
    for plugin in plugins:
        if plugin.plugin_id not in (PY.plugin_id, GO.plugin_id):
            python_fixture_as(extra_dir, plugin.plugin_id)
    # The fixtures' plugin.json routes (``api``, ``admin``) point at ``{{.JsonData.url}}``.
    json_data = {"url": upstream} if upstream is not None else None
    entries = [datasource(p.plugin_id, p.uid, json_data=json_data) for p in plugins]
    if upstream is not None:
        for entry in entries:
            entry["url"] = upstream
            entry["secureJsonData"] = {"apiToken": "upstream-secret"}
    write_datasources(root / "provisioning", *entries)
    write_manifest(
        root / "dataplane",
        "services.yaml",
        *(dataplane_service(p.plugin_id, p.group, services=SERVICES) for p in plugins),
    )
    env = {p.plugin_id: {**p.env, MARK: p.plugin_id} for p in plugins}
    config = {
        "server": {"listen": f"127.0.0.1:{free_port()}", "shutdown_grace": 3},
        "plugins": {
            "directories": [str(FIXTURE_PLUGINS), str(extra_dir)],
            "allow_unsigned": [p.plugin_id for p in plugins],
            "start_timeout": 20,
            "stop_grace": 1,
            "env": env,
            **(plugin_settings or {}),
        },
        "auth": {
            "mode": "token",
            "token_file": str(write_token_file(root)),
            "users": {name: dict(grant) for name, grant in USERS.items()},
        },
        "provisioning": {"directories": [str(root / "provisioning")]},
        "dataplane": {"manifests": [str(root / "dataplane")], "auto_register": "none"},
        "delegate": {"url": delegate, "connect_timeout": 1, "read_timeout": 5},
        "storage": dict(storage),
        "logging": {"level": log_level},
    }
    path = root / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def marked(run: str) -> list[psutil.Process]:
    """Live processes (zombies excluded) of this run: the bridge's plugins carry ``run``."""
    return marked_processes(RUN_MARK, run)


@dataclass
class ServedBridge:
    process: asyncio.subprocess.Process
    url: str
    run: str
    log_path: Path
    session: aiohttp.ClientSession

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def plugin_process(self, plugin_id: str) -> psutil.Process:
        for process in marked(self.run):
            try:
                if process.environ().get(MARK) == plugin_id:
                    return process
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no live process for {plugin_id}")

    def plugin_processes(self) -> list[psutil.Process]:
        return [p for p in marked(self.run) if p.pid != self.process.pid]

    def zombie_children(self) -> list[int]:
        """The bridge's child processes that exited and were never reaped (must be none).

        ``marked`` skips zombies, so this asks the bridge's own process tree.
        """
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    found.append(child.pid)
            except psutil.NoSuchProcess:
                continue
        return found

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                raise AssertionError(f"bridge exited {self.process.returncode}:\n{self.log}")
            try:
                async with self.session.get(f"{self.url}/readyz?verbose") as response:
                    if response.status == 200 and "-]plugin" not in await response.text():
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"bridge not ready within {timeout}s:\n{self.log}")

    async def figures(self) -> dict[str, float]:
        """The bridge's own fds, RSS and asyncio tasks, from its /metrics."""
        async with self.session.get(f"{self.url}/metrics") as response:
            text = await response.text()
        found = {
            "fds": sample(text, "process_open_fds"),
            "rss_mb": sample(text, "process_resident_memory_bytes"),
            "tasks": sample(text, "grafana_bridge_asyncio_tasks"),
        }
        assert all(v is not None for v in found.values()), found
        values = {k: float(v or 0) for k, v in found.items()}
        values["rss_mb"] /= 2**20
        return values

    async def settled_figures(self, *, quiet: float = 1.0, samples: int = 5) -> dict[str, float]:
        """Figures with no load running, after in-flight work drained: the lowest of a few."""
        await asyncio.sleep(quiet)
        taken = [await self.figures() for _ in range(samples)]
        await asyncio.sleep(0)
        return {k: min(t[k] for t in taken) for k in taken[0]}


@asynccontextmanager
async def serve_bridge(config: Path, root: Path) -> AsyncIterator[ServedBridge]:
    """``grafana-bridge serve -c config``; SIGTERM at the end, and no plugin may outlive it."""
    run = uuid.uuid4().hex
    log_path = root / "bridge.log"
    process, url = await spawn_serve(
        config, cwd=root, log_path=log_path, env=without_bridge_settings(**{RUN_MARK: run})
    )
    timeout = aiohttp.ClientTimeout(total=15)
    # No keep-alive for probes and scrapes: an idle pooled connection is a live task and fd in
    # the bridge, which would blur the leak figures. The load brings its own session.
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            bridge = ServedBridge(process, url, run, log_path, session)
            await bridge.wait_ready()
            yield bridge
    finally:
        await terminate_async(process, 20)


async def leftover_plugins(run: str, timeout: float = 5.0) -> int:
    """Plugin processes of ``run`` still alive after the bridge exited (must be 0)."""
    for _ in range(int(timeout / 0.1)):
        if not marked(run):
            return 0
        await asyncio.sleep(0.1)
    return len(marked(run))


# -- load --------------------------------------------------------------------------------------

Request = tuple[str, str, bytes | None]  # method, path, body
# What a request may end with besides success: a Kubernetes Status with one of these codes
# (issue #6: "success, or 503/504 Status"). A 503 must carry Retry-After.
UNAVAILABLE = frozenset({503, 504})
# Events an SSE subscriber reads before it closes: the subscribe answer and one tick.
SSE_EVENTS = 2


@dataclass
class LoadStats:
    sent: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    longest: float = 0.0
    longest_what: str = ""
    bad: list[str] = field(default_factory=list)
    # SIGKILLs of a plugin during the load: (uid, monotonic time). A streamed answer of that
    # plugin cut short is honest only when such a kill fell inside the request.
    kills: list[tuple[str, float]] = field(default_factory=list)

    @property
    def succeeded(self) -> int:
        return sum(n for code, n in self.by_code.items() if code.startswith("2"))

    def killed(self, uid: str) -> None:
        self.kills.append((uid, time.monotonic()))

    def killed_during(self, uid: str, started: float, ended: float) -> bool:
        return any(u == uid and started <= at <= ended for u, at in self.kills)


async def _read_events(reply: aiohttp.ClientResponse, wanted: int) -> int:
    """Read an SSE answer until ``wanted`` events (heartbeats aside) or its end; the count."""
    events = 0
    buffer = b""
    async for chunk in reply.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            if block.startswith(b"event: end"):
                return events
            if not block.startswith(b":"):
                events += 1
        if events >= wanted:
            return events
    return events


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    kind: str,
    request: Request,
    stats: LoadStats,
    *,
    deadline: float,
    allowed: frozenset[int] = UNAVAILABLE,
) -> int | None:
    """Send one request; count it; record anything but success or an allowed Status.

    A ``stream …`` kind subscribes over SSE, reads the subscribe answer and one tick, and
    closes the connection (a subscriber going away). The plugin's uid is the second word of
    ``kind`` (``resource py``).
    """
    method, path, body = request
    headers = {**ADMIN, "Content-Type": "application/json"} if body else ADMIN
    uid = kind.split()[1] if " " in kind else ""
    started = time.monotonic()
    stats.sent += 1
    stats.by_kind[kind] += 1
    code: int | None = None
    try:
        async with asyncio.timeout(deadline):
            async with session.request(method, url + path, data=body, headers=headers) as reply:
                code = reply.status
                if kind.startswith("stream") and code == 200:
                    await _read_events(reply, SSE_EVENTS)
                    reply.close()  # the subscriber leaves
                    payload = b""
                else:
                    payload = await reply.read()
        if not 200 <= code < 300:
            doc: Any = json.loads(payload) if payload.startswith(b"{") else None
            is_status = isinstance(doc, dict) and doc.get("kind") == "Status"
            if code not in allowed or not is_status or b"Traceback" in payload:
                stats.bad.append(f"{kind} {method} {path}: {code} {payload[:200]!r}")
            elif code == 503 and not reply.headers.get("Retry-After"):
                stats.bad.append(f"{kind} {method} {path}: 503 without Retry-After")
        stats.by_code[str(code)] += 1
    except TimeoutError:
        stats.by_code["hung"] += 1
        stats.bad.append(f"{kind} {method} {path}: no answer within {deadline}s")
    except aiohttp.ClientPayloadError as exc:
        # A resource answer is streamed: once its status line is out, a plugin killed
        # mid-answer can only have its body cut short (the bridge closes the connection, as
        # Grafana does) — never a truncated body passed off as complete, and never otherwise.
        ended = time.monotonic()
        if (
            kind.startswith("resource")
            and code is not None
            and code < 300
            and stats.killed_during(uid, started, ended)
        ):
            stats.by_code["cut short (plugin killed mid-answer)"] += 1
        else:
            stats.by_code["cut short"] += 1
            stats.bad.append(f"{kind} {method} {path}: {code}, then {exc!r}")
    except aiohttp.ClientError as exc:
        stats.by_code["connection error"] += 1
        stats.bad.append(f"{kind} {method} {path}: {exc!r}")
    took = time.monotonic() - started
    if took > stats.longest:
        stats.longest, stats.longest_what = took, f"{kind} ({code})"
    return code


async def run_load(
    url: str,
    mix: list[tuple[str, Request]],
    stats: LoadStats,
    stop: asyncio.Event,
    *,
    workers: int,
    deadline: float,
    pause: float = 0.0,
    allowed: frozenset[int] = UNAVAILABLE,
) -> None:
    """``workers`` loops sending the ``mix`` round-robin until ``stop`` is set.

    They share one keep-alive session, closed at the end so that the bridge's connection
    handlers for it end too before anyone counts tasks and fds.
    """

    async def worker(session: aiohttp.ClientSession, offset: int) -> None:
        index = offset
        while not stop.is_set():
            kind, request = mix[index % len(mix)]
            index += 1
            await one_request(
                session, url, kind, request, stats, deadline=deadline, allowed=allowed
            )
            if pause:
                await asyncio.sleep(pause)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, i) for i in range(workers)))


async def recovery_time(
    check: Callable[[], Awaitable[bool]], *, since: float, timeout: float = 30.0
) -> float:
    """Seconds from ``since`` until ``check`` first holds."""
    while not await check():
        if time.monotonic() - since > timeout:
            raise AssertionError(f"not recovered within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - since


class StandIn:
    """A stand-in Grafana (``standin.py``) on a fixed port, as a process: stop and start it."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.reliability.standin",
            str(self.port),
            cwd=Path(__file__).resolve().parents[2],
            stdin=asyncio.subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise AssertionError("the stand-in Grafana did not start")

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            await terminate_async(process, 5)
