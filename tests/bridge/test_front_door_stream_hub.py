"""Unit tests of the stream hub (bridge/streams.py) with an in-process stand-in plugin client.

The end-to-end behaviour is in test_front_door_stream*.py against real plugin processes; these
reach the failure paths a well-behaved plugin client never takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import pytest

from bridge.config import StreamsSettings
from bridge.metrics import BridgeMetrics
from bridge.streams import (
    CLOSE_INTERNAL,
    StreamHub,
    StreamKey,
    StreamStart,
    TooManyChannels,
)
from plugin_host.client import BackendClient
from protos.pluginv2 import backend_pb2 as pb

KEY = StreamKey("fake-plugin", 1, "ds", "ticks")
START = StreamStart(context=pb.PluginContext)


class BrokenClient:
    """``run_stream`` sends one packet, then fails with an error no plugin call maps."""

    def __init__(self) -> None:
        self.calls = 0

    def run_stream(self, request: pb.RunStreamRequest) -> AsyncIterator[pb.StreamPacket]:
        self.calls += 1
        return self._packets()

    async def _packets(self) -> AsyncIterator[pb.StreamPacket]:
        yield pb.StreamPacket(data=b'{"n":0}')
        raise RuntimeError("a bug, not a plugin error")


async def test_an_unexpected_failure_ends_the_channel_instead_of_hanging_it() -> None:
    client = BrokenClient()
    hub = StreamHub(
        StreamsSettings(),
        client=lambda plugin_id: cast(BackendClient, client),
        metrics=BridgeMetrics(lambda: []),
    )
    try:
        first = hub.join(KEY, START)
        async with asyncio.timeout(5):
            assert await first.next_batch() == [b'{"n":0}']
            assert await first.next_batch() == []
        assert first.end is not None
        assert first.end.code == CLOSE_INTERNAL
        assert "internal error" in first.end.reason
        assert "a bug" not in first.end.reason  # details stay in the log
        first.leave()
        assert hub.channels() == []
        # The next subscriber gets a stream of its own, not the dead channel.
        second = hub.join(KEY, START)
        async with asyncio.timeout(5):
            assert await second.next_batch() == [b'{"n":0}']
        assert client.calls == 2
        second.leave()
    finally:
        await hub.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("stream ")]


async def _streams_wound_down() -> None:
    """Until no stream task is left running (a cancelled one takes a few loop turns)."""
    running = [t for t in asyncio.all_tasks() if t.get_name().startswith("stream ")]
    if running:
        await asyncio.wait(running, timeout=5)
    await asyncio.sleep(0)  # a finished task's done callbacks run on the next loop turn


async def test_a_channel_that_ends_frees_its_place_in_the_per_plugin_limit() -> None:
    """max_channels_per_plugin counts RunStream tasks until they have ended, however they end:
    the last subscriber leaving, or the stream ending while subscribers are still attached."""
    client = BrokenClient()
    hub = StreamHub(
        StreamsSettings(max_channels_per_plugin=1),
        client=lambda plugin_id: cast(BackendClient, client),
        metrics=BridgeMetrics(lambda: []),
    )
    other_path = StreamKey("fake-plugin", 1, "ds", "other")
    other_plugin = StreamKey("other-plugin", 1, "ds", "ticks")
    try:
        first = hub.join(KEY, START)
        with pytest.raises(TooManyChannels, match="fake-plugin has 1 open streams"):
            hub.join(other_path, START)
        hub.join(other_plugin, START).leave()  # another plugin: a count of its own
        # The stream ends (a bug here) with `first` still attached: once its task has ended,
        # its place is free.
        async with asyncio.timeout(5):
            while first.end is None:
                await first.next_batch()
        await _streams_wound_down()
        second = hub.join(other_path, START)
        first.leave()  # leaving a forgotten channel frees nothing twice
        with pytest.raises(TooManyChannels):
            hub.join(KEY, START)
        second.leave()
        # The slot is the RunStream's: taken until the cancelled task has really ended.
        with pytest.raises(TooManyChannels):
            hub.join(KEY, START)
        await _streams_wound_down()
        hub.join(KEY, START).leave()
    finally:
        await hub.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("stream ")]
