"""``grafana-bridge serve`` end to end: the real process, the fixture plugins, signals, failures."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.bridge.bridge_process import spawn_serve
from tests.conftest import FIXTURE_PLUGINS
from tests.helpers import (
    GO_FIXTURE_ID,
    PY_FIXTURE_ID,
    free_port,
    marked_processes,
    wait_gone,
    without_bridge_settings,
)

# Set in the bridge's environment; plugins inherit it, so this test's plugins can be told apart
# from any other plugin process on the machine, even after the bridge is gone.
MARK_VARIABLE = "GFB_TEST_SERVE_MARK"

# fixtures/plugins is only complete once the Go fixture's binary is there.
pytestmark = [pytest.mark.go, pytest.mark.slow, pytest.mark.usefixtures("go_fixture_binary")]


def write_config(tmp_path: Path, port: int, **plugins: Any) -> Path:
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "shutdown_grace": 2},
        "plugins": {
            "directories": [str(FIXTURE_PLUGINS)],
            "allow_unsigned": [GO_FIXTURE_ID, PY_FIXTURE_ID],
            "start_timeout": 15,
            "stop_grace": 1,
            **plugins,
        },
        "logging": {"level": "info"},
    }
    path = tmp_path / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Bridge:
    process: asyncio.subprocess.Process
    url: str
    mark: str
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def plugin_processes(self) -> list[psutil.Process]:
        return [p for p in marked_processes(MARK_VARIABLE, self.mark) if p.pid != self.process.pid]

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        """Poll ``/readyz`` until 200; the port refuses connections while plugins start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                pytest.fail(f"bridge exited with {self.process.returncode}:\n{self.log}")
            try:
                async with session.get(f"{self.url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
        pytest.fail(f"bridge not ready within {timeout}s:\n{self.log}")

    async def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"{text!r} not logged within {timeout}s:\n{self.log}")

    async def wait_exit(self, timeout: float = 10.0) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"bridge still running {timeout}s after the signal:\n{self.log}")


