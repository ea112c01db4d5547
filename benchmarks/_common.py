"""What the benchmark scripts share: the fixtures, a ``grafana-bridge serve`` process and the
files it reads, a plugin started as the host starts it, load generation, percentiles, the
machine description, and Ctrl-C handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from plugin_host.client import BackendClient, open_channel
from plugin_host.handshake import GrafanaIdentity, build_environment
from plugin_host.process import PluginProcess
from tests.bridge.conftest import dataplane_service
from tests.helpers import free_port, terminate

# Re-exported for the scripts, with the rest of what this module defines.
__all__ = ["free_port"]

ROOT = Path(__file__).resolve().parent.parent
GRAFANA_BRIDGE = ROOT / ".venv" / "bin" / "grafana-bridge"
BUILD_SCRIPT = ROOT / "scripts" / "build_go_fixture.py"
PY_FIXTURE = ROOT / "fixtures" / "plugins" / "python-datasource" / "gpx_pyfixture_linux_amd64"
GO_PLUGIN_ID = "bridge-gofixture-datasource"
PY_PLUGIN_ID = "bridge-pyfixture-datasource"
TOKEN = "bench-token"

START_TIMEOUT = 30.0
CALL_TIMEOUT = 10.0
STOP_GRACE = 2.0  # the host's default, as go-plugin's


class BenchmarkError(Exception):
    """The benchmark cannot run or a plugin misbehaved; the message says why."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM arrived."""


class StopFlag:
    """Set by SIGINT and SIGTERM, which also cancel the main task at once.

    A cancellation can be absorbed on its way (``PluginProcess.stop`` on Python 3.11 sometimes
    swallows one that arrives during its Shutdown call), so loops also check this flag.
    """

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise Interrupted

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal() -> None:
            self.requested = True
            if task is not None:
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)


def run_guarded(name: str, run: Callable[[], int]) -> int:
    """``run()``'s exit status; 130 after Ctrl-C or SIGTERM, 1 after a ``BenchmarkError``."""
    try:
        return run()
    except (KeyboardInterrupt, asyncio.CancelledError, Interrupted):
        print("interrupted; every plugin process was stopped", file=sys.stderr)
        return 130
    except BenchmarkError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 1


# -- numbers ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of unsorted ``values``; NaN for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def interpolated_percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) on sorted, non-empty data."""
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def load(
    call: Callable[[], Awaitable[None]], *, seconds: float, concurrency: int
) -> dict[str, float]:
    """Run ``call`` from ``concurrency`` workers for ``seconds``; latency in ms."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - began) * 1000)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "calls": float(len(latencies)),
    }


# -- the machine and the fixtures ------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(**extra: str) -> dict[str, str | int | None]:
    """What a reader needs to compare figures; the load average shows a busy machine."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        **extra,
        "loadavg_1m_at_start": f"{os.getloadavg()[0]:.2f}",
    }


def go_fixture_binary(given: Path | None = None, *, install: bool = False) -> Path:
    """The Go fixture, built (or found up to date) by scripts/build_go_fixture.py.

    ``install``: let the script install a missing Go toolchain instead of failing.
    """
    if given is not None:
        if not os.access(given, os.X_OK):
            raise BenchmarkError(f"{given} is not an executable file")
        return given
    proc = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), *([] if install else ["--no-install"])],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise BenchmarkError(
            "building the Go fixture failed (run scripts/setup.sh first):\n"
            + (proc.stderr.strip() or proc.stdout.strip())
        )
    return Path(proc.stdout.strip().splitlines()[-1])


def plugin_env() -> dict[str, str]:
    """The environment the host gives a plugin (no fixture behaviour)."""
    env = build_environment(host_env=os.environ, grafana=GrafanaIdentity())
    env.pop("FIXTURE_BEHAVIOUR", None)
    return env


@contextlib.asynccontextmanager
async def attached_plugin(
    plugin_id: str, executable: Path, workdir: Path
) -> AsyncIterator[tuple[PluginProcess, BackendClient]]:
    """A plugin started as the host starts it, for a bridge to attach to, and a client on it."""
    plugin = await PluginProcess.start(
        plugin_id=plugin_id,
        executable=executable,
        env=build_environment(host_env=os.environ, grafana=GrafanaIdentity()),
        workdir=workdir,
    )
    try:
        client = BackendClient(plugin_id, open_channel(plugin.handshake.grpc_target))
        try:
            yield plugin, client
        finally:
            await client.close()
    finally:
        await plugin.stop(grace=STOP_GRACE)


# -- a bridge process ------------------------------------------------------------------------


def write_bench_config(
    workdir: Path,
    *,
    port: int,
    plugin_id: str,
    group: str,
    service: str,
    plugins: Mapping[str, Any],
    datasource: Mapping[str, Any] | None = None,
    **sections: Any,
) -> Path:
    """The files a benchmark bridge reads, in ``workdir``; the path of its config.

    One provisioned datasource (``uid: bench``, or ``datasource``), one DataPlaneService for
    ``group`` with one service of type ``service``, a token file with ``TOKEN`` for an Admin
    user ``bench``, the ``plugins`` section, and any other ``sections`` (``dataplane`` adds to
    the manifests directory; ``logging`` defaults to warning).
    """
    (workdir / "provisioning" / "datasources").mkdir(parents=True)
    entry = dict(datasource or {"name": "bench", "type": plugin_id, "uid": "bench"})
    (workdir / "provisioning" / "datasources" / "bench.yaml").write_text(
        json.dumps({"apiVersion": 1, "datasources": [entry]})
    )
    (workdir / "manifests").mkdir()
    (workdir / "manifests" / "bench.yaml").write_text(
        json.dumps(dataplane_service(plugin_id, group, services=({"type": service},)))
    )
    tokens = workdir / "tokens.csv"
    tokens.write_text(f"{TOKEN},bench,1,\n")
    tokens.chmod(0o600)
    config = {
        "server": {"listen": f"127.0.0.1:{port}"},
        "plugins": dict(plugins),
        "provisioning": {"directories": ["provisioning"]},
        "auth": {
            "mode": "token",
            "token_file": "tokens.csv",
            "users": {"bench": {"org_id": 1, "role": "Admin"}},
        },
        "logging": {"level": "warning"},
        **sections,
        "dataplane": {"manifests": ["manifests"], **sections.get("dataplane", {})},
    }
    path = workdir / "bridge.json"
    path.write_text(json.dumps(config))
    return path


def start_bridge(config: Path) -> subprocess.Popen[bytes]:
    """``grafana-bridge serve -c config`` in the config's directory."""
    return subprocess.Popen([str(GRAFANA_BRIDGE), "serve", "-c", str(config)], cwd=config.parent)


def stop_bridge(bridge: subprocess.Popen[bytes]) -> None:
    """SIGTERM, SIGKILL after 30 s; reaped."""
    terminate(bridge, 30)


async def wait_ready(
    session: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]
) -> None:
    """Poll ``/readyz`` until 200 (15 s at the most)."""
    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"the bridge exited with {proc.returncode}")
        try:
            async with session.get(f"{base}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError("the bridge did not become ready")
