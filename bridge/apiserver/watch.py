"""Watch: a stream of ``{"type": ..., "object": ...}`` lines, one per change.

Where it starts (kube's rules): without ``resourceVersion`` (or with ``0``) the stream opens
with a synthetic ``ADDED`` for every current object; with ``resourceVersion=N`` it carries
every change after N; with ``sendInitialEvents=true`` it opens with the current objects and
then a ``BOOKMARK`` annotated ``k8s.io/initial-events-end: "true"`` (client-go's watch-list).
With selectors, an object that starts matching arrives as ``ADDED`` and one that stops
matching as ``DELETED``. ``allowWatchBookmarks=true`` adds a ``BOOKMARK`` after each idle
``bookmark_interval``. A resume point the store no longer remembers ends the stream with one
``ERROR`` event carrying a 410 ``Expired`` Status; the client lists again.

The stream ends after ``timeoutSeconds`` (or the server's default), when the client goes
away, or when the store fails; in every case the store's watch is closed and the task that
pumped it is awaited before the handler returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bridge.apis import API_VERSION, KIND
from bridge.apiserver import errors
from bridge.apiserver.selectors import Selection
from bridge.status import StatusError, status_body
from bridge.storage import Store, StoreError, WatchEvent, WatchEventType

log = logging.getLogger(__name__)

INITIAL_EVENTS_END = "k8s.io/initial-events-end"
# How often an idle stream checks that its client is still there.
_TICK = 1.0

Render = Callable[[Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class WatchRequest:
    """A watch's parameters, parsed and checked (see :meth:`from_query`)."""

    resource_version: int | None
    send_initial_events: bool
    bookmarks: bool
    timeout: float

    @classmethod
    def from_query(cls, query: Mapping[str, str], *, default_timeout: float) -> WatchRequest:
        raw = query.get("resourceVersion", "")
        version: int | None = None
        if raw not in ("", "0"):
            try:
                version = int(raw)
            except ValueError:
                raise errors.bad_request(f"invalid resourceVersion {raw!r}") from None
            if version < 0:
                raise errors.bad_request(f"invalid resourceVersion {raw!r}")
        timeout = default_timeout
        raw_timeout = query.get("timeoutSeconds", "")
        if raw_timeout:
            try:
                seconds = int(raw_timeout)
            except ValueError:
                raise errors.bad_request(f"invalid timeoutSeconds {raw_timeout!r}") from None
            if seconds < 0:
                raise errors.bad_request("timeoutSeconds must not be negative")
            if seconds:
                timeout = float(seconds)
        initial = _flag(query, "sendInitialEvents")
        match = query.get("resourceVersionMatch", "")
        if match not in ("", "NotOlderThan"):
            raise errors.bad_request(
                f"resourceVersionMatch {match!r} is not allowed for watch; use NotOlderThan"
            )
        return cls(
            resource_version=version,
            send_initial_events=initial,
            bookmarks=_flag(query, "allowWatchBookmarks"),
            timeout=timeout,
        )

    @property
    def lists_first(self) -> bool:
        return self.send_initial_events or self.resource_version is None


