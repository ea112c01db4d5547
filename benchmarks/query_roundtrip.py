"""QueryData round trips over the plugin's unix socket, against the gRPC health check.

Launches the Go fixture (real hashicorp/go-plugin) and the Python fixture through the host's
code path (``PluginProcess.start``), then drives ``plugin_host.BackendClient`` on one channel,
as the host does, for a fixed time per case:

* concurrency C (default 1, 8, 32 calls in flight; C=1 is the sequential case),
* three calls per C: the baseline — go-plugin's gRPC health ``Check`` (service ``plugin``),
  the cheapest round trip the plugin answers — and ``QueryData`` for a small query (1 point)
  and a larger one (1000 points), both in the SDK's JSON frame format. Each case's time is cut
  into ``--rounds`` slices taken in rotation, so drifting background load skews no ratio.

Reported per case: calls/s, latency p50/p99, CPU time per call of this process (the host's
side: grpc.aio, protobuf, the event loop) and of the plugin process, and the ratios against the
health baseline at the same C — what the plugin's own work and the bigger messages cost.

    python -m benchmarks.query_roundtrip [--seconds 3] [--concurrency 1,8,32] [--points 1,1000]
        [--rounds 3] [--plugins go,python] [--loop asyncio|uvloop] [--json]

A bounded script, not a test: 2 plugins x 3 calls x 3 concurrencies x 3 s ≈ 55 s by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil

from benchmarks._common import (
    CALL_TIMEOUT,
    GO_PLUGIN_ID,
    PY_FIXTURE,
    PY_PLUGIN_ID,
    START_TIMEOUT,
    STOP_GRACE,
    BenchmarkError,
    StopFlag,
    go_fixture_binary,
    machine_info,
    plugin_env,
    run_guarded,
)
from benchmarks._common import interpolated_percentile as percentile
from plugin_host.client import BackendClient, open_channel
from plugin_host.errors import PluginError
from plugin_host.process import PluginProcess, make_socket_root
from protos.pluginv2 import backend_pb2 as pb

PLUGIN_IDS = {"go": GO_PLUGIN_ID, "python": PY_PLUGIN_ID}
GO_MAX_POINTS = 1000  # the Go fixture caps a frame at this many rows

Call = Callable[[], Awaitable[object]]


# -- the machine and the fixtures ------------------------------------------------------------


# -- requests --------------------------------------------------------------------------------


def plugin_context(plugin_id: str) -> pb.PluginContext:
    return pb.PluginContext(
        orgId=1,
        pluginId=plugin_id,
        dataSourceInstanceSettings=pb.DataSourceInstanceSettings(
            id=1, uid="bench", name="benchmark"
        ),
    )


def query_request(plugin_id: str, points: int) -> pb.QueryDataRequest:
    """One query for ``points`` rows, understood alike by both fixtures.

    The Go fixture makes ``maxDataPoints`` rows, the Python one the ``points`` of the query
    model; the time range holds exactly that many one-second steps.
    """
    start_ms = 1_700_000_000_000
    query = pb.DataQuery(
        refId="A",
        maxDataPoints=points,
        intervalMS=1000,
        timeRange=pb.TimeRange(fromEpochMS=start_ms, toEpochMS=start_ms + (points - 1) * 1000),
        json=json.dumps({"points": points}).encode(),
    )
    return pb.QueryDataRequest(
        pluginContext=plugin_context(plugin_id), queries=[query], format=pb.JSON
    )


def frame_rows(response: pb.QueryDataResponse) -> int:
    """Rows of the one frame in an SDK JSON answer (raises if the answer is not that)."""
    result = response.responses["A"]
    if result.error:
        raise BenchmarkError(f"the query failed: {result.error}")
    frame = json.loads(result.frames[0])
    return len(frame["data"]["values"][0])


# -- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    plugin: str
    call: str
    concurrency: int


@dataclass
class CaseResult:
    case: Case
    calls: int
    errors: int
    first_error: str | None
    seconds: float
    latencies_ms: list[float]  # sorted
    host_cpu_s: float
    plugin_cpu_s: float
    response_bytes: int

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def quantile(self, q: float) -> float | None:
        return percentile(self.latencies_ms, q) if self.latencies_ms else None

    def cpu_us_per_call(self, cpu_s: float) -> float | None:
        return cpu_s / self.calls * 1e6 if self.calls else None

    def merge(self, other: CaseResult) -> CaseResult:
        """This and another slice of the same case, as one result."""
        return CaseResult(
            case=self.case,
            calls=self.calls + other.calls,
            errors=self.errors + other.errors,
            first_error=self.first_error or other.first_error,
            seconds=self.seconds + other.seconds,
            latencies_ms=sorted(self.latencies_ms + other.latencies_ms),
            host_cpu_s=self.host_cpu_s + other.host_cpu_s,
            plugin_cpu_s=self.plugin_cpu_s + other.plugin_cpu_s,
            response_bytes=self.response_bytes,
        )


async def run_case(
    case: Case,
    call: Call,
    *,
    seconds: float,
    plugin: psutil.Process,
    response_bytes: int,
    stop: StopFlag,
) -> CaseResult:
    """``case.concurrency`` workers, each keeping one call in flight until time is up."""
    latencies: list[float] = []
    errors = 0
    first_error: str | None = None
    clock = time.perf_counter
    stop_at = clock() + seconds

    async def worker() -> None:
        nonlocal errors, first_error
        while clock() < stop_at and not stop.requested:
            started = clock()
            try:
                answer = await call()
            except PluginError as exc:
                answer = exc
            if answer is False or isinstance(answer, PluginError):
                errors += 1
                if first_error is None:
                    first_error = "NOT_SERVING" if answer is False else str(answer)
                continue
            latencies.append((clock() - started) * 1000.0)

    plugin_cpu_before = plugin.cpu_times()
    host_cpu_before = time.process_time()
    started = clock()
    stop_at = started + seconds
    await asyncio.gather(*(worker() for _ in range(case.concurrency)))
    stop.check()
    elapsed = clock() - started
    host_cpu = time.process_time() - host_cpu_before
    plugin_cpu_after = plugin.cpu_times()
    plugin_cpu = (plugin_cpu_after.user + plugin_cpu_after.system) - (
        plugin_cpu_before.user + plugin_cpu_before.system
    )
    latencies.sort()
    return CaseResult(
        case=case,
        calls=len(latencies),
        errors=errors,
        first_error=first_error,
        seconds=elapsed,
        latencies_ms=latencies,
        host_cpu_s=host_cpu,
        plugin_cpu_s=plugin_cpu,
        response_bytes=response_bytes,
    )


@contextlib.asynccontextmanager
async def launched(
    name: str, executable: Path, env: Mapping[str, str]
) -> AsyncIterator[tuple[PluginProcess, BackendClient]]:
    """A plugin started as the host starts it; Shutdown, reaped and cleaned up on exit."""
    plugin_id = PLUGIN_IDS[name]
    root = make_socket_root()
    try:
        process = await PluginProcess.start(
            plugin_id=plugin_id,
            executable=executable,
            env=env,
            workdir=root / name,
            start_timeout=START_TIMEOUT,
        )
        client = BackendClient(
            plugin_id, open_channel(process.handshake.grpc_target), default_timeout=CALL_TIMEOUT
        )
        try:
            if not await client.ping(timeout=CALL_TIMEOUT):
                raise BenchmarkError(f"{plugin_id}: health check says NOT_SERVING")
            yield process, client
        finally:
            await process.stop(grace=STOP_GRACE, request_shutdown=client.shutdown)
            await client.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def describe_plugin(name: str, client: BackendClient) -> str:
    """What the plugin says about itself (the Go fixture reports its library versions)."""
    health = await client.check_health(
        pb.CheckHealthRequest(pluginContext=plugin_context(PLUGIN_IDS[name])),
        timeout=CALL_TIMEOUT,
    )
    try:
        details: Any = json.loads(health.jsonDetails or b"{}")
    except ValueError:
        details = {}
    if not isinstance(details, dict):
        details = {}
    if name == "go":
        return (
            f"hashicorp/go-plugin {details.get('goPluginVersion', '?')}, "
            f"grpc-go {details.get('grpcVersion', '?')}, {details.get('goVersion', '?')}"
        )
    return f"grpc.aio server, grpcio {grpc.__version__}, Python {platform.python_version()}"


async def bench_plugin(
    name: str,
    executable: Path,
    args: argparse.Namespace,
    results: list[CaseResult],
    stop: StopFlag,
) -> str:
    """Every case for one plugin, appended to ``results``; returns the plugin's description."""
    async with launched(name, executable, plugin_env()) as (process, client):
        plugin_id = PLUGIN_IDS[name]
        description = await describe_plugin(name, client)
        calls: list[tuple[str, Call, int]] = []

        async def health() -> bool:
            return await client.ping(timeout=CALL_TIMEOUT)

        calls.append(("health", health, 2))  # HealthCheckResponse{status: SERVING}
        for points in args.points:
            request = query_request(plugin_id, points)
            sample = await client.query_data(request, timeout=CALL_TIMEOUT)
            rows = frame_rows(sample)
            if rows != points:
                cap = f" (it caps frames at {GO_MAX_POINTS})" if name == "go" else ""
                raise BenchmarkError(f"{name} fixture answered {rows} rows, not {points}{cap}")

            def query(request: pb.QueryDataRequest = request) -> Awaitable[object]:
                return client.query_data(request, timeout=CALL_TIMEOUT)

            calls.append((f"query {points}pt", query, sample.ByteSize()))

        plugin = psutil.Process(process.pid)
        if args.warmup > 0:  # connection, grpc's and the plugin's lazy paths, CPU caches
            for label, call, size in calls:
                await run_case(
                    Case(name, label, max(args.concurrency)),
                    call,
                    seconds=args.warmup / len(calls),
                    plugin=plugin,
                    response_bytes=size,
                    stop=stop,
                )
        for concurrency in args.concurrency:
            # Each case's time is cut into rounds that rotate through the calls, so a change
            # in background load hits the baseline and the queries alike.
            merged: dict[str, CaseResult] = {}
            for _ in range(args.rounds):
                for label, call, size in calls:
                    part = await run_case(
                        Case(name, label, concurrency),
                        call,
                        seconds=args.seconds / args.rounds,
                        plugin=plugin,
                        response_bytes=size,
                        stop=stop,
                    )
                    merged[label] = merged[label].merge(part) if label in merged else part
                    if process.returncode is not None:
                        raise BenchmarkError(
                            f"{name} fixture exited with status {process.returncode} mid-run"
                        )
            results.extend(merged.values())
            if not args.json:
                for result in merged.values():
                    print(f"  {format_row(result, results)}", flush=True)
    return description


