"""One plugin's life: start, watch (exit, health, memory), restart with backoff, stop.

States and transitions (see docs/lifecycle.md)::

    STOPPED ──start()──▶ STARTING ──handshake + ping ok──▶ RUNNING
                            │                                 │ exit / hung / over memory
                            ▼                                 ▼
                 BACKING_OFF ◀──────── failure ───────────────┘
                 (CRASH_LOOP once failures in a row reach the threshold)
                            │ delay elapsed
                            └──────────▶ STARTING
    any state ──stop()──▶ STOPPING ──▶ STOPPED

The supervision task is the only owner of the plugin process and its connections: it starts
them, and it releases them (gracefully when asked to stop, at once after a failure). Everyone
else (``stop()``, ``restart_now()``, the monitors) only asks it or signals the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict, Unpack

import psutil

from plugin_host.client import DEFAULT_MAX_MESSAGE_BYTES, BackendClient, open_channel
from plugin_host.errors import (
    NotImplementedByPlugin,
    PluginError,
    PluginLaunchError,
    PluginUnavailable,
    describe_exit,
)
from plugin_host.logs import LineSplitter, PluginLogParser
from plugin_host.process import PluginProcess, RunAs
from plugin_host.signature import executable_changed
from protos.plugin import grpc_stdio_pb2

log = logging.getLogger(__name__)

# A hung plugin gets SIGQUIT this long before SIGKILL (a Go plugin dumps its goroutines).
QUIT_BEFORE_KILL = 1.0
# Back-off between attempts to read a plugin's GRPCStdio stream while it runs.
STDIO_RETRY_INITIAL = 0.5
STDIO_RETRY_MAX = 10.0
# Calls still running on an attached plugin when it is released get this long.
ATTACHED_CLOSE_GRACE = 1.0
# Reasons are shown to API clients: one line, and not a novel.
_REASON_LIMIT = 300


class PluginState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing-off"
    CRASH_LOOP = "crash-loop"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """Exponential backoff with jitter between restarts, as Kubernetes does for pods."""

    initial_backoff: float = 1.0
    max_backoff: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2
    crash_loop_threshold: int = 5
    stable_after: float = 30.0

    def delay(self, failures: int, *, rng: random.Random | None = None) -> float:
        try:
            growth = self.multiplier ** max(0, failures - 1)
        except OverflowError:
            growth = math.inf
        base = min(self.max_backoff, self.initial_backoff * growth) if self.initial_backoff else 0.0
        spread = (rng or random).uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return float(max(0.0, min(self.max_backoff, base * spread)))


@dataclass(frozen=True, slots=True)
class SupervisorOptions:
    start_timeout: float = 60.0
    stop_grace: float = 2.0
    call_timeout: float = 30.0
    health_interval: float = 10.0
    health_timeout: float = 5.0
    health_failures: int = 3
    stats_interval: float = 5.0
    memory_limit_bytes: int | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    run_as: RunAs | None = None  # plugins.run_as_user (docs/security.md)
    # The largest gRPC message either way (plugins.max_message_mb); clamped by open_channel.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass(frozen=True, slots=True)
class PluginTarget:
    """What to run (or attach to) for one plugin, independent of how it was found."""

    plugin_id: str
    plugin_version: str = ""
    executable: Path | None = None
    attach_address: str | None = None
    # Holds the host's environment, secrets included: kept out of reprs and logs.
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The SHA-256 the executable must still have at each (re)start; None: not checked.
    executable_sha256: str | None = None
    # Overrides SupervisorOptions.max_message_bytes for this plugin.
    max_message_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.executable is None) == (self.attach_address is None):
            raise ValueError("a plugin target needs exactly one of executable or attach_address")


@dataclass(frozen=True, slots=True)
class ProcessStats:
    rss_bytes: int
    cpu_percent: float
    open_fds: int
    threads: int


@dataclass(frozen=True, slots=True)
class PluginStatus:
    """A snapshot of one supervised plugin, for status endpoints, metrics and controllers.

    ``last_error`` is a one-line reason, fit for API clients. ``last_output`` holds the
    plugin's last lines on stderr at that failure: for operators only (it may hold anything
    the plugin printed), so it is never put into errors and is left out of the repr.
    """

    plugin_id: str
    state: PluginState
    pid: int | None = None
    address: str | None = None
    attached: bool = False
    restarts: int = 0
    consecutive_failures: int = 0
    last_exit_code: int | None = None
    last_error: str | None = None
    started_at: float | None = None
    next_start_at: float | None = None
    services: frozenset[str] | None = None
    stats: ProcessStats | None = None
    last_output: str | None = field(default=None, repr=False)


class _StatusChanges(TypedDict, total=False):
    state: PluginState
    pid: int | None
    address: str | None
    restarts: int
    consecutive_failures: int
    last_exit_code: int | None
    last_error: str | None
    last_output: str | None
    started_at: float | None
    next_start_at: float | None
    services: frozenset[str] | None
    stats: ProcessStats | None


StatusListener = Callable[[PluginStatus], None]


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why one run of the plugin ended."""

    reason: str
    output: str | None = None
    exit_code: int | None = None