def _flag(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "")
    if value in ("", "false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise errors.bad_request(f"{name} must be true or false, not {value!r}")


def bookmark(version: int, *, initial_events_end: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"resourceVersion": str(version)}
    if initial_events_end:
        metadata["annotations"] = {INITIAL_EVENTS_END: "true"}
    return {"kind": KIND, "apiVersion": API_VERSION, "metadata": metadata}


class _Stream:
    """One watch response: filtering, rendering and writing events."""

    def __init__(self, response: web.StreamResponse, selection: Selection, render: Render) -> None:
        self.response = response
        self.selection = selection
        self.render = render
        self.visible: set[str] = set()
        self.last_sent = time.monotonic()

    async def send(self, kind: str, obj: Mapping[str, Any]) -> None:
        line = json.dumps({"type": kind, "object": obj}, separators=(",", ":")) + "\n"
        await self.response.write(line.encode())
        self.last_sent = time.monotonic()

    async def change(self, event: WatchEvent) -> None:
        """Send ``event`` as this client sees it through its selectors (or nothing)."""
        if self.selection.everything:
            await self.send(event.type.value, self.render(event.object))
            return
        name = str((event.object.get("metadata") or {}).get("name", ""))
        matches = self.selection.matches(event.object)
        kind: str | None
        if event.type is WatchEventType.DELETED:
            kind = "DELETED" if matches or name in self.visible else None
            self.visible.discard(name)
        elif matches:
            kind = "MODIFIED" if name in self.visible else "ADDED"
            self.visible.add(name)
        elif name in self.visible:
            kind = "DELETED"
            self.visible.discard(name)
        else:
            kind = None
        if kind is not None:
            await self.send(kind, self.render(event.object))


async def _pump(
    store: Store, since: int | None, queue: asyncio.Queue[WatchEvent | BaseException | None]
) -> None:
    """Move the store's events into ``queue``; a failure, or None at the end, goes last."""
    try:
        events = store.watch(since=since, bookmarks=False)
        try:
            async for event in events:
                await queue.put(event)
            await queue.put(None)  # the store ended the watch (it is closing)
        finally:
            close = getattr(events, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
    except Exception as exc:  # the writer sends it as an ERROR event and ends the stream
        await queue.put(exc)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def serve_watch(
    request: web.Request,
    store: Store,
    params: WatchRequest,
    selection: Selection,
    render: Render,
    *,
    bookmark_interval: float,
) -> web.StreamResponse:
    """Answer ``request`` with a watch stream (see the module docstring)."""
    initial: list[dict[str, Any]] = []
    resumed_visible: set[str] = set()
    since = params.resource_version
    if params.lists_first or not selection.everything:
        try:
            items, listed_at = await store.list()
        except StoreError as exc:
            raise errors.from_store_error(exc) from None
        if params.lists_first:
            initial, since = items, listed_at
        else:
            # Resuming with selectors: whatever matches now is what the client last saw.
            resumed_visible = {
                str(item["metadata"]["name"]) for item in items if selection.matches(item)
            }
    response = web.StreamResponse()
    response.content_type = "application/json"
    response.headers["Cache-Control"] = "no-cache, private"
    await response.prepare(request)
    stream = _Stream(response, selection, render)
    stream.visible = resumed_visible
    queue: asyncio.Queue[WatchEvent | BaseException | None] = asyncio.Queue(maxsize=256)
    pump = asyncio.create_task(_pump(store, since, queue), name="dataplaneservice-watch")
    last_version = since or 0
    deadline = time.monotonic() + params.timeout
    try:
        for item in initial:
            await stream.change(WatchEvent(WatchEventType.ADDED, item, last_version))
        if params.send_initial_events:
            await stream.send("BOOKMARK", bookmark(last_version, initial_events_end=True))
        while True:
            now = time.monotonic()
            if now >= deadline or _gone(request):
                break
            wait = min(_TICK, deadline - now)
            # Idle means nothing *sent*: changes the selectors hide still need a bookmark.
            bookmark_due = stream.last_sent + bookmark_interval
            if params.bookmarks:
                wait = min(wait, max(0.0, bookmark_due - now))
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
                async with asyncio.timeout(wait):
                    item_or_error = await queue.get()
            except TimeoutError:
                if params.bookmarks and time.monotonic() >= bookmark_due:
                    await stream.send("BOOKMARK", bookmark(last_version))
                continue
            if item_or_error is None:
                break
            if isinstance(item_or_error, BaseException):
                await stream.send("ERROR", _error_status(item_or_error))
                break
            event = item_or_error
            last_version = max(last_version, event.resource_version)
            if event.type is WatchEventType.BOOKMARK:
                if params.bookmarks:
                    await stream.send("BOOKMARK", bookmark(last_version))
            else:
                await stream.change(event)
    except ConnectionResetError:
        log.debug("watch client went away")
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


def _error_status(error: BaseException) -> dict[str, object]:
    if isinstance(error, StoreError):
        status: StatusError = errors.from_store_error(error)
    else:
        log.error("watch failed", exc_info=error)
        status = StatusError(500, "internal error while watching; see the bridge log")
    return status_body(status.code, status.message, status.reason, status.details)
