"""Availability: the ``Available`` condition of each DataPlaneService, from its plugin's state."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bridge.apis import CONDITION_AVAILABLE, DataPlaneService, InvalidObject, find_condition
from bridge.controllers.leader import Elector, SingleReplica
from bridge.routing import RouteTable
from bridge.storage import Conflict, NotFound, Store, StoreError
from plugin_host.supervisor import PluginState, PluginStatus

log = logging.getLogger(__name__)

AVAILABLE = CONDITION_AVAILABLE


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the condition says. ``message`` is the stable part, compared to decide whether
    status must be written; ``detail`` (failure counts, the last error) changes from one look
    to the next, so it is written along with a change but never causes one."""

    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str
    detail: str = ""

    @property
    def text(self) -> str:
        """The condition's message: the stable part, then the details in parentheses."""
        return f"{self.message} ({self.detail})" if self.detail else self.message

    def said_by(self, condition: Mapping[str, Any]) -> bool:
        """Whether ``condition`` already says this, details aside."""
        if (condition.get("status"), condition.get("reason")) != (self.status, self.reason):
            return False
        written = str(condition.get("message") or "")
        return written == self.message or (
            written.startswith(f"{self.message} (") and written.endswith(")")
        )


def judge(
    obj: Mapping[str, Any],
    *,
    table: RouteTable,
    plugins: Mapping[str, PluginStatus],
    load_errors: Mapping[str, str],
    healthy: Mapping[str, bool],
    parsed: DataPlaneService | InvalidObject | None = None,
) -> Verdict:
    """What the Available condition of one object should say right now.

    ``parsed`` is the object's typed form when the caller already has it (the registration
    controller keeps one per stored object); without it the object is parsed here.
    """
    name = obj["metadata"]["name"]
    if parsed is None:
        try:
            parsed = DataPlaneService.from_object(obj)
        except InvalidObject as exc:
            parsed = exc
    if isinstance(parsed, InvalidObject):
        return Verdict("False", "Invalid", str(parsed))
    service = parsed
    if name in table.conflicts:
        return Verdict(
            "False",
            "Conflict",
            f"{service.group}/{service.version} is already served by {table.conflicts[name]}; "
            "manifests take precedence over stored objects",
        )
    plugin = plugins.get(service.plugin_id)
    if plugin is None:
        # Why it did not load (a file's path, a parse error) is detail: written to the status,
        # never put in an answer to a caller.
        why = load_errors.get(service.plugin_id)
        return Verdict(
            "False",
            "PluginNotFound",
            f"plugin {service.plugin_id} is not loaded",
            why or "no plugin with that id was found in the plugin directories",
        )
    if plugin.state is PluginState.CRASH_LOOP:
        return Verdict(
            "False",
            "CrashLooping",
            f"plugin {service.plugin_id} is crash-looping",
            f"{plugin.consecutive_failures} failures in a row; last error: "
            f"{_one_line(plugin.last_error)}",
        )
    if plugin.state is not PluginState.RUNNING:
        return Verdict(
            "False",
            "PluginNotRunning",
            f"plugin {service.plugin_id} is {plugin.state}",
            f"last error: {_one_line(plugin.last_error)}" if plugin.last_error else "",
        )
    if not healthy.get(service.plugin_id, True):
        return Verdict(
            "False",
            "HealthCheckFailed",
            f"plugin {service.plugin_id} did not answer its health check",
        )
    return Verdict("True", "Passed", "all checks passed")


def _one_line(text: str | None) -> str:
    return (text or "unknown").splitlines()[0][:300]


