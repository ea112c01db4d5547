"""The stream hub: one shared ``RunStream`` per channel, fanned out to every subscriber.

A channel is Grafana Live's ``ds/<uid>/<path>`` (or ``plugin/<plugin id>/<path>`` for app
plugins) within one org. The first subscriber starts the plugin's ``RunStream``; the last one
to leave cancels it. If the stream fails while subscribers remain it is started again with
exponential backoff and a freshly built PluginContext, as Grafana Live does.

One plugin has at most ``streams.max_channels_per_plugin`` RunStream calls at once (a cancelled
one counts until it has ended), so a caller cannot open a RunStream per path without bound.

Every subscriber has a bounded buffer of its own, filled without waiting: a slow subscriber
loses its oldest messages (or is disconnected, by ``streams.overflow``) and never slows the
plugin or the other subscribers. See docs/streams.md.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from bridge.config import StreamsSettings
from bridge.metrics import BridgeMetrics
from bridge.status import StatusError
from plugin_host.client import BackendClient
from plugin_host.errors import NotImplementedByPlugin, PluginError, PluginNotFound
from protos.pluginv2 import backend_pb2 as pb

log = logging.getLogger(__name__)

# WebSocket close codes (RFC 6455 §7.4 and the 4000-4999 private range); SSE reports the same.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
CLOSE_NOT_FOUND = 4404

# How long a subscriber told to go (slow consumer, shutdown) may take to send its close
# before its connection is aborted: a client that stopped reading never lets it out.
STUCK_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class StreamKey:
    """What makes two subscriptions share one ``RunStream``."""

    plugin_id: str
    org_id: int
    uid: str  # the datasource uid; "" for an app plugin
    path: str

    @property
    def channel(self) -> str:
        """The Grafana Live channel name (the org is implied, as in Live)."""
        if self.uid:
            return f"ds/{self.uid}/{self.path}"
        return f"plugin/{self.plugin_id}/{self.path}"


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Why a subscription ended: a WebSocket close code and a one-line reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a subscriber should know that is not a frame (SSE sends it as an event)."""

    event: str
    data: Mapping[str, object]


Item = bytes | Notice


@dataclass(frozen=True, slots=True)
class StreamStart:
    """How to (re)start the plugin's stream: the first subscriber's request, as Grafana does.

    ``context`` is called for every start, so a restarted stream sees current settings.
    """

    context: Callable[[], pb.PluginContext]
    data: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


class StreamFull(Exception):
    """The channel already has ``streams.max_subscribers`` subscribers."""


class TooManyChannels(StreamFull):
    """The plugin already has ``streams.max_channels_per_plugin`` channels open.

    A subclass of :class:`StreamFull`: both are answered alike (429 / close 1013).
    """


class HubClosed(Exception):
    """The bridge is shutting down."""


class Subscriber:
    """One client's view of a channel: a bounded buffer and, at the end, why it ended."""

    def __init__(self, hub: StreamHub, channel: _Channel) -> None:
        self._hub = hub
        self.channel = channel
        self._items: deque[Item] = deque()
        self._ready = asyncio.Event()
        self.end: StreamEnd | None = None
        self.dropped = 0
        # Called if the subscriber is still there STUCK_GRACE after being told to go.
        self.on_stuck: Callable[[], None] | None = None
        self._stuck: asyncio.TimerHandle | None = None

    @property
    def key(self) -> StreamKey:
        return self.channel.key

    def push(self, item: Item) -> None:
        """Add without waiting; a full buffer applies the overflow policy."""
        if self.end is not None:
            return
        settings = self._hub.settings
        if len(self._items) >= settings.buffer_size:
            self.dropped += 1
            if settings.overflow == "disconnect":
                self._hub.count_dropped(self.key, "disconnect")
                log.warning(
                    "stream %s: disconnecting a slow subscriber (%d messages waiting)",
                    self.key.channel,
                    len(self._items),
                )
                self.finish(
                    StreamEnd(
                        CLOSE_POLICY,
                        f"slow consumer: more than {settings.buffer_size} messages waiting",
                    ),
                    discard=True,
                )
                return
            self._hub.count_dropped(self.key, "buffer_full")
            self._items.popleft()
        self._items.append(item)
        self._ready.set()

    def finish(self, end: StreamEnd, *, discard: bool = False) -> None:
        """End the subscription; what is buffered is still delivered unless ``discard``."""
        if self.end is None:
            self.end = end
        if discard:
            self._items.clear()
            if self._stuck is None:
                self._stuck = asyncio.get_running_loop().call_later(STUCK_GRACE, self._abort)
        self._ready.set()

    def _abort(self) -> None:
        if self.on_stuck is not None and self in self.channel.subscribers:
            log.warning(
                "stream %s: a subscriber did not close in time; aborting it", self.key.channel
            )
            self.on_stuck()

    async def next_batch(self, timeout: float | None = None) -> list[Item]:
        """Everything buffered, waiting for at least one item (``[]``: ended or timed out)."""
        while not self._items:
            if self.end is not None:
                return []
            self._ready.clear()
            if timeout is None:
                await self._ready.wait()
                continue
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                return []
        items = list(self._items)
        self._items.clear()
        return items

    def leave(self) -> None:
        if self._stuck is not None:
            self._stuck.cancel()
        self._hub.leave(self)


