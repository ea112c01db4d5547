"""Plugin start-to-ready time: spawn, go-plugin handshake, first gRPC health ping answered.

Measures the Go fixture (built with the real hashicorp/go-plugin) over ``--runs`` start/stop
cycles through the host's own code path (``PluginProcess.start`` → ``BackendClient.ping`` →
``PluginProcess.stop`` with ``Shutdown``), split into phases, next to baselines measured in the
same run, each spawned with pipes and its own session, drained and reaped:

* ``/bin/true`` given its parent-death signal the way the host does it here
  (``plugin_host.process.PARENT_DEATH_SIGNAL_VIA``: ``setpriv`` or a ``preexec_fn``) — what
  spawning costs the host with nothing to run;
* ``/bin/true`` without a death signal, which lets Python use ``vfork``;
* with ``--fork-baseline``, ``/bin/true`` with the ``preexec_fn`` fallback, which makes Python
  ``fork()`` (gRPC's fork handlers may then abort a child; such runs are counted, not timed);
* the Go fixture without the magic cookie, spawned as the host does — the Go runtime starts,
  sees no cookie, exits 1.

The Python fixture follows with fewer runs (``--py-runs``), with its own no-cookie baseline.
Runs of the Go cases are interleaved so that drift affects every case alike.

    python -m benchmarks.plugin_start [--runs 30] [--py-runs 5] [--budget 50] [--fork-baseline]
        [--json]

A bounded script, not a test: it stops taking samples once ``--budget`` seconds have passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks._common import (
    CALL_TIMEOUT,
    GO_PLUGIN_ID,
    PY_FIXTURE,
    PY_PLUGIN_ID,
    ROOT,
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
from plugin_host.handshake import MAGIC_COOKIE_KEY
from plugin_host.process import (
    PARENT_DEATH_SIGNAL_VIA,
    PluginProcess,
    _die_with_parent,
    make_socket_root,
)

SETPRIV = shutil.which("setpriv")


# -- numbers ---------------------------------------------------------------------------------


@dataclass
class Series:
    """Samples of one measured quantity, in milliseconds."""

    label: str
    samples: list[float] = field(default_factory=list)
    aborted: int = 0  # children killed by a signal before they could run (not timed)

    def add_seconds(self, seconds: float) -> None:
        self.samples.append(seconds * 1000.0)

    def p50(self) -> float:
        return percentile(sorted(self.samples), 0.5)

    def summary(self) -> dict[str, float | None]:
        """n, min, p50, p90, p99, max; None for each statistic when there are no samples."""
        ordered = sorted(self.samples)
        if not ordered:
            return {"n": 0, "min": None, "p50": None, "p90": None, "p99": None, "max": None}
        return {
            "n": len(ordered),
            "min": ordered[0],
            "p50": percentile(ordered, 0.50),
            "p90": percentile(ordered, 0.90),
            "p99": percentile(ordered, 0.99),
            "max": ordered[-1],
        }


@dataclass
class PluginSeries:
    """The phases of a plugin's start/stop cycle."""

    ready: Series
    handshake: Series
    first_ping: Series
    reflection: Series
    stop: Series
    shutdown_rpc: Series
    nonzero_exits: list[int | None] = field(default_factory=list)  # None: not reaped
    services: int | None = None
    reflection_errors: int = 0

    @classmethod
    def empty(cls) -> PluginSeries:
        return cls(
            ready=Series("ready: spawn → first ping ok"),
            handshake=Series("  spawn → handshake line"),
            first_ping=Series("  handshake → first ping ok"),
            reflection=Series("  then reflection (supervisor only)"),
            stop=Series("stop: Shutdown → exit + reap"),
            shutdown_rpc=Series("  Shutdown RPC returned"),
        )

    def all(self) -> list[Series]:
        return [
            self.ready,
            self.handshake,
            self.first_ping,
            self.reflection,
            self.stop,
            self.shutdown_rpc,
        ]


# -- the machine -----------------------------------------------------------------------------


def without_cookie(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != MAGIC_COOKIE_KEY}


# -- measurements ----------------------------------------------------------------------------