# -- output ----------------------------------------------------------------------------------


def baseline_for(result: CaseResult, results: Sequence[CaseResult]) -> CaseResult | None:
    for other in results:
        if (
            other.case.plugin == result.case.plugin
            and other.case.concurrency == result.case.concurrency
            and other.case.call == "health"
        ):
            return other
    return None


def ratios(result: CaseResult, results: Sequence[CaseResult]) -> tuple[float | None, float | None]:
    """(p50 latency ÷ health's p50, health's calls/s ÷ these calls/s) at the same C."""
    base = baseline_for(result, results)
    if base is None:
        return None, None
    p50, base_p50 = result.quantile(0.5), base.quantile(0.5)
    latency = p50 / base_p50 if p50 is not None and base_p50 else None
    cost = base.calls_per_s / result.calls_per_s if result.calls_per_s > 0 else None
    return latency, cost


def _num(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


HEADER = (
    f"  {'plugin':<7}{'call':<14}{'C':>3}{'calls/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
    f"{'host µs':>9}{'plugin µs':>11}{'p50÷hc':>8}{'cost÷hc':>9}{'resp B':>9}  errors"
)


def format_row(result: CaseResult, results: Sequence[CaseResult]) -> str:
    latency_ratio, cost_ratio = ratios(result, results)
    case = result.case
    row = (
        f"{case.plugin:<7}{case.call:<14}{case.concurrency:>3}"
        f"{result.calls_per_s:>10,.0f}"
        f"{_num(result.quantile(0.5), '.3f', 9)}{_num(result.quantile(0.99), '.3f', 9)}"
        f"{_num(result.cpu_us_per_call(result.host_cpu_s), '.0f', 9)}"
        f"{_num(result.cpu_us_per_call(result.plugin_cpu_s), '.0f', 11)}"
        f"{_num(latency_ratio, '.2f', 8)}{_num(cost_ratio, '.2f', 9)}"
        f"{result.response_bytes:>9,}  {result.errors}"
    )
    if result.first_error:
        row += f" (first: {result.first_error})"
    return row


def result_json(result: CaseResult, results: Sequence[CaseResult]) -> dict[str, object]:
    latency_ratio, cost_ratio = ratios(result, results)
    return {
        "plugin": result.case.plugin,
        "call": result.case.call,
        "concurrency": result.case.concurrency,
        "calls": result.calls,
        "errors": result.errors,
        "seconds": round(result.seconds, 4),
        "calls_per_s": round(result.calls_per_s, 1),
        "p50_ms": result.quantile(0.5),
        "p99_ms": result.quantile(0.99),
        "max_ms": result.latencies_ms[-1] if result.latencies_ms else None,
        "host_cpu_us_per_call": result.cpu_us_per_call(result.host_cpu_s),
        "plugin_cpu_us_per_call": result.cpu_us_per_call(result.plugin_cpu_s),
        "response_bytes": result.response_bytes,
        "p50_vs_health": latency_ratio,
        "cost_vs_health": cost_ratio,
    }


# -- running ---------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma separated integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _plugin_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in PLUGIN_IDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"choose from go, python (got {text!r})")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.query_roundtrip",
        description="QueryData round trips to plugins over their socket, against health Check.",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per case (default 3)")
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 8, 32],
        help="calls in flight, comma separated (default 1,8,32)",
    )
    parser.add_argument(
        "--points", type=_int_list, default=[1, 1000], help="query sizes (default 1,1000)"
    )
    parser.add_argument(
        "--plugins", type=_plugin_list, default=["go", "python"], help="default go,python"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="slices each case's time is cut into, rotating through the calls (default 3)",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.3, help="uncounted seconds per plugin (default 0.3)"
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (uvloop only if installed; it is not a dependency)",
    )
    parser.add_argument("--go-binary", type=Path, help="use this Go fixture, do not build")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("--seconds must be > 0, --warmup ≥ 0, --rounds ≥ 1")
    return args


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "asyncio":
        return None
    try:
        module: Any = importlib.import_module("uvloop")
    except ImportError:
        raise BenchmarkError("--loop uvloop: uvloop is not installed") from None
    factory: Callable[[], asyncio.AbstractEventLoop] = module.new_event_loop
    return factory