def with_condition(
    obj: Mapping[str, Any], verdict: Verdict, *, now: datetime
) -> dict[str, Any] | None:
    """A copy of ``obj`` with the condition set, or None if it already says that (status,
    reason and the stable part of the message: new details alone are not worth a write).

    ``lastTransitionTime`` moves only when the status changes, as Kubernetes' helpers do.
    """
    old = find_condition(obj, AVAILABLE)
    if old is not None and verdict.said_by(old):
        return None
    changed_at = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    if old is not None and old.get("status") == verdict.status and old.get("lastTransitionTime"):
        changed_at = old["lastTransitionTime"]
    condition = {
        "type": AVAILABLE,
        "status": verdict.status,
        "lastTransitionTime": changed_at,
        "reason": verdict.reason,
        "message": verdict.text,
    }
    updated = copy.deepcopy(dict(obj))
    status = updated.setdefault("status", {}) or {}
    updated["status"] = status
    others = [c for c in status.get("conditions") or [] if c.get("type") != AVAILABLE]
    status["conditions"] = [*others, condition]
    return updated


class AvailabilityController:
    """Re-judges every object when plugins or objects change (and every ``resync`` seconds),
    and writes status only where the verdict changed — and only while ``leader`` says this
    replica is the leader (bridge/controllers/leader.py). A follower still judges: its own
    view is in :attr:`verdicts`, but the stored status is the leader's."""

    def __init__(
        self,
        store: Store,
        *,
        objects: Callable[[], Mapping[str, Mapping[str, Any]]],
        table: Callable[[], RouteTable],
        plugins: Callable[[], list[PluginStatus]],
        load_errors: Callable[[], Mapping[str, str]],
        ping: Callable[[str], Awaitable[bool]],
        parsed: Callable[[str], DataPlaneService | InvalidObject | None] = lambda _: None,
        resync: float = 10.0,
        leader: Elector | None = None,
    ) -> None:
        self._store = store
        self._objects = objects
        self._table = table
        self._plugins = plugins
        self._load_errors = load_errors
        self._ping = ping
        self._parsed = parsed
        self._resync = resync
        self.leader: Elector = leader if leader is not None else SingleReplica()
        self.leader.add_listener(self.poke)  # a new leader writes what it sees at once
        self.verdicts: dict[str, Verdict] = {}  # this replica's own view, leader or not
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self, *_: object) -> None:
        """Something changed; judge again soon. Safe to call from any listener."""
        self._dirty.set()

    def start(self) -> None:
        if self._task is None:
            self.leader.start()
            self._task = asyncio.create_task(self._run(), name="availability-controller")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.leader.stop()  # before the store closes: the lease is given back

    async def _run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
            # that arrives as the awaited thing completes, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._resync):
                    await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.reconcile()
            except StoreError as exc:
                log.warning("cannot update DataPlaneService status: %s", exc.message)
            except Exception:
                log.exception("availability controller failed; retrying at the next change")

    async def reconcile(self) -> int:
        """Judge every object once; returns how many statuses were written (none unless
        this replica leads)."""
        plugins = {p.plugin_id: p for p in self._plugins()}
        healthy: dict[str, bool] = {}
        for plugin_id, status in plugins.items():
            if status.state is PluginState.RUNNING:
                healthy[plugin_id] = await self._ping(plugin_id)
        table = self._table()
        load_errors = self._load_errors()
        written = 0
        objects = list(self._objects().values())
        self.verdicts = {
            obj["metadata"]["name"]: judge(
                obj,
                table=table,
                plugins=plugins,
                load_errors=load_errors,
                healthy=healthy,
                parsed=self._parsed(obj["metadata"]["name"]),
            )
            for obj in objects
        }
        for obj in objects:
            if not self.leader.is_leader:
                break  # followers judge but never write
            verdict = self.verdicts[obj["metadata"]["name"]]
            updated = with_condition(obj, verdict, now=datetime.now(UTC))
            if updated is None:
                continue
            version = int(obj["metadata"]["resourceVersion"])
            try:
                await self._store.update(updated, expected_version=version)
            except (Conflict, NotFound):
                self._dirty.set()  # someone else wrote first; judge the new version next round
                continue
            written += 1
            log.info(
                "DataPlaneService %s: Available=%s (%s)",
                obj["metadata"]["name"],
                verdict.status,
                verdict.reason,
            )
        return written