async def spawn_and_reap(
    into: Series,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    death_signal: str,
    expect: int,
) -> None:
    """Time spawning ``argv``, draining its pipes to EOF and reaping it; add it to ``into``.

    ``death_signal`` is how the child learns to die with this process, as in
    ``PluginProcess``: ``setpriv`` (run under ``setpriv --pdeathsig KILL``), ``preexec_fn``
    (``prctl`` in a ``preexec_fn``, which makes Python ``fork()``) or ``none``.
    """
    preexec: Callable[[], None] | None = None
    if death_signal == "setpriv":
        if SETPRIV is None:
            raise BenchmarkError("setpriv is not installed")
        argv = [SETPRIV, "--pdeathsig", "KILL", "--", *argv]
    elif death_signal == "preexec_fn":
        preexec = _die_with_parent(os.getpid())
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        start_new_session=True,
        preexec_fn=preexec,
    )
    try:
        await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    elapsed = time.perf_counter() - started
    code = proc.returncode
    if code == expect:
        into.add_seconds(elapsed)
    elif code is not None and code < 0 and death_signal == "preexec_fn":
        into.aborted += 1
    else:
        raise BenchmarkError(f"{argv[0]} exited with {code}, expected {expect}")


async def start_stop_once(
    *,
    plugin_id: str,
    executable: Path,
    env: Mapping[str, str],
    workdir: Path,
    into: PluginSeries,
) -> None:
    """One cycle through the host's code path, each phase timed."""
    t_spawn = time.perf_counter()
    process = await PluginProcess.start(
        plugin_id=plugin_id,
        executable=executable,
        env=env,
        workdir=workdir,
        start_timeout=START_TIMEOUT,
    )
    t_handshake = time.perf_counter()
    client = BackendClient(plugin_id, open_channel(process.handshake.grpc_target))
    try:
        if not await client.ping(timeout=CALL_TIMEOUT):
            raise BenchmarkError(f"{plugin_id}: first health check says NOT_SERVING")
        t_ping = time.perf_counter()
        try:
            services = await client.served_services(timeout=CALL_TIMEOUT)
        except PluginError:
            # go-plugin 1.0.1 serves no reflection. grpc.aio sometimes reports that as
            # INTERNAL ("Internal error from Core") instead of UNIMPLEMENTED: the server ends
            # the stream before the request is sent. The supervisor treats both as "unknown".
            services = None
            into.reflection_errors += 1
        t_reflection = time.perf_counter()

        rpc_returned: list[float] = []

        async def shutdown() -> None:
            try:
                await client.shutdown(timeout=STOP_GRACE)
            finally:
                rpc_returned.append(time.perf_counter())

        t_stop = time.perf_counter()
        exit_code = await process.stop(grace=STOP_GRACE, request_shutdown=shutdown)
        t_reaped = time.perf_counter()
    finally:
        # Idempotent: a no-op after a completed stop; ends the process promptly after a
        # failure or an interruption, and always reaps it and removes its directory.
        await process.stop(grace=0.5, request_shutdown=client.shutdown)
        await client.close()

    into.ready.add_seconds(t_ping - t_spawn)
    into.handshake.add_seconds(t_handshake - t_spawn)
    into.first_ping.add_seconds(t_ping - t_handshake)
    into.reflection.add_seconds(t_reflection - t_ping)
    into.stop.add_seconds(t_reaped - t_stop)
    if rpc_returned:
        into.shutdown_rpc.add_seconds(rpc_returned[0] - t_stop)
    if exit_code != 0:
        into.nonzero_exits.append(exit_code)
    into.services = None if services is None else len(services)


@dataclass
class Baselines:
    host: Series  # /bin/true, death signal as the host gives it
    plain: Series  # /bin/true, no death signal (vfork)
    fork: Series | None  # /bin/true, preexec_fn (fork); only with --fork-baseline
    go_no_cookie: Series
    py_no_cookie: Series

    def all(self) -> list[Series]:
        rows = [self.host, self.plain]
        if self.fork is not None:
            rows.append(self.fork)
        return [*rows, self.go_no_cookie, self.py_no_cookie]


