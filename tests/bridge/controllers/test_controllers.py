"""Controllers over a real MemoryStore: registration, availability verdicts, auto-registration."""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.apis import DataPlaneService
from bridge.controllers.autoregister import MANAGED_BY, auto_register, derived_object
from bridge.controllers.availability import AvailabilityController, judge, with_condition
from bridge.controllers.registration import RegistrationController
from bridge.routing import RouteTable
from bridge.storage.memory import MemoryStore
from plugin_host.supervisor import PluginState, PluginStatus


def obj(name: str, plugin: str = "p") -> dict[str, Any]:
    version, group = name.split(".", 1)
    return {
        "apiVersion": "aggregation.grafana.app/v0alpha1",
        "kind": "DataPlaneService",
        "metadata": {"name": name},
        "spec": {
            "pluginID": plugin,
            "pluginType": "datasource",
            "group": group,
            "version": version,
            "services": [{"type": "query"}],
        },
    }


async def test_registration_follows_adds_moves_and_deletes() -> None:
    store = MemoryStore()
    tables: list[RouteTable] = []
    changed = asyncio.Event()

    def apply(services: list[DataPlaneService]) -> RouteTable:
        table = RouteTable.build(services)
        tables.append(table)
        changed.set()
        return table

    controller = RegistrationController(store, apply=apply)
    await store.create(obj("v1.a.example"))
    controller.start()
    try:
        await asyncio.wait_for(controller.synced.wait(), 5)
        assert set(tables[-1].groups()) == {"a.example"}

        async def settle(predicate: Any) -> None:
            async with asyncio.timeout(5):
                while not predicate(tables[-1]):
                    changed.clear()
                    await changed.wait()

        await store.create(obj("v1.b.example"))
        await settle(lambda t: set(t.groups()) == {"a.example", "b.example"})
        # An update re-mounts the object from its new spec (names fix group and version, so
        # a "move" is a new object; an update can change everything else, e.g. the plugin).
        current = await store.get("v1.b.example")
        changed_obj = copy.deepcopy(current)
        changed_obj["spec"]["pluginID"] = "q"
        await store.update(
            changed_obj, expected_version=int(current["metadata"]["resourceVersion"])
        )
        await settle(lambda t: t.mounts[("b.example", "v1")].service.plugin_id == "q")
        await store.delete("v1.b.example")
        await store.create(obj("v1.c.example"))
        await settle(lambda t: set(t.groups()) == {"a.example", "c.example"})
        await store.delete("v1.a.example")
        await settle(lambda t: set(t.groups()) == {"c.example"})
    finally:
        await controller.stop()
        await store.close()


def status(state: PluginState, **extra: Any) -> PluginStatus:
    return PluginStatus(plugin_id="p", state=state, **extra)


async def test_registration_rebuilds_only_when_what_is_served_changes() -> None:
    store = MemoryStore()
    builds: list[RouteTable] = []
    rebuilt = asyncio.Event()

    def apply(services: list[DataPlaneService]) -> RouteTable:
        builds.append(RouteTable.build(services))
        rebuilt.set()
        return builds[-1]

    controller = RegistrationController(store, apply=apply)
    created = await store.create(obj("v1.a.example"))
    controller.start()
    try:
        await asyncio.wait_for(controller.synced.wait(), 5)
        assert len(builds) == 1
        # A status write (what the availability controller does) and a label change leave
        # the served form as it was: no rebuild, but the controller sees the new object.
        status = copy.deepcopy(created)
        status["status"] = {"conditions": [{"type": "Available", "status": "True"}]}
        written = await store.update(
            status, expected_version=int(created["metadata"]["resourceVersion"])
        )
        labelled = copy.deepcopy(written)
        labelled["metadata"]["labels"] = {"team": "x"}
        labelled = await store.update(
            labelled, expected_version=int(written["metadata"]["resourceVersion"])
        )
        # Events are applied in order: once a later object's rebuild shows, these were seen.
        rebuilt.clear()
        await store.create(obj("v1.b.example"))
        await asyncio.wait_for(rebuilt.wait(), 5)
        assert len(builds) == 2  # the status and label writes before it built nothing
        assert (
            controller.objects()["v1.a.example"]["metadata"]["resourceVersion"]
            == (labelled["metadata"]["resourceVersion"])
        )
        parsed = controller.parsed("v1.a.example")
        assert isinstance(parsed, DataPlaneService) and parsed.plugin_id == "p"
        # A spec change does rebuild.
        moved = copy.deepcopy(labelled)
        moved["spec"]["pluginID"] = "q"
        rebuilt.clear()
        await store.update(moved, expected_version=int(labelled["metadata"]["resourceVersion"]))
        await asyncio.wait_for(rebuilt.wait(), 5)
        assert {s.name: s.plugin_id for s in builds[-1].services()}["v1.a.example"] == "q"
    finally:
        await controller.stop()


