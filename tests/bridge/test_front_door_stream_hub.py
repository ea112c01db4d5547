"""Unit tests of the stream hub (bridge/streams.py) with an in-process stand-in plugin client.

The end-to-end behaviour is in test_front_door_stream*.py against real plugin processes; these
reach the failure paths a well-behaved plugin client never takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

from bridge.config import StreamsSettings
from bridge.metrics import BridgeMetrics
from bridge.streams import CLOSE_INTERNAL, StreamHub, StreamKey, StreamStart
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