class _Channel:
    def __init__(self, key: StreamKey, start: StreamStart) -> None:
        self.key = key
        self.start = start
        self.subscribers: set[Subscriber] = set()
        self.task: asyncio.Task[None] | None = None
        self.packets = 0


class StreamHub:
    """Every shared stream of one bridge; owns the RunStream tasks and cancels them."""

    def __init__(
        self,
        settings: StreamsSettings,
        *,
        client: Callable[[str], BackendClient],
        metrics: BridgeMetrics,
    ) -> None:
        self.settings = settings
        self._client = client
        self._metrics = metrics
        self._channels: dict[StreamKey, _Channel] = {}
        self._per_plugin: dict[str, int] = {}  # RunStream tasks not yet ended, by plugin
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        registry = metrics.registry
        self._subscribers = Gauge(
            "grafana_bridge_stream_subscribers",
            "Clients subscribed to plugin streams, by plugin.",
            ("plugin_id",),
            registry=registry,
        )
        self._running = Gauge(
            "grafana_bridge_streams_running",
            "Plugin RunStream calls the bridge holds open, by plugin.",
            ("plugin_id",),
            registry=registry,
        )
        self._packets = Counter(
            "grafana_bridge_stream_packets",
            "Packets received from plugin streams, by plugin.",
            ("plugin_id",),
            registry=registry,
        )
        self._dropped = Counter(
            "grafana_bridge_stream_dropped_messages",
            "Messages not delivered to a slow subscriber, by plugin and policy.",
            ("plugin_id", "reason"),
            registry=registry,
        )
        self._refused = Counter(
            "grafana_bridge_stream_channels_refused",
            "New channels refused because the plugin had streams.max_channels_per_plugin open.",
            ("plugin_id",),
            registry=registry,
        )
        self._restarts = Counter(
            "grafana_bridge_stream_restarts",
            "Times a failed plugin stream was started again, by plugin.",
            ("plugin_id",),
            registry=registry,
        )

    # -- subscribers --------------------------------------------------------------------------

    def join(self, key: StreamKey, start: StreamStart) -> Subscriber:
        """Subscribe; the first subscriber of a channel starts the plugin's stream."""
        if self._closed:
            raise HubClosed("the bridge is shutting down")
        channel = self._channels.get(key)
        if channel is None:
            # Every new path is one more RunStream on the plugin: bounded per plugin, as calls
            # are by limits.max_calls_per_plugin (which streams, being long, are not counted in).
            open_now = self._per_plugin.get(key.plugin_id, 0)
            limit = self.settings.max_channels_per_plugin
            if open_now >= limit:
                self._refused.labels(key.plugin_id).inc()  # the handler logs the refusal
                raise TooManyChannels(
                    f"plugin {key.plugin_id} has {open_now} open streams "
                    f"(streams.max_channels_per_plugin)"
                )
            channel = _Channel(key, start)
            self._channels[key] = channel
            self._per_plugin[key.plugin_id] = open_now + 1
        elif len(channel.subscribers) >= self.settings.max_subscribers:
            raise StreamFull(
                f"stream {key.channel} already has {len(channel.subscribers)} subscribers "
                f"(streams.max_subscribers)"
            )
        subscriber = Subscriber(self, channel)
        channel.subscribers.add(subscriber)
        self._subscribers.labels(key.plugin_id).inc()
        if channel.task is None:
            channel.task = asyncio.create_task(self._run(channel), name=f"stream {key.channel}")
            self._tasks.add(channel.task)
            channel.task.add_done_callback(self._tasks.discard)
            # The slot is the RunStream's, so it is given back when the task has ended, not
            # when the channel leaves the table: a cancelled call may still be winding down on
            # the plugin, and a new channel must not start beside it over the limit.
            plugin_id = key.plugin_id
            channel.task.add_done_callback(lambda _: self._release(plugin_id))
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        """Unsubscribe (idempotent); the last subscriber to leave cancels the plugin's stream."""
        channel = subscriber.channel
        if subscriber not in channel.subscribers:
            return
        channel.subscribers.discard(subscriber)
        self._subscribers.labels(channel.key.plugin_id).dec()
        if not channel.subscribers:
            self._forget(channel)
            if channel.task is not None:
                channel.task.cancel()

    def _forget(self, channel: _Channel) -> None:
        """Take ``channel`` out of the table (idempotent)."""
        key = channel.key
        if self._channels.get(key) is channel:
            del self._channels[key]

    def _release(self, plugin_id: str) -> None:
        """A channel's RunStream task has ended: its per-plugin slot is free again."""
        remaining = self._per_plugin[plugin_id] - 1
        if remaining:
            self._per_plugin[plugin_id] = remaining
        else:
            del self._per_plugin[plugin_id]

    def publish(self, key: StreamKey, data: bytes) -> int:
        """Send ``data`` to every subscriber of ``key`` (a PublishStream's answer); how many."""
        channel = self._channels.get(key)
        if channel is None:
            return 0
        for subscriber in list(channel.subscribers):
            subscriber.push(data)
        return len(channel.subscribers)

    def subscriber_count(self, key: StreamKey) -> int:
        channel = self._channels.get(key)
        return len(channel.subscribers) if channel is not None else 0

    def channels(self) -> list[StreamKey]:
        return list(self._channels)

    def count_dropped(self, key: StreamKey, reason: str) -> None:
        self._dropped.labels(key.plugin_id, reason).inc()

    async def close(self) -> None:
        """End every subscription (1001) and cancel and await every plugin stream."""
        self._closed = True
        for channel in list(self._channels.values()):
            self._end(channel, StreamEnd(CLOSE_GOING_AWAY, "the bridge is shutting down"))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the plugin's stream ------------------------------------------------------------------

    def _end(self, channel: _Channel, end: StreamEnd) -> None:
        """End every subscription of ``channel`` and forget it (its task is ending or done)."""
        self._forget(channel)
        for subscriber in list(channel.subscribers):
            subscriber.finish(end, discard=end.code == CLOSE_GOING_AWAY)

    async def _run(self, channel: _Channel) -> None:
        key = channel.key
        settings = self.settings
        backoff = settings.restart_backoff
        self._running.labels(key.plugin_id).inc()
        try:
            while True:
                failure = await self._run_once(channel)
                if failure is None:
                    log.info("stream %s ended: the plugin returned", key.channel)
                    self._end(channel, StreamEnd(CLOSE_NORMAL, "stream ended"))
                    return
                if isinstance(failure, StreamEnd):
                    self._end(channel, failure)
                    return
                if channel.packets:
                    backoff = settings.restart_backoff
                channel.packets = 0
                delay = backoff * random.uniform(0.8, 1.2)  # jitter, not secrets
                backoff = min(backoff * 2, settings.restart_max_backoff)
                log.warning(
                    "stream %s failed (%s); starting it again in %.1fs",
                    key.channel,
                    failure,
                    delay,
                )
                notice = Notice(
                    "restarting", {"channel": key.channel, "error": str(failure), "in": delay}
                )
                for subscriber in list(channel.subscribers):
                    subscriber.push(notice)
                await asyncio.sleep(delay)
                self._restarts.labels(key.plugin_id).inc()
        except Exception:
            # A bug, not a plugin failure: without this the channel would stay registered with
            # a dead task, its subscribers waiting forever and new ones joining a dead stream.
            log.exception("stream %s failed unexpectedly; ending it", key.channel)
            self._end(channel, StreamEnd(CLOSE_INTERNAL, "internal error in the bridge"))
        finally:
            self._running.labels(key.plugin_id).dec()

    async def _run_once(self, channel: _Channel) -> PluginError | StreamEnd | None:
        """One RunStream call: None when the plugin ended it, else what went wrong."""
        key = channel.key
        try:
            context = channel.start.context()
        except StatusError as exc:
            # The datasource was removed or disabled since the first subscriber came.
            log.warning("stream %s cannot start again: %s", key.channel, exc.message)
            return StreamEnd(CLOSE_NOT_FOUND, exc.message)
        request = pb.RunStreamRequest(
            pluginContext=context,
            path=key.path,
            data=channel.start.data,
            headers=dict(channel.start.headers),
        )
        packets = self._packets.labels(key.plugin_id)
        try:
            with self._metrics.plugin_call(key.plugin_id, "runStream"):
                async for packet in self._client(key.plugin_id).run_stream(request):
                    channel.packets += 1
                    packets.inc()
                    for subscriber in list(channel.subscribers):
                        subscriber.push(packet.data)
        except (NotImplementedByPlugin, PluginNotFound) as exc:
            log.warning("stream %s cannot run: %s", key.channel, exc)
            return StreamEnd(CLOSE_INTERNAL, str(exc))
        except PluginError as exc:
            return exc
        return None
