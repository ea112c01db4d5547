"""Graceful shutdown of the real ``grafana-bridge serve`` process with a request in flight.

On SIGTERM the bridge stops accepting connections, lets the request finish within
``server.shutdown_grace``, stops its plugins and exits 0. The process is run as
tests/bridge/test_serve.py runs it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.bridge.conftest import (
    GO,
    PY,
    PY_GROUP,
    USERS,
    VERSION,
    WAIT,
    auth_headers,
    dataplane_service,
    datasource,
    eventually,
    free_port,
    write_datasources,
    write_manifest,
    write_token_file,
)
from tests.bridge.test_serve import run_bridge
from tests.conftest import FIXTURE_PLUGINS

pytestmark = [pytest.mark.go, pytest.mark.slow]

GRACE = 5.0


def write_config(root: Path, port: int) -> Path:
    write_datasources(root / "provisioning", datasource(PY, "py"))
    write_manifest(root / "dataplane", "python.yaml", dataplane_service(PY, PY_GROUP))
    config = {
        "server": {"listen": f"127.0.0.1:{port}", "shutdown_grace": GRACE},
        "plugins": {
            "directories": [str(FIXTURE_PLUGINS)],
            "allow_unsigned": [GO, PY],
            "start_timeout": 15,
            "stop_grace": 1,
        },
        "auth": {
            "mode": "token",
            "token_file": str(write_token_file(root)),
            "users": {name: dict(grant) for name, grant in USERS.items()},
        },
        "provisioning": {"directories": [str(root / "provisioning")]},
        "dataplane": {"manifests": [str(root / "dataplane")]},
    }
    path = root / "bridge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def refuses_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (ConnectionRefusedError, ConnectionResetError):
        # A connection that reached the backlog as the listener closed is reset, not refused.
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(
    tmp_path: Path, go_fixture_binary: Path
) -> None:
    port = free_port()
    stream = (
        f"/apis/{PY_GROUP}/{VERSION}/namespaces/default/datasources/py/"
        "resource/stream?chunks=5&delay_ms=300"
    )
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with (
        run_bridge(write_config(tmp_path, port), tmp_path) as serve,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        await serve.wait_ready(session)
        async with session.get(serve.url + stream, headers=auth_headers("admin")) as response:
            assert response.status == 200
            assert await response.content.readline() == b"chunk 0\n"

            serve.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await eventually(lambda: refuses_connections(port), what="the listener closes")
            assert not response.content.at_eof()

            assert await response.content.read() == b"chunk 1\nchunk 2\nchunk 3\nchunk 4\n"
        assert time.monotonic() - signalled < GRACE
        assert await serve.wait_exit() == 0, serve.log
        assert "Traceback" not in serve.log