@asynccontextmanager
async def run_bridge(config: Path, tmp_path: Path) -> AsyncIterator[Bridge]:
    """``grafana-bridge serve -c config``; killed (and its plugins with it) if a test leaves it."""
    mark = uuid.uuid4().hex
    log_path = tmp_path / "bridge.log"
    process, url = await spawn_serve(
        config,
        cwd=tmp_path,
        log_path=log_path,
        env=without_bridge_settings(**{MARK_VARIABLE: mark}),
    )
    try:
        yield Bridge(process, url, mark, log_path)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_for_plugin_processes(bridge: Bridge, count: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = bridge.plugin_processes()
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    pytest.fail(f"expected {count} plugin processes:\n{bridge.log}")


def socket_root(plugin: psutil.Process) -> Path:
    """The bridge's private directory for plugin sockets (each plugin's TMPDIR is inside)."""
    return Path(plugin.environ()["TMPDIR"]).parent


async def assert_gone(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    assert await wait_gone(processes, timeout) == []


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


# -- serving ---------------------------------------------------------------------------------


def _status(code: int, reason: str) -> Callable[[str], None]:
    def check(body: str) -> None:
        status = json.loads(body)
        assert status["kind"] == "Status"
        assert status["apiVersion"] == "v1"
        assert status["status"] == "Failure"
        assert (status["code"], status["reason"]) == (code, reason)
        assert status["message"]

    return check


def _equals(expected: str) -> Callable[[str], None]:
    def check(body: str) -> None:
        assert body == expected

    return check


def _metrics(family: str) -> Callable[[str], None]:
    def check(body: str) -> None:
        assert family in {f.name for f in text_string_to_metric_families(body)}

    return check


VERBOSE = (
    "[+]plugins-started ok\n"
    "[+]routes-loaded ok\n"
    f"[+]plugin-{GO_FIXTURE_ID} ok\n"
    f"[+]plugin-{PY_FIXTURE_ID} ok\n"
    "{} check passed\n"
)

# method, path, status, content type, body check: one row per behaviour.
ROUTES: list[tuple[str, str, int, str, Callable[[str], None]]] = [
    ("GET", "/livez", 200, "text/plain", _equals("ok")),
    ("GET", "/readyz", 200, "text/plain", _equals("ok")),
    ("GET", "/healthz", 200, "text/plain", _equals("ok")),
    ("GET", "/readyz?verbose", 200, "text/plain", _equals(VERBOSE.format("readyz"))),
    ("GET", "/healthz?verbose", 200, "text/plain", _equals(VERBOSE.format("healthz"))),
    ("GET", f"/metrics/plugins/{GO_FIXTURE_ID}", 200, "text/plain", _metrics("gofixture_requests")),
    ("GET", f"/metrics/plugins/{PY_FIXTURE_ID}", 200, "text/plain", _metrics("pyfixture_up")),
    ("GET", "/metrics/plugins/no-such-plugin", 404, "application/json", _status(404, "NotFound")),
    ("GET", "/metrics/plugins/", 404, "application/json", _status(404, "NotFound")),
    ("GET", "/no/such/path", 404, "application/json", _status(404, "NotFound")),
    ("POST", "/livez", 405, "application/json", _status(405, "MethodNotAllowed")),
]


async def test_serves_health_and_metrics_then_stops_on_sigterm(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with run_bridge(write_config(tmp_path, free_port()), tmp_path) as bridge:
        await bridge.wait_ready(session)

        for method, path, status, content_type, check in ROUTES:
            async with session.request(method, bridge.url + path) as response:
                body = await response.text()
                assert (method, path, response.status) == (method, path, status), body
                assert response.content_type == content_type, path
                check(body)

        # The plugin's text is passed on unchanged: the plugin's own counter shows our calls.
        url = f"{bridge.url}/metrics/plugins/{GO_FIXTURE_ID}"
        async with session.get(url) as response:
            assert response.charset == "utf-8"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            body = await response.text()
        assert body.startswith("# HELP gofixture_requests_total ")
        assert 'gofixture_requests_total{endpoint="collectMetrics"} 1\n' in body

        plugins = await wait_for_plugin_processes(bridge, 2)
        sockets = socket_root(plugins[0])
        assert sockets.is_dir()

        bridge.process.send_signal(signal.SIGTERM)
        assert await bridge.wait_exit() == 0, bridge.log
        await assert_gone(plugins)
        assert bridge.plugin_processes() == []
        # Removed by the host's orderly stop; a plugin merely killed with the bridge leaves it.
        assert not sockets.exists()
        assert "Traceback" not in bridge.log


async def test_sigint_stops_like_sigterm(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    async with run_bridge(write_config(tmp_path, free_port()), tmp_path) as bridge:
        await bridge.wait_ready(session)
        plugins = await wait_for_plugin_processes(bridge, 2)
        sockets = socket_root(plugins[0])

        bridge.process.send_signal(signal.SIGINT)
        assert await bridge.wait_exit() == 0, bridge.log
        await assert_gone(plugins)
        assert not sockets.exists()
        assert "Traceback" not in bridge.log
        assert "KeyboardInterrupt" not in bridge.log


async def test_sigterm_while_plugins_start_stops_them(tmp_path: Path) -> None:
    slow = {PY_FIXTURE_ID: {"FIXTURE_BEHAVIOUR": "slow_start=30"}}
    config = write_config(tmp_path, free_port(), start_timeout=40, env=slow)
    async with run_bridge(config, tmp_path) as bridge:
        # One plugin running, the other still before its handshake: startup is not finished.
        await bridge.wait_for_log(f"plugin {GO_FIXTURE_ID}: starting -> running")
        plugins = await wait_for_plugin_processes(bridge, 2)
        sockets = socket_root(plugins[0])

        bridge.process.send_signal(signal.SIGTERM)
        assert await bridge.wait_exit() == 0, bridge.log
        await assert_gone(plugins)
        assert not sockets.exists()
        assert f"plugin {PY_FIXTURE_ID}: stopping -> stopped" in bridge.log
        assert "Traceback" not in bridge.log


# -- failing to start ------------------------------------------------------------------------


async def test_bad_config_exits_2_before_listening(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port, start_timeout=-1)
    async with run_bridge(config, tmp_path) as bridge:
        assert await bridge.wait_exit() == 2
        assert bridge.log == (
            f"grafana-bridge: invalid config file {config}:\n"
            "  plugins.start_timeout: Input should be greater than 0 (got -1)\n"
        )
        assert bridge.plugin_processes() == []


async def test_address_in_use_fails_without_starting_plugins(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with run_bridge(write_config(tmp_path, port), tmp_path) as bridge:
            code = await bridge.wait_exit()
            assert code != 0
            assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in bridge.log
            assert "Traceback" not in bridge.log
            assert "starting" not in bridge.log
            assert bridge.plugin_processes() == []
