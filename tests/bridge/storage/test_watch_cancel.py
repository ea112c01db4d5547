"""A watch cancelled just as an event arrives must end (Python 3.11's wait_for would not).

``asyncio.wait_for`` in 3.11 returns the awaited result instead of raising ``CancelledError``
when the result and the cancellation land in the same loop turn. The etcd watch waited with it,
so a bridge stopping as an event came in (the leader's lease key being deleted on shutdown)
kept waiting for the next event and never exited; found by tests/reliability/test_chaos.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.storage.etcd import _WatchStream


class _Call:
    def cancel(self) -> None:
        pass


def _stream() -> _WatchStream:
    stream = _WatchStream.__new__(_WatchStream)
    stream._call = _Call()
    stream._responses = asyncio.Queue()
    stream._reader = None
    return stream


@pytest.mark.parametrize("timeout", [None, 30.0])
async def test_a_cancel_that_lands_with_a_response_is_not_swallowed(timeout: float | None) -> None:
    stream = _stream()
    waiting = asyncio.create_task(stream.next(timeout))
    await asyncio.sleep(0)  # parked in the queue's get()
    response: Any = object()
    stream._responses.put_nowait(response)  # the response and the cancel in one loop turn
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
