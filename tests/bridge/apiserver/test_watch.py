"""Watch streams over HTTP: where they start, what they carry, and how they end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.bridge.apiserver.conftest import (
    ADMIN,
    BASE,
    TABLE,
    VIEWER,
    build_app,
    sample,
    serving,
)
from tests.bridge.apiserver.store import ObservedStore

Client = TestClient[web.Request, web.Application]
WAIT = 5.0
NAME = "v0alpha1.prometheus.grafana.app"


@pytest.fixture
async def quick(store: ObservedStore) -> AsyncIterator[Client]:
    """A server whose idle watches send a BOOKMARK every 0.2 s."""
    app = build_app(store, bookmark_interval=0.2)
    async with TestClient(TestServer(app, host="127.0.0.1")) as running:
        yield running


async def next_event(response: aiohttp.ClientResponse) -> dict[str, Any]:
    line = await asyncio.wait_for(response.content.readline(), WAIT)
    assert line.endswith(b"\n"), f"stream ended: {line!r}"
    event: dict[str, Any] = json.loads(line)
    return event


def summary(event: dict[str, Any]) -> tuple[str, str]:
    return event["type"], event["object"].get("metadata", {}).get("name", "")


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition no event announces (a server-side cleanup), within WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_watch_from_a_resource_version(client: Client, store: ObservedStore) -> None:
    created = await store.create(sample())
    async with client.get(f"{BASE}?watch=true&resourceVersion=1", headers=VIEWER) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        updated = dict(created, spec={**created["spec"], "pluginID": "p2"})
        await store.update(updated, expected_version=None)
        event = await next_event(response)
        assert summary(event) == ("MODIFIED", NAME)
        assert event["object"]["metadata"]["resourceVersion"] == "2"
        await store.delete(NAME)
        assert summary(await next_event(response)) == ("DELETED", NAME)


async def test_watch_without_resource_version_starts_with_the_objects(
    client: Client, store: ObservedStore
) -> None:
    await store.create(sample("a.grafana.app"))
    await store.create(sample("b.grafana.app"))
    async with client.get(f"{BASE}?watch=1", headers=VIEWER) as response:
        assert summary(await next_event(response)) == ("ADDED", "v0alpha1.a.grafana.app")
        assert summary(await next_event(response)) == ("ADDED", "v0alpha1.b.grafana.app")
        await store.create(sample("c.grafana.app"))
        assert summary(await next_event(response)) == ("ADDED", "v0alpha1.c.grafana.app")


async def test_send_initial_events_ends_with_an_annotated_bookmark(
    client: Client, store: ObservedStore
) -> None:
    await store.create(sample("a.grafana.app"))
    query = (
        "watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
    )
    async with client.get(f"{BASE}?{query}", headers=VIEWER) as response:
        assert summary(await next_event(response)) == ("ADDED", "v0alpha1.a.grafana.app")
        event = await next_event(response)
        assert event["type"] == "BOOKMARK"
        assert event["object"]["kind"] == "DataPlaneService"
        assert event["object"]["metadata"] == {
            "resourceVersion": "1",
            "annotations": {"k8s.io/initial-events-end": "true"},
        }


async def test_idle_watch_sends_bookmarks_with_progress(
    quick: Client, store: ObservedStore
) -> None:
    await store.create(sample("a.grafana.app"))
    await store.create(sample("b.grafana.app", labels={"team": "x"}))
    url = f"{BASE}?watch=1&resourceVersion=2&allowWatchBookmarks=true&labelSelector=team%3Dy"
    async with quick.get(url, headers=VIEWER) as response:
        first = await next_event(response)
        assert first["type"] == "BOOKMARK"
        assert first["object"]["metadata"] == {"resourceVersion": "2"}
        # A change the selector hides still moves the bookmark on.
        await store.create(sample("c.grafana.app"))
        second = await next_event(response)
        assert second == {
            "type": "BOOKMARK",
            "object": {
                "kind": "DataPlaneService",
                "apiVersion": "aggregation.grafana.app/v0alpha1",
                "metadata": {"resourceVersion": "3"},
            },
        }


async def test_hidden_changes_do_not_hold_bookmarks_back(
    quick: Client, store: ObservedStore
) -> None:
    """A busy store whose changes the selector hides still lets bookmarks through."""

    async def churn() -> None:
        for i in range(1000):
            await store.create(sample(f"churn{i}.grafana.app"))
            await asyncio.sleep(0.05)  # a steady trickle of writes, as from a controller

    url = f"{BASE}?watch=1&resourceVersion=0&allowWatchBookmarks=true&labelSelector=team%3Dnone"
    async with quick.get(url, headers=VIEWER) as response:
        writer = asyncio.create_task(churn())
        try:
            event = await next_event(response)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
    assert event["type"] == "BOOKMARK"
    assert int(event["object"]["metadata"]["resourceVersion"]) >= 1


async def test_no_bookmarks_unless_asked(quick: Client, store: ObservedStore) -> None:
    async with quick.get(f"{BASE}?watch=1&resourceVersion=0", headers=VIEWER) as response:
        await store.create(sample())
        # Had bookmarks been sent (every 0.2 s) one would come before this event.
        await asyncio.sleep(0.5)
        assert summary(await next_event(response)) == ("ADDED", NAME)


async def test_expired_resource_version_is_one_error_event() -> None:
    store = ObservedStore(history=2)
    for group in ("a", "b", "c", "d"):
        await store.create(sample(f"{group}.grafana.app"))
    async with (
        TestClient(TestServer(build_app(store), host="127.0.0.1")) as client,
        client.get(f"{BASE}?watch=1&resourceVersion=1", headers=VIEWER) as response,
    ):
        assert response.status == 200
        event = await next_event(response)
        assert event["type"] == "ERROR"
        status = event["object"]
        assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
        assert "too old resource version: 1" in status["message"]
        assert await asyncio.wait_for(response.content.read(), WAIT) == b""
    assert store.open_watches == 0


async def test_timeout_seconds_ends_the_stream(client: Client, store: ObservedStore) -> None:
    started = time.monotonic()
    async with client.get(f"{BASE}?watch=1&timeoutSeconds=1", headers=VIEWER) as response:
        assert await asyncio.wait_for(response.content.read(), WAIT) == b""
    assert 0.9 <= time.monotonic() - started < WAIT
    await eventually(lambda: store.open_watches == 0, "the store watch to close")


async def test_selector_transitions(client: Client, store: ObservedStore) -> None:
    other = await store.create(sample("other.grafana.app"))
    url = f"{BASE}?watch=1&resourceVersion=1&labelSelector=team%3Da"
    async with client.get(url, headers=VIEWER) as response:
        obj = await store.create(sample(labels={"team": "a"}))
        assert summary(await next_event(response)) == ("ADDED", NAME)
        obj["metadata"]["labels"] = {"team": "b"}
        obj = await store.update(obj, expected_version=None)
        left = await next_event(response)
        assert summary(left) == ("DELETED", NAME)
        assert left["object"]["metadata"]["labels"] == {"team": "b"}
        other["metadata"]["labels"] = {"team": "c"}
        await store.update(other, expected_version=None)  # never matched: nothing sent
        obj["metadata"]["labels"] = {"team": "a"}
        obj = await store.update(obj, expected_version=None)
        assert summary(await next_event(response)) == ("ADDED", NAME)
        obj["spec"]["pluginID"] = "p2"
        await store.update(obj, expected_version=None)
        assert summary(await next_event(response)) == ("MODIFIED", NAME)


async def test_resumed_watch_with_selector_knows_what_matched(
    client: Client, store: ObservedStore
) -> None:
    obj = await store.create(sample(labels={"team": "a"}))
    url = f"{BASE}?watch=1&resourceVersion=1&fieldSelector=metadata.name%3D{NAME}"
    async with client.get(url, headers=VIEWER) as response:
        obj["spec"]["pluginID"] = "p2"
        await store.update(obj, expected_version=None)
        assert summary(await next_event(response)) == ("MODIFIED", NAME)


async def test_table_watch(client: Client, store: ObservedStore) -> None:
    async with client.get(
        f"{BASE}?watch=1&resourceVersion=0", headers={**VIEWER, "Accept": TABLE}
    ) as response:
        await store.create(sample())
        event = await next_event(response)
        assert event["type"] == "ADDED"
        table = event["object"]
        assert table["kind"] == "Table"
        assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Available", "Age"]
        assert table["rows"][0]["cells"][:2] == [NAME, "Unknown"]


async def test_store_failure_ends_the_watch_with_503(client: Client, store: ObservedStore) -> None:
    async with client.get(f"{BASE}?watch=1&resourceVersion=0", headers=VIEWER) as response:
        await eventually(lambda: store.open_watches == 1, "the store watch to open")
        await store.fail()
        event = await next_event(response)
        assert event["type"] == "ERROR"
        assert event["object"]["code"] == 503
        assert await asyncio.wait_for(response.content.read(), WAIT) == b""


async def test_store_closing_ends_the_watch_cleanly(client: Client, store: ObservedStore) -> None:
    async with client.get(f"{BASE}?watch=1&resourceVersion=0", headers=VIEWER) as response:
        await eventually(lambda: store.open_watches == 1, "the store watch to open")
        await store.close()
        assert await asyncio.wait_for(response.content.read(), WAIT) == b""


@pytest.mark.parametrize("cancellation", [True, False])
async def test_client_going_away_closes_the_store_watch(
    store: ObservedStore, cancellation: bool
) -> None:
    """With or without aiohttp's handler cancellation, nothing is left watching."""
    app = build_app(store)
    async with (
        serving(app, handler_cancellation=cancellation) as url,
        aiohttp.ClientSession() as session,
    ):
        response = await session.get(f"{url}{BASE}?watch=1&resourceVersion=0", headers=VIEWER)
        await eventually(lambda: store.open_watches == 1, "the store watch to open")
        response.close()
        await eventually(lambda: store.open_watches == 0, "the store watch to close")
        tasks = [t for t in asyncio.all_tasks() if t.get_name() == "dataplaneservice-watch"]
        assert tasks == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("resourceVersion=x", "invalid resourceVersion"),
        ("resourceVersion=-3", "invalid resourceVersion"),
        ("timeoutSeconds=soon", "invalid timeoutSeconds"),
        ("timeoutSeconds=-1", "must not be negative"),
        ("allowWatchBookmarks=maybe", "allowWatchBookmarks must be true or false"),
        ("resourceVersionMatch=Exact&resourceVersion=1", "not allowed for watch"),
        ("labelSelector=a+in+b", "unable to parse requirement"),
    ],
)
async def test_watch_refuses(client: Client, query: str, message: str) -> None:
    response = await client.get(f"{BASE}?watch=1&{query}", headers=VIEWER)
    assert response.status == 400
    assert message in (await response.json())["message"]


async def test_watch_needs_a_caller(client: Client) -> None:
    response = await client.get(f"{BASE}?watch=1")
    assert response.status == 401


async def test_admin_watch(client: Client) -> None:
    async with client.get(f"{BASE}?watch=1&timeoutSeconds=1", headers=ADMIN) as response:
        assert response.status == 200