class _StopRequested(Exception):
    """stop() came while the plugin was about to become RUNNING."""


class PluginSupervisor:
    """Keeps one plugin running and exposes a client while it is."""

    def __init__(
        self,
        target: PluginTarget,
        *,
        options: SupervisorOptions,
        socket_root: Path | Callable[[], Path],
        rng: random.Random | None = None,
    ) -> None:
        self.target = target
        self.options = options
        self._socket_root = socket_root
        self._rng = rng or random.Random()
        self._status = PluginStatus(
            plugin_id=target.plugin_id,
            state=PluginState.STOPPED,
            attached=target.attach_address is not None,
        )
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._abandon = False
        self._settled = asyncio.Event()
        self._listeners: list[StatusListener] = []
        # Owned by the supervision task:
        self._process: PluginProcess | None = None
        self._client: BackendClient | None = None
        self._pinger: BackendClient | None = None
        self._running_since: float | None = None
        self._after_failure = False
        self._internal_error_logged = False

    @property
    def plugin_id(self) -> str:
        return self.target.plugin_id

    @property
    def status(self) -> PluginStatus:
        return self._status

    def add_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def client(self) -> BackendClient:
        """The running plugin's client; raises :class:`PluginUnavailable` at once otherwise.

        A client belongs to one run of the plugin: after a restart its calls fail with
        :class:`PluginUnavailable` and callers ask for a new one.
        """
        error = self._unavailable_error()
        if error is not None:
            raise error
        assert self._client is not None
        return self._client

    async def start(self) -> None:
        """Begin supervising (returns at once; see :meth:`wait_settled`). No-op if running."""
        async with self._lock:
            task = self._task
            if task is not None:
                if not self._stopping.is_set():
                    return
                # A stop() that was cancelled left the old run finishing; let it finish.
                await asyncio.wait({task})
                self._task = None
            self._stopping.clear()
            self._abandon = False
            self._settled.clear()
            self._task = asyncio.create_task(self._run(), name=f"supervise-{self.plugin_id}")

    async def wait_settled(self, timeout: float | None = None) -> PluginStatus:
        """Wait until the first start attempt has succeeded or failed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel (3.11)
                await self._settled.wait()
        return self._status

    async def stop(self) -> None:
        """Stop the plugin (Shutdown, grace, SIGKILL) and its supervision; idempotent.

        If the caller stops waiting (cancellation), the plugin is killed at once and the
        supervision task finishes the clean-up by itself; a later ``stop()`` waits for that.
        """
        async with self._lock:
            task = self._task
            if task is None:
                return
            self._stopping.set()
            if self._status.state is not PluginState.STOPPED:
                self._set(state=PluginState.STOPPING)
            try:
                await asyncio.wait({task})
            finally:
                if task.done():
                    self._task = None
                    if not task.cancelled() and task.exception() is not None:
                        log.error(
                            "supervision of plugin %s failed",
                            self.plugin_id,
                            exc_info=task.exception(),
                        )
                else:
                    self._abandon = True
                    if self._process is not None:
                        self._process.kill()
                    task.cancel()

    def restart_now(self, reason: str) -> None:
        """Kill the running process with this reason; it is started again after back-off.

        Does nothing when no process of ours is running (before start, after exit, attached).
        """
        process = self._process
        if process is not None and process.returncode is None:
            process.kill(reason)

    # -- the supervision task --------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    failure = await self._attempt()
                except Exception as exc:
                    failure = self._internal_failure(exc)
                if failure is None or self._stopping.is_set():
                    break
                await self._back_off(failure)
        finally:
            self._set(
                state=PluginState.STOPPED,
                pid=None,
                address=None,
                started_at=None,
                next_start_at=None,
                services=None,
                stats=None,
            )
            self._settled.set()

    async def _attempt(self) -> _Failure | None:
        """Start the plugin and serve until it fails; None when it ended because of stop()."""
        self._running_since = None
        restarts = self._status.restarts + (1 if self._after_failure else 0)
        self._after_failure = False
        self._set(state=PluginState.STARTING, next_start_at=None, restarts=restarts)
        runner = asyncio.create_task(self._run_once(), name=f"{self.plugin_id}-run")
        stop_requested = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({runner, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_requested.cancel()
            if not runner.done():
                runner.cancel()
            try:
                await asyncio.wait({runner})
            finally:
                await self._release()
        return self._outcome(runner)

    def _outcome(self, runner: asyncio.Task[_Failure]) -> _Failure | None:
        if runner.cancelled():
            if self._stopping.is_set():
                return None
            return self._internal_failure(asyncio.CancelledError())
        exc = runner.exception()
        if exc is None:
            return runner.result()
        if isinstance(exc, _StopRequested):
            return None
        if isinstance(exc, Exception):
            return self._internal_failure(exc)
        raise exc

    async def _run_once(self) -> _Failure:
        if self.target.attach_address is not None:
            return await self._attach(self.target.attach_address)
        assert self.target.executable is not None
        if self.target.executable_sha256 is not None:
            # What was verified is what runs: a binary replaced since is never started.
            changed = await asyncio.to_thread(
                executable_changed, self.target.executable, self.target.executable_sha256
            )
            if changed is not None:
                return _Failure(_one_line(changed))
        deadline = time.monotonic() + self.options.start_timeout
        root = self._socket_root() if callable(self._socket_root) else self._socket_root
        # A fresh private directory per start: two plugins, or two runs, never share one.
        workdir = Path(tempfile.mkdtemp(dir=root, prefix=_slug(self.plugin_id) + "-"))
        try:
            process = await PluginProcess.start(
                plugin_id=self.plugin_id,
                executable=self.target.executable,
                env=self.target.env,
                workdir=workdir,
                start_timeout=self.options.start_timeout,
                run_as=self.options.run_as,
            )
        except PluginLaunchError as exc:
            return _Failure(_one_line(exc.message), exc.stderr_tail or None, exc.exit_code)
        self._process = process
        self._set(pid=process.pid, address=process.handshake.address)
        client, pinger = self._connect(process.handshake.grpc_target)
        try:
            await self._first_ping(pinger, deadline=deadline)
        except PluginLaunchError as exc:
            if process.kill_reason is None and process.returncode is not None:
                return self._ended(process, f"process {describe_exit(process.returncode)}")
            return self._ended(process, exc.message)
        self._set(services=await self._services(client))
        self._become_running()
        monitors = [
            self._monitor(self._drain_stdio(client), "stdio"),
            self._monitor(self._watch_health(pinger, process), "health"),
            self._monitor(self._watch_stats(process), "stats"),
        ]
        try:
            code = await process.wait()
        finally:
            for task in monitors:
                task.cancel()
            await asyncio.wait(monitors)
        return self._ended(process, f"process {describe_exit(code)}")

    def _ended(self, process: PluginProcess, reason: str) -> _Failure:
        return _Failure(
            _one_line(process.kill_reason or reason),
            process.stderr_tail or None,
            process.returncode,
        )

    async def _attach(self, address: str) -> _Failure:
        """Standalone mode: talk to a plugin someone else runs, and watch that it answers."""
        client, pinger = self._connect(address)
        self._set(address=address)
        try:
            ok = await pinger.ping(timeout=self.options.health_timeout)
        except PluginError as exc:
            return _Failure(_one_line(f"cannot reach plugin at {address}: {exc.message}"))
        if not ok:
            return _Failure(f"plugin at {address} reports it is not serving")
        self._set(services=await self._services(client))
        self._become_running()
        return _Failure(_one_line(await self._watch_health(pinger, None)))

    def _connect(self, target: str) -> tuple[BackendClient, BackendClient]:
        """The client handed to callers, and one on its own connection for health checks."""

        def unavailable() -> PluginError | None:
            return self._unavailable_error(client)

        limit = self.target.max_message_bytes or self.options.max_message_bytes
        client = BackendClient(
            self.plugin_id,
            open_channel(target, max_message_bytes=limit),
            default_timeout=self.options.call_timeout,
            unavailable=unavailable,
        )
        pinger = BackendClient(
            self.plugin_id,
            open_channel(target, own_connection=True, max_message_bytes=limit),
            default_timeout=self.options.health_timeout,
        )
        self._client, self._pinger = client, pinger
        return client, pinger

    async def _first_ping(self, pinger: BackendClient, *, deadline: float) -> None:
        """The handshake and the first answered health check share the start timeout."""
        timeout = max(0.5, deadline - time.monotonic())
        try:
            ok = await pinger.ping(timeout=timeout)
        except PluginError as exc:
            raise PluginLaunchError(
                self.plugin_id, f"completed the handshake but does not answer: {exc.message}"
            ) from exc
        if not ok:
            raise PluginLaunchError(self.plugin_id, "health check says it is not serving")

    async def _services(self, client: BackendClient) -> frozenset[str] | None:
        try:
            return await client.served_services(timeout=self.options.health_timeout)
        except PluginError as exc:
            log.debug("plugin %s: reflection unavailable: %s", self.plugin_id, exc.message)
            return None

    def _become_running(self) -> None:
        if self._stopping.is_set():
            raise _StopRequested
        self._running_since = time.monotonic()
        self._set(
            state=PluginState.RUNNING,
            started_at=time.time(),
            last_error=None,
            last_output=None,
            next_start_at=None,
        )
        self._settled.set()

    async def _back_off(self, failure: _Failure) -> None:
        policy = self.options.restart
        # Only a run that reached RUNNING and stayed there resets the count; a start that
        # never got there counts however long it took.
        stable = (
            self._running_since is not None
            and time.monotonic() - self._running_since >= policy.stable_after
        )
        failures = 1 if stable else self._status.consecutive_failures + 1
        delay = policy.delay(failures, rng=self._rng)
        state = (
            PluginState.CRASH_LOOP
            if failures >= policy.crash_loop_threshold
            else PluginState.BACKING_OFF
        )
        self._after_failure = True
        self._set(
            state=state,
            consecutive_failures=failures,
            last_error=failure.reason,
            last_output=failure.output,
            last_exit_code=failure.exit_code,
            pid=None,
            address=None,
            started_at=None,
            services=None,
            stats=None,
            next_start_at=time.time() + delay,
        )
        self._settled.set()
        log.error(
            "plugin %s: %s; restarting in %.1fs (failure %d in a row%s)",
            self.plugin_id,
            failure.reason,
            delay,
            failures,
            ", crash-looping" if state is PluginState.CRASH_LOOP else "",
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):  # not wait_for: it can swallow a cancel (3.11)
                await self._stopping.wait()

    async def _release(self) -> None:
        """Let go of this run's process and connections: gracefully when stopping."""
        # Callers holding this run's client see it unavailable from here on.
        client, self._client = self._client, None
        pinger, self._pinger = self._pinger, None
        process, self._process = self._process, None
        try:
            if process is not None:
                if self._stopping.is_set() and not self._abandon and client is not None:
                    grace = self.options.stop_grace
                    shutdown = client.shutdown
                    await process.stop(
                        grace=grace, request_shutdown=lambda: shutdown(timeout=grace)
                    )
                else:
                    await process.stop(grace=0.0)
        finally:
            close_grace = ATTACHED_CLOSE_GRACE if process is None and not self._abandon else None
            for each in (client, pinger):
                if each is not None:
                    await each.close(close_grace)

    def _internal_failure(self, exc: BaseException) -> _Failure:
        if not self._internal_error_logged:
            self._internal_error_logged = True
            log.error(
                "plugin %s: unexpected error while supervising it; counting it as a failure",
                self.plugin_id,
                exc_info=exc,
            )
        return _Failure(
            _one_line(f"internal error in the plugin host: {type(exc).__name__}: {exc}")
        )

    # -- monitors --------------------------------------------------------------------------

    def _monitor(self, work: Coroutine[Any, Any, object], name: str) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("plugin %s: the %s monitor failed", self.plugin_id, name)

        return asyncio.create_task(guarded(), name=f"{self.plugin_id}-{name}")

    async def _drain_stdio(self, client: BackendClient) -> None:
        """Log what the plugin prints after it started serving (go-plugin's GRPCStdio).

        One parser per channel, as for the pipes; the stream is opened again if it breaks
        while the plugin runs, and given up only if the plugin does not serve it.
        """
        stdout, stderr = grpc_stdio_pb2.StdioData.STDOUT, grpc_stdio_pb2.StdioData.STDERR
        lines = {stdout: LineSplitter(), stderr: LineSplitter()}
        parsers = {channel: PluginLogParser(self.plugin_id) for channel in lines}
        delay = STDIO_RETRY_INITIAL
        while True:
            try:
                async for chunk in client.stream_stdio():
                    delay = STDIO_RETRY_INITIAL
                    channel = chunk.channel if chunk.channel in lines else stdout
                    for line in lines[channel].feed(chunk.data):
                        parsers[channel].feed(line)
            except NotImplementedByPlugin:
                return  # go-plugin < 1.3 has no stdio service; nothing to drain.
            except PluginError as exc:
                log.debug("plugin %s: stdio stream broke: %s", self.plugin_id, exc.message)
            await asyncio.sleep(delay)
            delay = min(STDIO_RETRY_MAX, delay * 2)

    async def _watch_health(self, pinger: BackendClient, process: PluginProcess | None) -> str:
        """Ping every interval; after too many failures in a row, return why (and kill)."""
        limit = self.options.health_failures
        failures = 0
        while True:
            await asyncio.sleep(self.options.health_interval)
            try:
                ok = await pinger.ping(timeout=self.options.health_timeout)
                detail = "health status is not SERVING"
            except PluginError as exc:
                ok, detail = False, exc.message
            if ok:
                if failures:
                    log.info("plugin %s answers health checks again", self.plugin_id)
                failures = 0
                continue
            failures += 1
            log.warning(
                "plugin %s: health check failed (%d of %d in a row): %s",
                self.plugin_id,
                failures,
                limit,
                detail,
            )
            if failures >= limit:
                reason = f"failed {failures} health checks in a row ({detail})"
                if process is not None:
                    await process.quit_then_kill(reason, wait=QUIT_BEFORE_KILL)
                return reason

    async def _watch_stats(self, process: PluginProcess) -> None:
        try:
            ps = psutil.Process(process.pid)
            await asyncio.to_thread(ps.cpu_percent, None)
            while True:
                stats = await asyncio.to_thread(_sample, ps)
                self._set(stats=stats)
                limit = self.options.memory_limit_bytes
                if limit is not None and stats.rss_bytes > limit:
                    process.kill(
                        f"used {stats.rss_bytes // 2**20} MiB of memory, over its limit of "
                        f"{limit // 2**20} MiB"
                    )
                    return
                await asyncio.sleep(self.options.stats_interval)
        except psutil.Error:
            return  # the process is gone; the exit watcher takes it from here.

    # -- state -----------------------------------------------------------------------------

    def _unavailable_error(self, client: BackendClient | None = None) -> PluginError | None:
        """Why calls cannot go through now (None: they can), for ``client`` if given."""
        status = self._status
        current = self._client
        if status.state is PluginState.RUNNING and current is not None:
            if self._stopping.is_set():
                return PluginUnavailable(self.plugin_id, "shutting down")
            if client is None or client is current:
                return None
            return PluginUnavailable(
                self.plugin_id, "was restarted since this client was obtained; get a new one"
            )
        retry_after: float | None = None
        if status.next_start_at is not None:
            retry_after = max(1.0, status.next_start_at - time.time())
        what = {
            PluginState.STOPPED: "not running",
            PluginState.STARTING: "starting",
            PluginState.BACKING_OFF: "restarting after a failure",
            PluginState.CRASH_LOOP: "crash-looping",
            PluginState.STOPPING: "shutting down",
            PluginState.RUNNING: "restarting",
        }[status.state]
        detail = f" (last error: {status.last_error})" if status.last_error else ""
        return PluginUnavailable(self.plugin_id, f"{what}{detail}", retry_after=retry_after)

    def _set(self, **changes: Unpack[_StatusChanges]) -> None:
        old = self._status
        new = replace(old, **changes)
        self._status = new
        if new.state != old.state:
            log.info("plugin %s: %s -> %s", self.plugin_id, old.state, new.state)
        if new.state != old.state or "stats" not in changes:
            for listener in self._listeners:
                try:
                    listener(new)
                except Exception:
                    log.exception("status listener failed for plugin %s", self.plugin_id)


def _sample(ps: psutil.Process) -> ProcessStats:
    with ps.oneshot():
        return ProcessStats(
            rss_bytes=ps.memory_info().rss,
            cpu_percent=ps.cpu_percent(None),
            open_fds=ps.num_fds(),
            threads=ps.num_threads(),
        )


def _one_line(text: str) -> str:
    """A reason fit for a status field and an HTTP error: its first line, bounded."""
    lines = text.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > _REASON_LIMIT or len(lines) > 1:
        first = first[:_REASON_LIMIT].rstrip() + " …"
    return first


def _slug(plugin_id: str) -> str:
    """A short readable prefix for a plugin's private directory (mkdtemp makes it unique)."""
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in plugin_id)
    return cleaned[:16]
