"""The storage contract as tests every backend must pass (bridge/storage/base.py).

:class:`StoreConformance` holds the cases; a test module subclasses it and provides a
``backend`` fixture (a :class:`Backend`), typically parametrised over the backends, as
``test_conformance.py`` does. Every case talks to the store only through the ``Store``
protocol; what differs between backends (how to make history expire) is the backend's job.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from bridge.storage import (
    AlreadyExists,
    Conflict,
    Expired,
    NotFound,
    Store,
    WatchEvent,
    WatchEventType,
)

WAIT = 15.0  # upper bound for anything awaited; the cases finish far sooner
BOOKMARK_INTERVAL = 0.2  # what backends must configure, so the bookmark case is quick

ADDED, MODIFIED, DELETED, BOOKMARK = (
    WatchEventType.ADDED,
    WatchEventType.MODIFIED,
    WatchEventType.DELETED,
    WatchEventType.BOOKMARK,
)


class Backend(Protocol):
    """One backend under test; every store it opens shares the same data."""

    name: str

    async def open(self) -> Store:
        """A store on this backend's data (another replica, where that means something)."""
        ...

    async def forget(self, store: Store, through: int) -> None:
        """Make the store forget changes up to ``through``: watching from before is Expired."""
        ...


def dataplaneservice(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "aggregation.grafana.app/v0alpha1",
        "kind": "DataPlaneService",
        "metadata": {"name": name, "labels": {"test": "conformance"}},
        "spec": {
            "pluginID": "grafana-testdata-datasource",
            "pluginType": "datasource",
            "group": "testdata.datasource.grafana.app",
            "version": "v0alpha1",
            "services": [{"type": "query"}],
            **spec,
        },
    }


def rv(obj: dict[str, Any]) -> int:
    return int(obj["metadata"]["resourceVersion"])


def changed(obj: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**obj, "spec": {**obj["spec"], **spec}}


async def next_event(
    events: AsyncIterator[WatchEvent], *, bookmarks: bool = False, timeout: float = WAIT
) -> WatchEvent:
    """The next event (skipping bookmarks unless asked for them)."""
    async with asyncio.timeout(timeout):
        while True:
            event = await anext(events)
            if bookmarks or event.type is not BOOKMARK:
                return event


async def close(events: AsyncIterator[WatchEvent]) -> None:
    """Close a watch: the contract types it as an iterator, but it must be closable."""
    aclose = getattr(events, "aclose", None)
    assert aclose is not None, f"{type(events).__name__} has no aclose()"
    await aclose()


