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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import psutil

from plugin_host.client import BackendClient, open_channel
from plugin_host.errors import (
    NotImplementedByPlugin,
    PluginError,
    PluginLaunchError,
    PluginUnavailable,
)
from plugin_host.logs import plugin_logger
from plugin_host.process import PluginProcess

log = logging.getLogger(__name__)


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
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, failures - 1))
        spread = (rng or random).uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return float(min(self.max_backoff, base * spread))


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


@dataclass(frozen=True, slots=True)
class PluginTarget:
    """What to run (or attach to) for one plugin, independent of how it was found."""

    plugin_id: str
    plugin_version: str = ""
    executable: Path | None = None
    attach_address: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

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
    """A snapshot of one supervised plugin, for status endpoints, metrics and controllers."""

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


StatusListener = Callable[[PluginStatus], None]


class PluginSupervisor:
    """Keeps one plugin running and exposes a client while it is."""

    def __init__(
        self,
        target: PluginTarget,
        *,
        options: SupervisorOptions,
        socket_root: Path,
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
        self._client: BackendClient | None = None
        self._process: PluginProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._settled = asyncio.Event()
        self._listeners: list[StatusListener] = []
        self._kill_reason: str | None = None
        self._generation = 0

    @property
    def plugin_id(self) -> str:
        return self.target.plugin_id

    @property
    def status(self) -> PluginStatus:
        return self._status

    def add_listener(self, listener: StatusListener) -> None:
        self._listeners.append(listener)

    def client(self) -> BackendClient:
        """The running plugin's client; raises :class:`PluginUnavailable` at once otherwise."""
        error = self._unavailable_error()
        if error is not None:
            raise error
        assert self._client is not None
        return self._client

    def start(self) -> None:
        """Begin supervising (returns at once; see :meth:`wait_settled`)."""
        if self._task is not None:
            return
        self._stopping.clear()
        self._settled.clear()
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.plugin_id}")

    async def wait_settled(self, timeout: float | None = None) -> PluginStatus:
        """Wait until the first start attempt has succeeded or failed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), timeout)
        return self._status

    async def stop(self) -> None:
        """Stop the plugin (Shutdown, grace, SIGKILL) and the supervision task."""
        self._stopping.set()
        task, self._task = self._task, None
        if task is None:
            return
        if self._status.state is not PluginState.STOPPED:
            self._set(state=PluginState.STOPPING)
        process = self._process
        if process is not None:
            client = self._client
            await process.stop(
                grace=self.options.stop_grace,
                request_shutdown=(lambda: client.shutdown(timeout=self.options.stop_grace))
                if client is not None
                else None,
            )
            # The loop sees the exit and the stop flag, releases the client and ends itself.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
        # Still starting, backing off or attached: nothing to wait for, cancel it.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._set(state=PluginState.STOPPED, pid=None, address=None, next_start_at=None, stats=None)

    def restart_now(self, reason: str) -> None:
        """Kill the running process; the supervisor starts it again (used for hung plugins)."""
        if self._process is not None:
            self._kill_reason = reason
            self._process.kill()

    # -- the supervision loop --------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._generation += 1
                self._set(state=PluginState.STARTING, next_start_at=None)
                started = time.monotonic()
                try:
                    reason = await self._run_once()
                except PluginLaunchError as exc:
                    reason = exc.message
                    self._set(last_exit_code=getattr(exc, "exit_code", None))
                finally:
                    await self._release()
                if self._stopping.is_set():
                    break
                await self._back_off(reason, ran_for=time.monotonic() - started)
        finally:
            self._settled.set()

    async def _run_once(self) -> str:
        """Start the plugin, serve until it fails; return why it stopped serving."""
        if self.target.attach_address is not None:
            return await self._attach(self.target.attach_address)
        assert self.target.executable is not None
        deadline = time.monotonic() + self.options.start_timeout
        workdir = self._socket_root / f"{_slug(self.plugin_id)}-{self._generation}"
        process = await PluginProcess.start(
            plugin_id=self.plugin_id,
            executable=self.target.executable,
            env=self.target.env,
            workdir=workdir,
            start_timeout=self.options.start_timeout,
        )
        self._process = process
        self._set(pid=process.pid, address=process.handshake.address)
        client = BackendClient(
            self.plugin_id,
            open_channel(process.handshake.grpc_target),
            default_timeout=self.options.call_timeout,
            unavailable=self._unavailable_error,
        )
        self._client = client
        await self._first_ping(client, deadline=deadline)
        services = await self._services(client)
        self._set(services=services)
        self._become_running()
        monitors = [
            asyncio.create_task(self._drain_stdio(client), name=f"{self.plugin_id}-stdio"),
            asyncio.create_task(self._watch_health(client), name=f"{self.plugin_id}-health"),
            asyncio.create_task(self._watch_stats(process), name=f"{self.plugin_id}-stats"),
        ]
        try:
            code = await process.wait()
        finally:
            for task in monitors:
                task.cancel()
            await asyncio.gather(*monitors, return_exceptions=True)
        self._set(last_exit_code=code)
        killed_because, self._kill_reason = self._kill_reason, None
        if killed_because is not None:
            return killed_because
        tail = process.stderr_tail
        reason = _describe_exit(code)
        return f"{reason}; last output on stderr:\n{tail}" if tail else reason

    async def _attach(self, address: str) -> str:
        """Standalone mode: talk to a plugin someone else runs, and watch that it answers."""
        client = BackendClient(
            self.plugin_id,
            open_channel(address),
            default_timeout=self.options.call_timeout,
            unavailable=self._unavailable_error,
        )
        self._client = client
        self._set(address=address)
        try:
            ok = await client.ping(timeout=self.options.health_timeout)
        except PluginError as exc:
            return f"cannot reach plugin at {address}: {exc.message}"
        if not ok:
            return f"plugin at {address} reports it is not serving"
        self._set(services=await self._services(client))
        self._become_running()
        return await self._watch_health(client)

    async def _first_ping(self, client: BackendClient, *, deadline: float) -> None:
        """The handshake and the first answered health check share the start timeout."""
        timeout = max(0.5, deadline - time.monotonic())
        try:
            ok = await client.ping(timeout=timeout)
        except PluginError as exc:
            raise PluginLaunchError(
                self.plugin_id, f"plugin completed the handshake but does not answer: {exc.message}"
            ) from exc
        if not ok:
            raise PluginLaunchError(self.plugin_id, "plugin health check says it is not serving")

    async def _services(self, client: BackendClient) -> frozenset[str] | None:
        try:
            return await client.served_services(timeout=self.options.health_timeout)
        except PluginError as exc:
            log.debug("plugin %s: reflection unavailable: %s", self.plugin_id, exc)
            return None

    def _become_running(self) -> None:
        self._set(
            state=PluginState.RUNNING,
            started_at=time.time(),
            last_error=None,
            next_start_at=None,
        )
        self._settled.set()

    async def _back_off(self, reason: str, *, ran_for: float) -> None:
        policy = self.options.restart
        failures = self._status.consecutive_failures
        if ran_for >= policy.stable_after:
            failures = 0
        failures += 1
        delay = policy.delay(failures, rng=self._rng)
        state = (
            PluginState.CRASH_LOOP
            if failures >= policy.crash_loop_threshold
            else PluginState.BACKING_OFF
        )
        self._set(
            state=state,
            consecutive_failures=failures,
            restarts=self._status.restarts + 1,
            last_error=reason,
            pid=None,
            stats=None,
            next_start_at=time.time() + delay,
        )
        self._settled.set()
        log.error(
            "plugin %s: %s; restarting in %.1fs (failure %d in a row%s)",
            self.plugin_id,
            reason,
            delay,
            failures,
            ", crash-looping" if state is PluginState.CRASH_LOOP else "",
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _release(self) -> None:
        client, self._client = self._client, None
        process, self._process = self._process, None
        if process is not None:
            await process.stop(grace=0.0)
        if client is not None:
            await client.close()

    # -- monitors --------------------------------------------------------------------------

    async def _drain_stdio(self, client: BackendClient) -> None:
        logger = plugin_logger(self.plugin_id)
        try:
            async for chunk in client.stream_stdio():
                text = chunk.data.decode("utf-8", "replace").rstrip("\n")
                if text:
                    logger.info(
                        "%s", text, extra={"plugin_id": self.plugin_id, "plugin_fields": {}}
                    )
        except NotImplementedByPlugin:
            return  # go-plugin < 1.3 has no stdio service; nothing to drain.
        except PluginError:
            return  # the stream ends with the process.

    async def _watch_health(self, client: BackendClient) -> str:
        failures = 0
        while True:
            await asyncio.sleep(self.options.health_interval)
            try:
                ok = await client.ping(timeout=self.options.health_timeout)
            except PluginError as exc:
                ok, detail = False, exc.message
            else:
                detail = "health status is not SERVING"
            if ok:
                failures = 0
                continue
            failures += 1
            if failures >= self.options.health_failures:
                reason = f"failed {failures} health checks in a row ({detail})"
                if self.target.attach_address is not None:
                    return reason
                self.restart_now(reason)
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
                    self.restart_now(
                        f"used {stats.rss_bytes // 2**20} MiB of memory, over its limit of "
                        f"{limit // 2**20} MiB"
                    )
                    return
                await asyncio.sleep(self.options.stats_interval)
        except psutil.Error:
            return  # the process is gone; the exit watcher takes it from here.

    # -- state -----------------------------------------------------------------------------

    def _unavailable_error(self) -> PluginError | None:
        status = self._status
        if status.state is PluginState.RUNNING and self._client is not None:
            return None
        retry_after: float | None = None
        if status.next_start_at is not None:
            retry_after = max(1.0, status.next_start_at - time.time())
        what = {
            PluginState.STOPPED: "is not running",
            PluginState.STARTING: "is starting",
            PluginState.BACKING_OFF: "is restarting after a failure",
            PluginState.CRASH_LOOP: "is crash-looping",
            PluginState.STOPPING: "is shutting down",
            PluginState.RUNNING: "is restarting",
        }[status.state]
        detail = f" (last error: {status.last_error})" if status.last_error else ""
        return PluginUnavailable(self.plugin_id, f"plugin {what}{detail}", retry_after=retry_after)

    def _set(self, **changes: object) -> None:
        old = self._status
        new = replace(old, **changes)  # type: ignore[arg-type]
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


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"plugin process was killed by signal {-code}"
    return f"plugin process exited unexpectedly with status {code}"


def _slug(plugin_id: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in plugin_id)
    return cleaned[:24]