@pytest.mark.parametrize(
    ("plugins", "healthy", "conflict", "expected"),
    [
        ({"p": status(PluginState.RUNNING)}, {"p": True}, False, ("True", "Passed")),
        ({}, {}, False, ("False", "PluginNotFound")),
        (
            {"p": status(PluginState.CRASH_LOOP, consecutive_failures=5, last_error="exit 3")},
            {},
            False,
            ("False", "CrashLooping"),
        ),
        ({"p": status(PluginState.BACKING_OFF)}, {}, False, ("False", "PluginNotRunning")),
        ({"p": status(PluginState.RUNNING)}, {"p": False}, False, ("False", "HealthCheckFailed")),
        ({"p": status(PluginState.RUNNING)}, {"p": True}, True, ("False", "Conflict")),
    ],
)
def test_verdicts(
    plugins: dict[str, PluginStatus],
    healthy: dict[str, bool],
    conflict: bool,
    expected: tuple[str, str],
) -> None:
    table = RouteTable(conflicts={"v1.a.example": "v1.a.example-winner"} if conflict else {})
    verdict = judge(
        obj("v1.a.example"), table=table, plugins=plugins, load_errors={}, healthy=healthy
    )
    assert (verdict.status, verdict.reason) == expected


def test_condition_written_only_on_change_and_transition_time_kept() -> None:
    t1 = datetime(2026, 1, 1, tzinfo=UTC)
    t2 = datetime(2026, 1, 2, tzinfo=UTC)
    first = with_condition(
        obj("v1.a.example"),
        judge(obj("v1.a.example"), table=RouteTable(), plugins={}, load_errors={}, healthy={}),
        now=t1,
    )
    assert first is not None
    same = judge(first, table=RouteTable(), plugins={}, load_errors={}, healthy={})
    assert with_condition(first, same, now=t2) is None
    running = {"p": status(PluginState.BACKING_OFF)}
    second = with_condition(
        first, judge(first, table=RouteTable(), plugins=running, load_errors={}, healthy={}), now=t2
    )
    assert second is not None
    [condition] = second["status"]["conditions"]
    # Still False: the reason changed, the transition time did not.
    assert (
        condition["reason"] == "PluginNotRunning"
        and condition["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    )


async def test_availability_controller_writes_status_to_the_store() -> None:
    store = MemoryStore()
    await store.create(obj("v1.a.example"))
    objects: dict[str, Any] = {}

    async def refresh() -> None:
        items, _ = await store.list()
        objects.clear()
        objects.update({i["metadata"]["name"]: i for i in items})

    await refresh()

    async def ping(plugin_id: str) -> bool:
        return True

    controller = AvailabilityController(
        store,
        objects=lambda: objects,
        table=RouteTable,
        plugins=lambda: [status(PluginState.RUNNING)],
        load_errors=dict,
        ping=ping,
    )
    assert await controller.reconcile() == 1
    stored = await store.get("v1.a.example")
    assert stored["status"]["conditions"][0]["status"] == "True"
    await refresh()
    assert await controller.reconcile() == 0  # nothing changed, nothing written
    await store.close()


def test_new_failure_counts_and_errors_alone_do_not_rewrite_the_condition() -> None:
    def crash_loop(failures: int, error: str) -> dict[str, PluginStatus]:
        return {
            "p": status(PluginState.CRASH_LOOP, consecutive_failures=failures, last_error=error)
        }

    def verdict_for(current: dict[str, Any], plugins: dict[str, PluginStatus]) -> Any:
        return judge(current, table=RouteTable(), plugins=plugins, load_errors={}, healthy={})

    t1 = datetime(2026, 1, 1, tzinfo=UTC)
    first = with_condition(
        obj("v1.a.example"), verdict_for(obj("v1.a.example"), crash_loop(5, "exit 3")), now=t1
    )
    assert first is not None
    [written] = first["status"]["conditions"]
    # The details are in the message...
    assert written["reason"] == "CrashLooping"
    assert written["message"] == (
        "plugin p is crash-looping (5 failures in a row; last error: exit 3)"
    )
    # ...but a higher count or another last error is no reason to write again.
    later = verdict_for(first, crash_loop(9, "exit 7\nmore"))
    assert later.detail == "9 failures in a row; last error: exit 7"
    assert with_condition(first, later, now=datetime(2026, 1, 2, tzinfo=UTC)) is None
    # Same for a plugin that is not running, whose last error changes.
    backing_off = {"p": status(PluginState.BACKING_OFF, last_error="exit 1")}
    second = with_condition(first, verdict_for(first, backing_off), now=t1)
    assert second is not None
    assert second["status"]["conditions"][0]["message"].endswith("(last error: exit 1)")
    other_error = {"p": status(PluginState.BACKING_OFF, last_error="exit 2")}
    assert with_condition(second, verdict_for(second, other_error), now=t1) is None
    # A different stable message (another state) is a change, and it carries new details.
    starting = {"p": status(PluginState.STARTING, last_error="exit 2")}
    third = with_condition(second, verdict_for(second, starting), now=t1)
    assert third is not None
    assert third["status"]["conditions"][0]["message"].endswith("(last error: exit 2)")


class FollowingElector:
    """A replica that is not the leader (the real elections run in test_leader.py)."""

    identity = "elsewhere"
    is_leader = False

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def test_a_follower_judges_but_never_writes_until_it_leads() -> None:
    store = MemoryStore()
    created = await store.create(obj("v1.a.example"))

    async def ping(plugin_id: str) -> bool:
        return True

    elector = FollowingElector()
    controller = AvailabilityController(
        store,
        objects=lambda: {"v1.a.example": created},
        table=RouteTable,
        plugins=lambda: [status(PluginState.RUNNING)],
        load_errors=dict,
        ping=ping,
        leader=elector,
    )
    assert await controller.reconcile() == 0
    assert controller.verdicts["v1.a.example"].reason == "Passed"  # its own view
    assert "status" not in await store.get("v1.a.example")
    # Leadership arrives: the controller is poked and writes what it sees.
    assert elector.listeners == [controller.poke]
    elector.is_leader = True
    assert await controller.reconcile() == 1
    stored = await store.get("v1.a.example")
    assert stored["status"]["conditions"][0]["reason"] == "Passed"
    await store.close()


async def test_auto_registration_creates_refreshes_and_respects_users() -> None:
    store = MemoryStore()
    served = frozenset({"pluginv2.Data", "pluginv2.Resource", "pluginv2.Diagnostics"})
    assert await auto_register(store, [("acme-x-datasource", "datasource", served)]) == [
        "v0alpha1.acme-x-datasource.grafana.app"
    ]
    created = await store.get("v0alpha1.acme-x-datasource.grafana.app")
    assert [s["type"] for s in created["spec"]["services"]] == ["query", "route"]
    assert created["metadata"]["annotations"][MANAGED_BY] == "auto-registration"
    # The plugin now serves streams too: the bridge's own object follows.
    more = served | {"pluginv2.Stream"}
    assert await auto_register(store, [("acme-x-datasource", "datasource", more)]) == [
        "v0alpha1.acme-x-datasource.grafana.app"
    ]
    # A user edits it: auto-registration leaves it alone from then on.
    current = await store.get("v0alpha1.acme-x-datasource.grafana.app")
    edited = copy.deepcopy(current)
    edited["spec"]["services"] = [{"type": "query"}]
    await store.update(edited, expected_version=int(current["metadata"]["resourceVersion"]))
    assert await auto_register(store, [("acme-x-datasource", "datasource", served)]) == []
    assert (await store.get("v0alpha1.acme-x-datasource.grafana.app"))["spec"]["services"] == [
        {"type": "query"}
    ]
    # A user's own object of that name is never touched.
    user = derived_object("acme-y-app", "app", None)
    del user["metadata"]["annotations"]
    await store.create(user)
    assert await auto_register(store, [("acme-y-app", "app", served)]) == []
    await store.close()
