"""Route table swaps at runtime: DataPlaneService manifests change while the bridge serves.

The manifests directory is edited under a running bridge (one service added, one moved to
another group, one deleted) while a streamed resource request of the deleted service is in
flight. After the watcher's swap the new routes serve, the old ones fall through to the
delegate, and the request in flight still ends normally.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.apis import DataPlaneService
from bridge.config import BridgeConfig
from bridge.routing import RouteTable
from bridge.server import Bridge
from tests.bridge.conftest import (
    GO,
    PY,
    VERSION,
    WAIT,
    Answer,
    FrontDoor,
    auth_headers,
    bridge_config,
    dataplane_service,
    datasource,
    front_door,
    sample,
    stand_in_grafana,
    write_datasources,
    write_manifest,
)

pytestmark = pytest.mark.go

ALPHA = "alpha.datasource.grafana.app"  # the Python fixture; deleted
BETA = "beta.datasource.grafana.app"  # the Go fixture, moved away ...
GAMMA = "gamma.datasource.grafana.app"  # ... to here
DELTA = "delta.datasource.grafana.app"  # the Python fixture again, added (query only)


class WatchedBridge(Bridge):
    """A Bridge that lets a test await its next route table."""

    def __init__(self, config: BridgeConfig) -> None:
        self._swapped = asyncio.Event()
        super().__init__(config)

    def set_services(self, services: list[DataPlaneService]) -> RouteTable:
        table = super().set_services(services)
        self._swapped.set()
        return table

    async def routes_become(self, predicate: Callable[[RouteTable], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate(self.routes):
                self._swapped.clear()
                await self._swapped.wait()


@dataclass
class Swaps:
    door: FrontDoor
    bridge: WatchedBridge
    manifests: Path


@pytest.fixture
async def swaps(tmp_path: Path, go_fixture_binary: Path) -> AsyncIterator[Swaps]:
    write_datasources(tmp_path / "provisioning", datasource(PY, "py"), datasource(GO, "go"))
    manifests = tmp_path / "dataplane"
    write_manifest(manifests, "python.yaml", dataplane_service(PY, ALPHA))
    write_manifest(manifests, "go.yaml", dataplane_service(GO, BETA))
    async with stand_in_grafana() as (_, url):
        config = bridge_config(
            tmp_path, delegate=url, overrides={"dataplane.reload_interval": 0.05}
        )
        bridge = WatchedBridge(config)
        async with front_door(config, bridge=bridge) as door:
            yield Swaps(door, bridge, manifests)


def under(group: str, uid: str, rest: str) -> str:
    return f"/apis/{group}/{VERSION}/namespaces/default/datasources/{uid}/{rest}"


QUERY = {
    "from": "now-1h",
    "to": "now",
    "queries": [{"refId": "A", "points": 2, "datasource": {"type": PY, "uid": "py"}}],
}


def plugin_echo(answer: Answer) -> None:
    assert answer.status == 200, answer.text
    assert "X-Stand-In" not in answer.headers
    assert (answer.json()["method"], answer.json()["path"]) == ("GET", "echo")


def plugin_frames(answer: Answer) -> None:
    assert answer.status == 200, answer.text
    assert answer.json()["results"]["A"]["frames"][0]["schema"]["refId"] == "A"


def delegated(answer: Answer) -> None:
    assert answer.status == 200, answer.text
    assert answer.headers["X-Stand-In"] == "grafana"
    assert answer.json()["grafana"] == "stand-in"


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    path: str
    body: Any
    before: Callable[[Answer], None]
    after: Callable[[Answer], None]


ROWS = [
    Row(
        "deleted service", "GET", under(ALPHA, "py", "resource/echo"), None, plugin_echo, delegated
    ),
    Row(
        "moved service, old group",
        "GET",
        under(BETA, "go", "resource/echo"),
        None,
        plugin_echo,
        delegated,
    ),
    Row(
        "moved service, new group",
        "GET",
        under(GAMMA, "go", "resource/echo"),
        None,
        delegated,
        plugin_echo,
    ),
    Row("added service", "POST", under(DELTA, "py", "query"), QUERY, delegated, plugin_frames),
    Row(
        "added service, a route it does not declare",
        "GET",
        under(DELTA, "py", "resource/echo"),
        None,
        delegated,
        delegated,
    ),
]


async def check_rows(door: FrontDoor, *, after: bool) -> None:
    for row in ROWS:
        answer = await door.call(row.method, row.path, body=row.body)
        check = row.after if after else row.before
        try:
            check(answer)
        except AssertionError as exc:
            raise AssertionError(f"{row.name} ({'after' if after else 'before'}): {exc}") from exc


async def test_manifest_changes_swap_the_routes_under_a_request_in_flight(swaps: Swaps) -> None:
    door, bridge = swaps.door, swaps.bridge
    await check_rows(door, after=False)

    stream = under(ALPHA, "py", "resource/stream?chunks=4&delay_ms=300")
    async with door.session.get(door.target(stream), headers=auth_headers("admin")) as response:
        assert response.status == 200
        assert await response.content.readline() == b"chunk 0\n"

        (swaps.manifests / "python.yaml").unlink()
        write_manifest(swaps.manifests, "go.yaml", dataplane_service(GO, GAMMA))
        write_manifest(
            swaps.manifests,
            "added.yaml",
            dataplane_service(PY, DELTA, services=({"type": "query"},)),
        )
        await bridge.routes_become(lambda table: set(table.groups()) == {GAMMA, DELTA})

        # The request started on the old table, still going, finishes on it.
        assert not response.content.at_eof()
        assert await response.content.read() == b"chunk 1\nchunk 2\nchunk 3\n"

    await check_rows(door, after=True)
    assert sample(await door.metrics(), "grafana_bridge_route_table_services") == 2