@dataclass
class Results:
    go: PluginSeries
    python: PluginSeries
    baselines: Baselines
    planned: dict[str, int]
    truncated: bool = False

    def as_json(self, info: Mapping[str, object]) -> dict[str, object]:
        def plugin(series: PluginSeries) -> dict[str, object]:
            return {
                "ready_ms": series.ready.summary(),
                "spawn_to_handshake_ms": series.handshake.summary(),
                "handshake_to_first_ping_ms": series.first_ping.summary(),
                "reflection_ms": series.reflection.summary(),
                "stop_ms": series.stop.summary(),
                "shutdown_rpc_ms": series.shutdown_rpc.summary(),
                "nonzero_exits": series.nonzero_exits,
                "reflected_services": series.services,
                "reflection_errors": series.reflection_errors,
            }

        return {
            "benchmark": "plugin_start",
            "machine": dict(info),
            "host_death_signal_via": PARENT_DEATH_SIGNAL_VIA,
            "planned_runs": self.planned,
            "truncated_by_budget": self.truncated,
            "go_fixture": plugin(self.go),
            "python_fixture": plugin(self.python),
            "baselines_ms": {
                s.label: {**s.summary(), "aborted": s.aborted} for s in self.baselines.all()
            },
        }


async def measure(args: argparse.Namespace, go_binary: Path, stop: StopFlag) -> Results:
    env = plugin_env()
    no_cookie = without_cookie(env)
    true_bin = shutil.which("true") or "/bin/true"
    host = PARENT_DEATH_SIGNAL_VIA
    base = Baselines(
        host=Series(f"/bin/true, as the host spawns ({host})"),
        plain=Series("/bin/true, no death signal (vfork)"),
        fork=Series("/bin/true, preexec_fn death signal (fork)")
        if args.fork_baseline and host != "preexec_fn"
        else None,
        go_no_cookie=Series("Go fixture without cookie (exits 1)"),
        py_no_cookie=Series("Python fixture without cookie (exits 1)"),
    )
    results = Results(
        go=PluginSeries.empty(),
        python=PluginSeries.empty(),
        baselines=base,
        planned={"go": args.runs, "python": args.py_runs, "warmup": args.warmup},
    )
    deadline = time.monotonic() + args.budget
    root = make_socket_root()
    try:
        scratch = PluginSeries.empty()
        throwaway = Series("warm-up")

        async def go_cycle(i: int, into: PluginSeries) -> None:
            await start_stop_once(
                plugin_id=GO_PLUGIN_ID,
                executable=go_binary,
                env=env,
                workdir=root / f"g{i}",
                into=into,
            )

        async def baselines(into: Baselines) -> None:
            await spawn_and_reap(into.host, [true_bin], env, death_signal=host, expect=0)
            await spawn_and_reap(into.plain, [true_bin], env, death_signal="none", expect=0)
            if into.fork is not None:
                await spawn_and_reap(
                    into.fork, [true_bin], env, death_signal="preexec_fn", expect=0
                )
            await spawn_and_reap(
                into.go_no_cookie, [str(go_binary)], no_cookie, death_signal=host, expect=1
            )

        # Warm-up: page cache, lazy imports, grpc's first channel.
        warm = Baselines(throwaway, throwaway, throwaway, throwaway, throwaway)
        for i in range(args.warmup):
            stop.check()
            await go_cycle(-1 - i, scratch)
            await baselines(warm)

        # The Go cases interleaved, one of each per round.
        for i in range(args.runs):
            stop.check()
            if time.monotonic() > deadline:
                results.truncated = True
                break
            await go_cycle(i, results.go)
            stop.check()
            await baselines(base)

        for i in range(args.warmup + args.py_runs):
            stop.check()
            if time.monotonic() > deadline:
                results.truncated = True
                break
            counted = i >= args.warmup
            await start_stop_once(
                plugin_id=PY_PLUGIN_ID,
                executable=PY_FIXTURE,
                env=env,
                workdir=root / f"p{i}",
                into=results.python if counted else scratch,
            )
            await spawn_and_reap(
                base.py_no_cookie if counted else throwaway,
                [str(PY_FIXTURE)],
                no_cookie,
                death_signal=host,
                expect=1,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


# -- output ----------------------------------------------------------------------------------

_HEAD = f"{'':<42}{'n':>4}{'min':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}"


def _row(series: Series) -> str:
    ordered = sorted(series.samples)
    if not ordered:
        return f"{series.label:<42}{0:>4}  (no samples)"
    values = [ordered[0], *(percentile(ordered, q) for q in (0.5, 0.9, 0.99)), ordered[-1]]
    return f"{series.label:<42}{len(ordered):>4}" + "".join(f"{v:>9.2f}" for v in values)


def print_report(results: Results, info: Mapping[str, object], go_binary: Path) -> None:
    print(
        f"Plugin start-to-ready — {info['cpu']}, {info['cores']} cores, "
        f"Python {info['python']}, grpcio {info['grpcio']}, Linux {info['kernel']}"
    )
    print(
        f"load average (1 min): {info['loadavg_1m_at_start']} at start,"
        f" {info['loadavg_1m_at_end']} at end"
    )
    shown = go_binary.relative_to(ROOT) if go_binary.is_relative_to(ROOT) else go_binary
    print(f"Go fixture: {shown}")
    print(f"times in ms; {results.planned['warmup']} warm-up cycle(s) per plugin not counted")
    if results.truncated:
        print("NOTE: stopped early at the --budget limit; fewer runs than asked for")
    for title, series in (
        ("Go fixture (hashicorp/go-plugin)", results.go),
        ("Python fixture (grpc.aio)", results.python),
    ):
        print()
        print(f"{title:<42}{_HEAD[42:]}")
        for item in series.all():
            print(_row(item))
        if series.services is not None:
            print(f"  (reflection listed {series.services} pluginv2 services)")
        elif series.ready.samples:
            print(
                "  (serves no reflection; grpc.aio reported INTERNAL instead of UNIMPLEMENTED"
                f" {series.reflection_errors} time(s) in {len(series.ready.samples)})"
            )
        if series.nonzero_exits:
            print(f"  WARNING: non-zero exit statuses after Shutdown: {series.nonzero_exits}")
    print()
    print(f"{'Baselines (spawn + drain pipes + reap)':<42}{_HEAD[42:]}")
    for item in results.baselines.all():
        print(_row(item))
        if item.aborted:
            print(f"  ({item.aborted} child(ren) killed by a signal before exec, not timed)")

    base = results.baselines
    if results.go.ready.samples and base.host.samples and base.go_no_cookie.samples:
        ready = results.go.ready.p50()
        spawn = base.host.p50()
        runtime = base.go_no_cookie.p50()
        print()
        print(f"Where the Go fixture's p50 ready time of {ready:.2f} ms goes:")
        print(
            f"  {spawn:6.2f} ms  spawning as the host does ({PARENT_DEATH_SIGNAL_VIA});"
            f" {base.plain.p50():.2f} ms without a death signal"
        )
        print(f"  {runtime - spawn:6.2f} ms  exec + Go runtime start + exit of the binary")
        print(
            f"  {ready - runtime:6.2f} ms  the rest: plugin set-up, listen, handshake line,"
            " gRPC connect, first ping"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plugin_start",
        description="Plugin start-to-ready time, split into phases, with OS baselines.",
    )
    parser.add_argument("--runs", type=int, default=30, help="Go cycles (default 30)")
    parser.add_argument("--py-runs", type=int, default=5, help="Python cycles (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted cycles (default 1)")
    parser.add_argument(
        "--budget",
        type=float,
        default=50.0,
        help="stop taking samples after this many seconds (default 50)",
    )
    parser.add_argument(
        "--fork-baseline",
        action="store_true",
        help="also time /bin/true with the preexec_fn death signal (the fallback without setpriv)",
    )
    parser.add_argument("--go-binary", type=Path, help="use this Go fixture, do not build")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.py_runs < 0 or args.warmup < 0 or args.budget <= 0:
        parser.error("--runs must be ≥ 1, --py-runs and --warmup ≥ 0, --budget > 0")
    return args


async def _main(args: argparse.Namespace) -> int:
    # Ctrl-C and SIGTERM end the run early; every process is reaped, every temp dir removed.
    stop = StopFlag()
    stop.install()
    go_binary = await asyncio.to_thread(go_fixture_binary, args.go_binary)
    info = machine_info()
    results = await measure(args, go_binary, stop)
    stop.check()
    info["loadavg_1m_at_end"] = f"{os.getloadavg()[0]:.2f}"
    if not args.json:
        print_report(results, info, go_binary)
        print()
    print(json.dumps(results.as_json(info), separators=(",", ":")))
    return 1 if results.go.nonzero_exits or results.python.nonzero_exits else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_guarded("plugin_start", lambda: asyncio.run(_main(args)))


if __name__ == "__main__":
    sys.exit(main())
