"""A running standard bridge for the hostile-input HTTP suites, and a raw HTTP/1.1 client.

Why a thread: hypothesis calls a test function once per example and has no notion of an event
loop, while the bridge (aiohttp, grpc.aio) lives on one. So the bridge — the front-door suite's
standard scene: both fixture plugins plus a third that reports itself unhealthy, a stand-in
Grafana as delegate — runs on an event loop of its own in a background thread, started once per
module (a module-scoped fixture, which hypothesis accepts without any health-check
suppression), and the hypothesis tests are plain synchronous functions that talk to it over
real sockets.

Why raw sockets: aiohttp's and http.client's request builders normalise or refuse exactly the
hostile things under test (control characters, non-ASCII bytes, duplicated or oversized
headers, ``..`` segments). :func:`send` writes the request bytes as given and parses the answer
with ``http.client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator, Mapping
from concurrent.futures import Future
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from tests.bridge.conftest import PY_GROUP, Scene, standard_scene, token_for
from tests.helpers import open_fds, zombies
from tests.reliability.figures import record

T = TypeVar("T")
READ_TIMEOUT = 15.0
QUERY_PATH = f"/apis/{PY_GROUP}/v0alpha1/namespaces/default/datasources/py/query"
ADMIN = f"Bearer {token_for('admin')}"


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_status(self) -> bool:
        """A Kubernetes Status object (the bridge's error answer)."""
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        try:
            doc = self.json()
        except ValueError:
            return False
        return isinstance(doc, dict) and doc.get("kind") == "Status"


class NoAnswer(AssertionError):
    """The server closed the connection or let it hang without an HTTP answer."""


def request_bytes(
    method: str,
    target: bytes | str,
    *,
    headers: list[tuple[bytes | str, bytes | str]] | None = None,
    body: bytes = b"",
    authorization: str | None = ADMIN,
) -> bytes:
    def raw(value: bytes | str) -> bytes:
        return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")

    lines = [raw(method) + b" " + raw(target) + b" HTTP/1.1", b"Host: 127.0.0.1"]
    if authorization is not None:
        lines.append(b"Authorization: " + raw(authorization))
    for name, value in headers or []:
        lines.append(raw(name) + b": " + raw(value))
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def send(port: int, data: bytes) -> Reply:
    """Send ``data`` as is on a fresh connection; the parsed answer, or :class:`NoAnswer`."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        # The server may answer (and close) before reading everything.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            body = response.read()
        except (http.client.HTTPException, ConnectionResetError, TimeoutError) as exc:
            raise NoAnswer(f"no HTTP answer to {data[:200]!r}: {exc!r}") from exc
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Reply(response.status, headers, body)


@dataclass
class Baseline:
    fds: int
    tasks: int
    plugin_pids: frozenset[int]


@dataclass
class RunningBridge:
    """The standard scene on a background event loop, and what each suite counted."""

    loop: asyncio.AbstractEventLoop
    scene: Scene
    port: int
    suite: str
    tried: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def count(self, kind: str, outcome: str) -> None:
        self.tried[kind] += 1
        self.outcomes[kind, outcome] += 1

    def send(self, data: bytes) -> Reply:
        return send(self.port, data)

    def tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        return self.run(count())

    def plugin_pids(self) -> frozenset[int]:
        return frozenset(
            s.pid for s in self.scene.door.bridge.host.registry.statuses() if s.pid is not None
        )

    def baseline(self) -> Baseline:
        return Baseline(open_fds(), self.tasks(), self.plugin_pids())

    def normal_query(self) -> Reply:
        body = {
            "from": "now-1h",
            "to": "now",
            "queries": [{"refId": "A", "datasource": {"uid": "py"}, "points": 2}],
        }
        return self.send(request_bytes("POST", QUERY_PATH, body=json.dumps(body).encode()))

    def check_nothing_leaked(self, before: Baseline) -> None:
        """Tasks and fds back at the baseline, the same plugin processes, no zombies."""
        deadline = time.monotonic() + 10
        while True:
            now = self.baseline()
            settled = now.tasks <= before.tasks and now.fds <= before.fds
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        record(
            self.suite,
            f"after the suite: tasks {before.tasks} -> {now.tasks}, fds {before.fds} -> "
            f"{now.fds}, plugin processes restarted "
            f"{len(before.plugin_pids - now.plugin_pids)}, zombies {len(zombies())}",
        )
        assert now.tasks <= before.tasks, f"asyncio tasks leaked: {before.tasks} -> {now.tasks}"
        assert now.fds <= before.fds, f"fds leaked: {before.fds} -> {now.fds}"
        assert now.plugin_pids == before.plugin_pids, "a plugin process was restarted"
        assert all(psutil.pid_exists(pid) for pid in now.plugin_pids)
        assert zombies() == []
        answer = self.normal_query()
        assert answer.status == 200, answer.body[:500]
        assert answer.json()["results"]["A"]["frames"]

    def report(self) -> None:
        for kind in sorted(self.tried):
            outcomes = ", ".join(
                f"{o} {n}" for (k, o), n in sorted(self.outcomes.items()) if k == kind
            )
            record(self.suite, f"{kind}: {self.tried[kind]} cases ({outcomes})")


def running_bridge(suite: str) -> Iterator[RunningBridge]:
    """The body of a module-scoped fixture: start, yield, check for leaks, report, stop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=f"bridge-{suite}", daemon=True)
    thread.start()
    stack = AsyncExitStack()
    root = Path(tempfile.mkdtemp(prefix="gfb-hostile-"))

    async def start() -> Scene:
        return await stack.enter_async_context(standard_scene(root))

    try:
        scene = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        port = int(scene.door.url.rsplit(":", 1)[1])
        bridge = RunningBridge(loop, scene, port, suite)
        assert bridge.normal_query().status == 200
        before = bridge.baseline()
        yield bridge
        bridge.report()
        bridge.check_nothing_leaked(before)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