async def take(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    return [await next_event(events) for _ in range(count)]


def summary(events: list[WatchEvent]) -> list[tuple[str, str, int]]:
    return [(e.type.value, e.object["metadata"]["name"], e.resource_version) for e in events]


async def nothing_within(events: AsyncIterator[WatchEvent], seconds: float) -> bool:
    """Whether no event (bookmarks included) arrives within ``seconds``; ends the iterator."""
    try:
        async with asyncio.timeout(seconds):
            await anext(events)
    except TimeoutError:
        return True
    return False


class StoreConformance:
    """The cases; subclasses provide the ``backend`` fixture."""

    @pytest.fixture
    async def store(self, backend: Backend) -> Store:
        return await backend.open()

    # -- create, get, list -------------------------------------------------------------------

    async def test_create_fills_metadata_and_ignores_the_callers(self, store: Store) -> None:
        obj = dataplaneservice("a")
        obj["metadata"].update(
            resourceVersion="12345", uid="mine", creationTimestamp="2000-01-01T00:00:00Z"
        )
        created = await store.create(obj)
        metadata = created["metadata"]
        assert rv(created) > 0
        assert metadata["uid"] not in ("", "mine")
        assert metadata["creationTimestamp"] != "2000-01-01T00:00:00Z"
        assert metadata["creationTimestamp"].endswith("Z")
        assert metadata["name"] == "a"
        assert metadata["labels"] == {"test": "conformance"}
        assert created["spec"] == obj["spec"]
        assert await store.get("a") == created
        other = await store.create(dataplaneservice("b"))
        assert other["metadata"]["uid"] != metadata["uid"]

    async def test_get_of_a_missing_object_is_not_found(self, store: Store) -> None:
        with pytest.raises(NotFound) as info:
            await store.get("nothing")
        assert info.value.name == "nothing"

    async def test_list_is_sorted_by_name_with_the_current_version(self, store: Store) -> None:
        assert (await store.list())[0] == []
        names = ["delta", "alpha", "charlie", "bravo.example", "alpha-2"]
        created = [await store.create(dataplaneservice(name)) for name in names]
        items, version = await store.list()
        assert [item["metadata"]["name"] for item in items] == sorted(names)
        assert {item["metadata"]["name"]: item for item in items} == {
            obj["metadata"]["name"]: obj for obj in created
        }
        assert version >= max(rv(obj) for obj in created)
        deleted = await store.delete("charlie")
        items, version = await store.list()
        assert "charlie" not in [item["metadata"]["name"] for item in items]
        assert version >= rv(deleted)
        # The list's version is where a watch picks up: the next change and nothing before.
        events = store.watch(since=version)
        later = await store.create(dataplaneservice("echo"))
        assert summary([await next_event(events)]) == [("ADDED", "echo", rv(later))]
        await close(events)

    async def test_create_twice_is_already_exists(self, store: Store) -> None:
        first = await store.create(dataplaneservice("a"))
        with pytest.raises(AlreadyExists) as info:
            await store.create(dataplaneservice("a", pluginID="other"))
        assert info.value.name == "a"
        assert await store.get("a") == first

    async def test_returned_objects_are_the_callers_own(self, store: Store) -> None:
        obj = dataplaneservice("a")
        created = await store.create(obj)
        obj["spec"]["pluginID"] = "changed-after-create"
        created["spec"]["pluginID"] = "changed-after-return"
        (await store.get("a"))["spec"]["pluginID"] = "changed-after-get"
        (await store.list())[0][0]["spec"]["pluginID"] = "changed-after-list"
        assert (await store.get("a"))["spec"]["pluginID"] == "grafana-testdata-datasource"

    # -- update ------------------------------------------------------------------------------

    async def test_update_with_the_current_version_bumps_it(self, store: Store) -> None:
        created = await store.create(dataplaneservice("a"))
        wanted = changed(created, pluginID="other")
        wanted["metadata"] = {
            **created["metadata"],
            "uid": "forged",
            "creationTimestamp": "2000-01-01T00:00:00Z",
            "resourceVersion": "1",
        }
        updated = await store.update(wanted, expected_version=rv(created))
        assert rv(updated) > rv(created)
        assert updated["spec"]["pluginID"] == "other"
        for key in ("uid", "creationTimestamp"):
            assert updated["metadata"][key] == created["metadata"][key]
        assert await store.get("a") == updated
        # Without a version the update is unconditional.
        again = await store.update(changed(updated, pluginID="third"), expected_version=None)
        assert rv(again) > rv(updated)
        assert again["spec"]["pluginID"] == "third"

    async def test_update_with_a_stale_version_is_a_conflict(self, store: Store) -> None:
        created = await store.create(dataplaneservice("a"))
        updated = await store.update(changed(created, pluginID="b"), expected_version=rv(created))
        with pytest.raises(Conflict) as info:
            await store.update(changed(created, pluginID="c"), expected_version=rv(created))
        assert (info.value.name, info.value.expected, info.value.actual) == (
            "a",
            rv(created),
            rv(updated),
        )
        assert await store.get("a") == updated

    async def test_update_of_a_missing_object_is_not_found(self, store: Store) -> None:
        with pytest.raises(NotFound):
            await store.update(dataplaneservice("nothing"), expected_version=None)
        with pytest.raises(NotFound):
            await store.update(dataplaneservice("nothing"), expected_version=1)
        created = await store.create(dataplaneservice("gone"))
        await store.delete("gone")
        with pytest.raises(NotFound):
            await store.update(created, expected_version=rv(created))

    async def test_an_update_that_changes_nothing_writes_nothing(self, store: Store) -> None:
        created = await store.create(dataplaneservice("a"))
        assert await store.update(created, expected_version=rv(created)) == created
        resent = {**created, "metadata": {**created["metadata"], "resourceVersion": "1"}}
        assert await store.update(resent, expected_version=None) == created
        assert await store.get("a") == created
        # No event either: the first change after the create is the next real write.
        events = store.watch(since=rv(created))
        other = await store.create(dataplaneservice("b"))
        assert summary([await next_event(events)]) == [("ADDED", "b", rv(other))]
        await close(events)

    async def test_concurrent_compare_and_swap_has_exactly_one_winner(self, store: Store) -> None:
        created = await store.create(dataplaneservice("a"))
        racers = [
            store.update(changed(created, pluginID=f"racer-{i}"), expected_version=rv(created))
            for i in range(12)
        ]
        results = await asyncio.gather(*racers, return_exceptions=True)
        winners = [result for result in results if isinstance(result, dict)]
        losers = [result for result in results if not isinstance(result, dict)]
        assert len(winners) == 1, results
        assert all(isinstance(loser, Conflict) for loser in losers), losers
        assert {(c.expected, c.actual) for c in losers if isinstance(c, Conflict)} == {
            (rv(created), rv(winners[0]))
        }
        assert await store.get("a") == winners[0]

    async def test_versions_increase_strictly_across_objects(self, store: Store) -> None:
        versions = []
        for name in ("a", "b", "c"):
            versions.append(rv(await store.create(dataplaneservice(name))))
        for name in ("b", "a", "c", "a"):
            current = await store.get(name)
            updated = await store.update(
                changed(current, pluginID=f"{name}-{len(versions)}"),
                expected_version=rv(current),
            )
            versions.append(rv(updated))
        versions.append(rv(await store.delete("b")))
        versions.append(rv(await store.create(dataplaneservice("b"))))
        assert versions == sorted(set(versions)), versions

    # -- delete ------------------------------------------------------------------------------

    async def test_delete_returns_the_last_state(self, store: Store) -> None:
        created = await store.create(dataplaneservice("a"))
        updated = await store.update(changed(created, pluginID="b"), expected_version=rv(created))
        events = store.watch(since=rv(updated))
        deleted = await store.delete("a")
        assert rv(deleted) > rv(updated)
        assert {**deleted, "metadata": {**deleted["metadata"], "resourceVersion": "x"}} == {
            **updated,
            "metadata": {**updated["metadata"], "resourceVersion": "x"},
        }
        event = await next_event(events)
        assert (event.type, event.resource_version, event.object) == (DELETED, rv(deleted), deleted)
        await close(events)
        with pytest.raises(NotFound):
            await store.get("a")
        with pytest.raises(NotFound):
            await store.delete("a")
        assert (await store.list())[0] == []

    async def test_delete_with_a_version_is_compare_and_swap(self, store: Store) -> None:
        created = await store.create(dataplaneservice("a"))
        updated = await store.update(changed(created, pluginID="b"), expected_version=rv(created))
        with pytest.raises(Conflict) as info:
            await store.delete("a", expected_version=rv(created))
        assert (info.value.expected, info.value.actual) == (rv(created), rv(updated))
        assert await store.get("a") == updated
        deleted = await store.delete("a", expected_version=rv(updated))
        assert deleted["spec"]["pluginID"] == "b"
        with pytest.raises(NotFound):
            await store.delete("a", expected_version=rv(updated))

    async def test_a_recreated_object_is_new(self, store: Store) -> None:
        first = await store.create(dataplaneservice("a"))
        await store.delete("a")
        second = await store.create(dataplaneservice("a"))
        assert rv(second) > rv(first)
        assert second["metadata"]["uid"] != first["metadata"]["uid"]

    # -- watch -------------------------------------------------------------------------------

    async def test_watch_from_the_list_version_sees_every_later_change(self, store: Store) -> None:
        await store.create(dataplaneservice("before"))
        _, version = await store.list()
        events = store.watch(since=version)
        a = await store.create(dataplaneservice("a"))
        a2 = await store.update(changed(a, pluginID="x"), expected_version=rv(a))
        b = await store.create(dataplaneservice("b"))
        gone = await store.delete("a")
        seen = await take(events, 4)
        assert summary(seen) == [
            ("ADDED", "a", rv(a)),
            ("MODIFIED", "a", rv(a2)),
            ("ADDED", "b", rv(b)),
            ("DELETED", "a", rv(gone)),
        ]
        assert [event.object for event in seen] == [a, a2, b, gone]
        await close(events)

    async def test_watch_from_an_old_version_replays(self, store: Store) -> None:
        a = await store.create(dataplaneservice("a"))
        b = await store.create(dataplaneservice("b"))
        b2 = await store.update(changed(b, pluginID="x"), expected_version=rv(b))
        gone = await store.delete("a")
        events = store.watch(since=rv(a))
        assert summary(await take(events, 3)) == [
            ("ADDED", "b", rv(b)),
            ("MODIFIED", "b", rv(b2)),
            ("DELETED", "a", rv(gone)),
        ]
        c = await store.create(dataplaneservice("c"))  # and then carries on live
        assert summary(await take(events, 1)) == [("ADDED", "c", rv(c))]
        await close(events)

    async def test_watch_with_racing_writers_has_no_gaps_or_duplicates(self, store: Store) -> None:
        _, start = await store.list()
        writers, rounds = 6, 8
        acknowledged: list[int] = []

        async def write(writer: int) -> None:
            for round_ in range(rounds):
                name = f"w{writer}-{round_}"
                obj = await store.create(dataplaneservice(name))
                acknowledged.append(rv(obj))
                obj = await store.update(changed(obj, pluginID="x"), expected_version=rv(obj))
                acknowledged.append(rv(obj))
                if round_ % 2:
                    acknowledged.append(rv(await store.delete(name)))
                await asyncio.sleep(random.uniform(0, 0.002))

        total = writers * rounds * 2 + writers * (rounds // 2)
        events = store.watch(since=start)
        async with asyncio.TaskGroup() as group:
            for i in range(writers):
                group.create_task(write(i))
            await asyncio.sleep(0.005)  # some writes land before the watch starts, most after
            seen = await take(events, total)
        await close(events)
        versions = [event.resource_version for event in seen]
        assert versions == sorted(acknowledged)
        assert len(set(versions)) == total
        # The same history, replayed after the fact, is the same sequence.
        replay = store.watch(since=start)
        assert summary(await take(replay, total)) == summary(seen)
        await close(replay)
        # And it adds up to what the store now holds.
        final: dict[str, dict[str, Any]] = {}
        for event in seen:
            if event.type is DELETED:
                final.pop(event.object["metadata"]["name"])
            else:
                final[event.object["metadata"]["name"]] = event.object
        items, _ = await store.list()
        assert items == [final[name] for name in sorted(final)]

    async def test_two_watchers_see_the_same_sequence(self, store: Store) -> None:
        _, version = await store.list()
        first, second = store.watch(since=version), store.watch(since=version)
        both = asyncio.gather(take(first, 11), take(second, 11))
        for i in range(5):
            obj = await store.create(dataplaneservice(f"n{i}"))
            await store.update(changed(obj, pluginID="x"), expected_version=rv(obj))
        await store.delete("n3")
        seen_first, seen_second = await both
        assert summary(seen_first) == summary(seen_second)
        assert [e.object for e in seen_first] == [e.object for e in seen_second]
        await close(first)
        await close(second)

    async def test_watch_from_now(self, store: Store) -> None:
        await store.create(dataplaneservice("before"))
        _, before = await store.list()
        events = store.watch()
        first = asyncio.ensure_future(anext(events))
        created: list[dict[str, Any]] = []
        async with asyncio.timeout(WAIT):
            while not first.done():
                created.append(await store.create(dataplaneservice(f"n{len(created)}")))
                await asyncio.wait({first}, timeout=0.02)
        event = first.result()
        assert event.type is ADDED
        assert event.resource_version > before
        # From the first event on, nothing is missing.
        index = [rv(obj) for obj in created].index(event.resource_version)
        rest = created[index + 1 :]
        assert summary(await take(events, len(rest))) == [
            ("ADDED", obj["metadata"]["name"], rv(obj)) for obj in rest
        ]
        await close(events)

    async def test_watch_from_a_forgotten_version_is_expired(
        self, backend: Backend, store: Store
    ) -> None:
        a = await store.create(dataplaneservice("a"))
        old = rv(a) - 1
        b = await store.update(changed(a, pluginID="x"), expected_version=rv(a))
        await backend.forget(store, through=rv(b))
        events = store.watch(since=old)
        with pytest.raises(Expired) as info:
            await next_event(events)
        assert info.value.requested == old
        assert info.value.oldest > old + 1
        # A client that lists again can watch from the list's version.
        _, version = await store.list()
        events = store.watch(since=version)
        c = await store.create(dataplaneservice("c"))
        assert summary([await next_event(events)]) == [("ADDED", "c", rv(c))]
        await close(events)

    async def test_bookmarks_only_when_asked_for(self, store: Store) -> None:
        _, version = await store.list()
        events = store.watch(since=version, bookmarks=True)
        mark = await next_event(events, bookmarks=True)
        assert mark.type is BOOKMARK
        assert mark.resource_version >= version
        assert mark.object == {"metadata": {"resourceVersion": str(mark.resource_version)}}
        created = await store.create(dataplaneservice("a"))
        assert rv(created) > mark.resource_version
        assert summary([await next_event(events)]) == [("ADDED", "a", rv(created))]
        await close(events)
        quiet = store.watch(since=rv(created))
        assert await nothing_within(quiet, 3 * BOOKMARK_INTERVAL)

    async def test_closing_a_watch_leaves_nothing_running(self, store: Store) -> None:
        _, version = await store.list()  # connected, for backends with a connection
        before = asyncio.all_tasks()
        events = store.watch(since=version)
        created = await store.create(dataplaneservice("a"))
        assert (await next_event(events)).resource_version == rv(created)
        await close(events)
        # A client library may need a few loop turns to finish a cancelled call's own tasks;
        # they must end by themselves, and nothing the watch started may stay.
        if left := asyncio.all_tasks() - before:
            await asyncio.wait(left, timeout=2.0)
        left = asyncio.all_tasks() - before
        assert left == set(), [task.get_coro() for task in left]
        # The store carries on, and so do new watches.
        events = store.watch(since=rv(created))
        other = await store.create(dataplaneservice("b"))
        assert (await next_event(events)).resource_version == rv(other)
        await close(events)
