"""``kill -USR1``: every asyncio task's stack, awaited coroutines and async generators included."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from bridge.app import log_task_stacks


async def _deep_in_a_generator() -> AsyncIterator[int]:
    await asyncio.Event().wait()
    yield 1


async def _consumer() -> None:
    async for _ in _deep_in_a_generator():
        pass


async def test_the_dump_shows_where_each_task_waits(caplog: pytest.LogCaptureFixture) -> None:
    task = asyncio.create_task(_consumer(), name="stuck-consumer")
    await asyncio.sleep(0)
    try:
        with caplog.at_level(logging.WARNING, logger="bridge.app"):
            log_task_stacks()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    [record] = [r for r in caplog.records if "asyncio task stacks" in r.getMessage()]
    dump = record.getMessage()
    section = dump.split("--- task stuck-consumer (pending)\n", 1)[1].split("--- task", 1)[0]
    assert "in _consumer" in section
    assert "in _deep_in_a_generator" in section  # inside the generator, not just `async for`