async def _main(args: argparse.Namespace) -> int:
    # Ctrl-C and SIGTERM end the run early; every process is reaped, every temp dir removed.
    stop = StopFlag()
    stop.install()
    info = machine_info(event_loop=args.loop)
    executables = {"python": PY_FIXTURE}
    if "go" in args.plugins:
        executables["go"] = await asyncio.to_thread(go_fixture_binary, args.go_binary)
    cases = len(args.plugins) * (1 + len(args.points)) * len(args.concurrency)
    if not args.json:
        print(
            f"Plugin round trips over the unix socket — {info['cpu']}, {info['cores']} cores,"
            f" Python {info['python']}, grpcio {info['grpcio']}, {args.loop} event loop"
        )
        print(
            f"load average (1 min) at start: {info['loadavg_1m_at_start']};"
            f" {cases} cases x {args.seconds:g} s ≈ {cases * args.seconds:.0f} s"
        )
        print(
            "host/plugin µs = CPU time per call of this process / of the plugin process;"
            " ÷hc = against the health Check at the same C (cost÷hc = its calls/s ÷ these)"
        )
        print()
        print(HEADER)
    results: list[CaseResult] = []
    plugins: dict[str, str] = {}
    for name in args.plugins:
        stop.check()
        plugins[name] = await bench_plugin(name, executables[name], args, results, stop)
        if not args.json:
            print(f"  ({name} fixture: {plugins[name]})")
    info["loadavg_1m_at_end"] = f"{os.getloadavg()[0]:.2f}"
    if not args.json:
        print(f"  (load average, 1 min, at end: {info['loadavg_1m_at_end']})")
    payload = {
        "benchmark": "query_roundtrip",
        "machine": info,
        "plugins": plugins,
        "settings": {
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "points": args.points,
            "warmup": args.warmup,
            "rounds": args.rounds,
        },
        "results": [result_json(r, results) for r in results],
    }
    if not args.json:
        print()
    print(json.dumps(payload, separators=(",", ":")))
    return 1 if any(r.errors for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def run() -> int:
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            return runner.run(_main(args))

    return run_guarded("query_roundtrip", run)


if __name__ == "__main__":
    sys.exit(main())
