"""Real ``grafana-bridge serve`` subprocesses for the multi-replica, crash and TLS tests.

Each bridge runs with a marker variable in its environment; plugins inherit it, so a test can
find every process a bridge started even after the bridge is gone. ``running_bridges`` tears
every bridge (and anything carrying its marker) down when the test ends, pass or fail.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml

from tests.bridge.conftest import dataplane_service
from tests.conftest import FIXTURE_PLUGINS
from tests.helpers import (
    GO_FIXTURE_ID,
    PY_FIXTURE_ID,
    free_port,
    kill_all,
    marked_processes,
    terminate,
    wait_gone,
    without_bridge_settings,
)

# Re-exported: the tests that run these processes import them from here.
__all__ = ["free_port", "wait_gone"]

GRAFANA_BRIDGE = Path(sys.executable).with_name("grafana-bridge")
MARK_VARIABLE = "GFB_TEST_BRIDGE_MARK"
ADMIN_TOKEN = "test-admin-token"
DPS_PATH = "/apis/aggregation.grafana.app/v0alpha1/dataplaneservices"


def write_bridge_config(
    directory: Path,
    port: int,
    *,
    storage: dict[str, Any],
    server: dict[str, Any] | None = None,
    auth_users: dict[str, Any] | None = None,
    plugins: dict[str, Any] | None = None,
    dataplane: dict[str, Any] | None = None,
    tokens: dict[str, str] | None = None,
) -> Path:
    """A bridge config like examples/quickstart.yaml: the fixture plugins, a token file.

    The token file holds ``ADMIN_TOKEN`` for ``admin``, plus ``tokens`` (token → login).
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'{ADMIN_TOKEN},admin,1001,"admins"']
    lines += [
        f"{token},{login},{2001 + i}" for i, (token, login) in enumerate((tokens or {}).items())
    ]
    tokens_file = directory / "tokens.csv"
    tokens_file.write_text("\n".join(lines) + "\n")
    tokens_file.chmod(0o600)
    datasources = directory / "provisioning" / "datasources"
    datasources.mkdir(parents=True, exist_ok=True)
    (datasources / "fixtures.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": 1,
                "datasources": [
                    {"name": "Python fixture", "type": PY_FIXTURE_ID, "uid": "pyfixture"},
                    {"name": "Go fixture", "type": GO_FIXTURE_ID, "uid": "gofixture"},
                ],
            }
        )
    )
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "shutdown_grace": 2, **(server or {})},
        "plugins": {
            "directories": [str(FIXTURE_PLUGINS)],
            "allow_unsigned": [GO_FIXTURE_ID, PY_FIXTURE_ID],
            "start_timeout": 20,
            "stop_grace": 1,
            **(plugins or {}),
        },
        "provisioning": {"directories": [str(directory / "provisioning")]},
        "dataplane": {"auto_register": "none", "availability_resync": 1, **(dataplane or {})},
        "storage": storage,
        "auth": {
            "mode": "token",
            "token_file": str(tokens_file),
            "users": auth_users or {"admin": {"org_id": 1, "role": "Admin"}},
        },
        "logging": {"level": "info"},
    }
    path = directory / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dataplaneservice(group: str, plugin_id: str = PY_FIXTURE_ID) -> dict[str, Any]:
    """A ``v0alpha1`` DataPlaneService for ``group`` with one ``route`` service."""
    return dataplane_service(plugin_id, group, services=({"type": "route"},))


def health_path(group: str, uid: str = "pyfixture") -> str:
    """A CheckHealth through the group's mount point (needs a provisioned datasource ``uid``)."""
    return f"/apis/{group}/v0alpha1/namespaces/default/datasources/{uid}/health"


class BridgeProcess:
    """One ``grafana-bridge serve -c config`` process, started and stopped by the test."""

    def __init__(
        self,
        config: Path,
        *,
        port: int,
        ca_file: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.port = port
        self.mark = uuid.uuid4().hex
        self.log_path = config.parent / f"bridge-{self.mark[:8]}.log"
        self.ca_file = ca_file
        self.extra_env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.ssl: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=ca_file) if ca_file is not None else True
        )

    @property
    def url(self) -> str:
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        env = without_bridge_settings(**self.extra_env, **{MARK_VARIABLE: self.mark})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(GRAFANA_BRIDGE), "serve", "-c", str(self.config)],
                cwd=self.config.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def plugin_processes(self) -> list[psutil.Process]:
        own = self.process.pid if self.process is not None else -1
        return [p for p in marked_processes(MARK_VARIABLE, self.mark) if p.pid != own]

    def kill(self) -> None:
        """SIGKILL, as the kernel's OOM killer or ``kill -9`` would end it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; then nothing carrying the marker is left."""
        if self.process is not None:
            terminate(self.process, 10)
        kill_all(marked_processes(MARK_VARIABLE, self.mark))

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 45.0) -> float:
        """Poll ``/readyz`` until 200; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"bridge exited with {self.process.returncode}:\n{self.log}")
            try:
                async with session.get(f"{self.url}/readyz", ssl=self.ssl) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (aiohttp.ClientConnectionError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"bridge not ready within {timeout}s:\n{self.log}")

    async def request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        *,
        json: Any = None,
        token: str | None = ADMIN_TOKEN,
        timeout: float = 10.0,
        content_type: str | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        async with session.request(
            method,
            f"{self.url}{path}",
            json=json,
            headers=headers,
            ssl=self.ssl,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            body: Any = await response.text()
            if response.content_type == "application/json":
                body = await response.json(content_type=None)
            return response.status, body


@contextmanager
def running_bridges() -> Iterator[list[BridgeProcess]]:
    """A list the test appends its bridges to; each is stopped at the end, pass or fail."""
    bridges: list[BridgeProcess] = []
    try:
        yield bridges
    finally:
        for bridge in bridges:
            bridge.stop()


async def spawn_serve(
    config: Path, *, cwd: Path, log_path: Path, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, str]:
    """``grafana-bridge serve -c config`` as an asyncio subprocess in ``cwd``, its output to
    ``log_path``; the process and its base URL (from the config's ``server.listen``, https
    when ``server.tls_cert`` is set)."""
    server = yaml.safe_load(config.read_text())["server"]
    listen, scheme = server["listen"], "https" if server.get("tls_cert") else "http"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(GRAFANA_BRIDGE),
            "serve",
            "-c",
            str(config),
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    return process, f"{scheme}://{listen}"
