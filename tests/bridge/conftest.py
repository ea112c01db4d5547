"""The front-door suite's set-up: a bridge on a loopback socket, real plugins, a stand-in Grafana.

Everything here is real: ``Bridge`` + ``build_app`` served by aiohttp with
``handler_cancellation=True`` (as ``grafana-bridge serve`` runs it), the fixture plugin
processes, token authentication from a token file, Grafana provisioning files and
DataPlaneService manifests written to a temporary directory, and an aiohttp server playing the
Grafana the bridge delegates to. The tests are in ``test_front_door_*.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from bridge.apis import API_VERSION, KIND
from bridge.app import BRIDGE_KEY, build_app, handler_kwargs
from bridge.config import BridgeConfig, load_config
from bridge.server import Bridge
from plugin_host.logs import plugin_logger
from plugin_host.supervisor import PluginState, PluginStatus
from tests.conftest import FIXTURE_PLUGINS, PY_FIXTURE_DIR
from tests.helpers import GO_FIXTURE_ID, PY_FIXTURE_ID, free_port

# Re-exported: the front-door tests take free_port (a loopback port nobody listens on, e.g. for
# a delegate that is down) from here.
__all__ = ["free_port"]

WAIT = 15.0  # upper bound for anything awaited; the tests finish far sooner
PY = PY_FIXTURE_ID
GO = GO_FIXTURE_ID
PY_GROUP = "pyfixture.datasource.grafana.app"
GO_GROUP = "gofixture.datasource.grafana.app"
VERSION = "v0alpha1"

# -- callers -----------------------------------------------------------------------------------

# Token-file users and the org and role each gets (auth.users).
USERS: Mapping[str, Mapping[str, Any]] = {
    "admin": {"org_id": 1, "role": "Admin"},
    "editor": {"org_id": 1, "role": "Editor"},
    "viewer": {"org_id": 1, "role": "Viewer"},
    "nobody": {"org_id": 1, "role": "None"},
    "other": {"org_id": 2, "role": "Editor"},
}


def token_for(user: str) -> str:
    return f"token-of-{user}"


def write_token_file(directory: Path) -> Path:
    path = directory / "tokens.csv"
    path.write_text("".join(f"{token_for(name)},{name},uid-{name}\n" for name in USERS))
    path.chmod(0o600)
    return path


# -- DataPlaneServices and provisioning --------------------------------------------------------

DEFAULT_SERVICES: tuple[Mapping[str, Any], ...] = ({"type": "query"}, {"type": "route"})


def dataplane_service(
    plugin_id: str,
    group: str,
    *,
    plugin_type: str = "datasource",
    services: tuple[Mapping[str, Any], ...] = DEFAULT_SERVICES,
) -> dict[str, Any]:
    """A DataPlaneService object as a manifest holds it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": f"{VERSION}.{group}"},
        "spec": {
            "pluginID": plugin_id,
            "pluginType": plugin_type,
            "group": group,
            "version": VERSION,
            "services": [dict(s) for s in services],
        },
    }


def write_manifest(directory: Path, name: str, *services: Mapping[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump_all(services))
    return path


def datasource(
    plugin_id: str, uid: str, *, org_id: int = 1, json_data: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """One entry of a Grafana provisioning file's ``datasources:``."""
    entry: dict[str, Any] = {"name": f"{uid} ({plugin_id})", "type": plugin_id, "uid": uid}
    if org_id != 1:
        entry["orgId"] = org_id
    if json_data:
        entry["jsonData"] = dict(json_data)
    return entry


def write_datasources(root: Path, *entries: Mapping[str, Any]) -> Path:
    directory = root / "datasources"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "front-door.yaml").write_text(
        yaml.safe_dump({"apiVersion": 1, "datasources": [dict(e) for e in entries]})
    )
    return root


# -- plugins -----------------------------------------------------------------------------------


def python_fixture_as(plugins_dir: Path, plugin_id: str) -> Path:
    """Another plugin id served by the Python fixture, so one bridge can run it several ways.

    The directory holds the fixture's plugin.json with the new id and an executable that
    runs the fixture's own (a symlink would be refused: it points outside the directory).
    """
    directory = plugins_dir / plugin_id
    directory.mkdir(parents=True)
    manifest = json.loads((PY_FIXTURE_DIR / "plugin.json").read_text())
    manifest["id"] = plugin_id
    manifest["name"] = f"Python fixture as {plugin_id}"
    (directory / "plugin.json").write_text(json.dumps(manifest))
    executable = f"{manifest['executable']}_linux_amd64"
    launcher = directory / executable
    launcher.write_text(f'#!/bin/sh\nexec "{PY_FIXTURE_DIR / executable}" "$@"\n')
    launcher.chmod(0o755)
    return directory


# -- configuration -----------------------------------------------------------------------------


def bridge_config(
    root: Path,
    *,
    plugin_dirs: tuple[Path, ...] = (FIXTURE_PLUGINS,),
    allow_unsigned: tuple[str, ...] = (GO, PY),
    delegate: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BridgeConfig:
    """Token auth, provisioning from ``root/provisioning``, manifests from ``root/dataplane``.

    The environment is left out (``environ={}``), so a ``BRIDGE_*`` variable of the machine
    running the tests cannot change what is tested.
    """
    (root / "provisioning").mkdir(exist_ok=True)
    (root / "dataplane").mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "plugins.directories": [str(d) for d in plugin_dirs],
        "plugins.allow_unsigned": list(allow_unsigned),
        "plugins.start_timeout": 15,
        "plugins.stop_grace": 1,
        "auth.mode": "token",
        "auth.token_file": str(write_token_file(root)),
        "auth.users": {name: dict(grant) for name, grant in USERS.items()},
        "provisioning.directories": [str(root / "provisioning")],
        "dataplane.manifests": [str(root / "dataplane")],
        "delegate.url": delegate,
        "storage.backend": "memory",
        "dataplane.auto_register": "none",
    }
    settings.update(overrides or {})
    return load_config(environ={}, overrides=settings)


# -- serving -----------------------------------------------------------------------------------


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a loopback port, run as the CLI runs the bridge; yields its base URL."""
    # A bridge's app gets its limits.* parser backstops, as `grafana-bridge serve` gives them.
    options = handler_kwargs(app[BRIDGE_KEY]) if BRIDGE_KEY in app else {}
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=2, **options
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Answer:
    """What came back: status, headers and the whole body."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def auth_headers(user: str | None) -> dict[str, str]:
    return {} if user is None else {"Authorization": f"Bearer {token_for(user)}"}


@dataclass
class FrontDoor:
    """A running bridge and a client for it."""

    bridge: Bridge
    url: str
    session: aiohttp.ClientSession

    def target(self, path: str) -> URL:
        # encoded=True: the path goes out byte for byte, never normalised or re-quoted.
        return URL(self.url + path, encoded=True)

    async def call(
        self,
        method: str,
        path: str,
        *,
        user: str | None = "admin",
        body: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        sent = {**auth_headers(user), **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.target(path), data=data, headers=sent
        ) as response:
            return Answer(response.status, response.headers, await response.read())

    async def metrics(self) -> str:
        answer = await self.call("GET", "/metrics", user=None)
        assert answer.status == 200, answer.text
        return answer.text

    async def plugin_calls(self, plugin_id: str, endpoint: str) -> float:
        """The Python fixture's own count of ``endpoint`` calls (``pyfixture_calls_total``)."""
        answer = await self.call("GET", f"/metrics/plugins/{plugin_id}", user=None)
        assert answer.status == 200, answer.text
        return sample(answer.text, "pyfixture_calls_total", endpoint=endpoint) or 0.0


@asynccontextmanager
async def front_door(
    config: BridgeConfig, *, bridge: Bridge | None = None
) -> AsyncIterator[FrontDoor]:
    """A bridge for ``config`` (plugins started) on a loopback port, and a client session."""
    bridge = bridge or Bridge(config)
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with (
        serving(build_app(bridge)) as url,
        aiohttp.ClientSession(timeout=timeout) as session,
    ):
        yield FrontDoor(bridge, url, session)


# -- a stand-in Grafana ------------------------------------------------------------------------

DELEGATE_GROUPS: list[dict[str, Any]] = [
    {
        "name": "dashboard.grafana.app",
        "versions": [{"groupVersion": "dashboard.grafana.app/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "dashboard.grafana.app/v1", "version": "v1"},
    },
    {
        "name": "folder.grafana.app",
        "versions": [{"groupVersion": "folder.grafana.app/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "folder.grafana.app/v1", "version": "v1"},
    },
]


@dataclass(frozen=True)
class Seen:
    """One request as it reached the stand-in."""

    method: str
    raw_path: str  # path and query, as sent on the request line
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class StandInGrafana:
    """Answers every request with a JSON description of it (status from ``?status=``),
    ``/apis`` with two API groups, and echoes WebSocket text messages."""

    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        return app

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._echo(request)
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        if request.path == "/apis":
            return web.json_response(
                {"kind": "APIGroupList", "apiVersion": "v1", "groups": DELEGATE_GROUPS}
            )
        described = {
            "grafana": "stand-in",
            "method": request.method,
            "path": request.raw_path,
            "body": body.decode(errors="replace"),
        }
        status = int(request.query.get("status", "200"))
        return web.json_response(described, status=status, headers={"X-Stand-In": "grafana"})

    async def _echo(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), b""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type is WSMsgType.TEXT:
                await ws.send_str(f"grafana echoes {message.data}")
        return ws


@asynccontextmanager
async def stand_in_grafana() -> AsyncIterator[tuple[StandInGrafana, str]]:
    grafana = StandInGrafana()
    async with serving(grafana.app()) as url:
        yield grafana, url


# -- the standard scene ------------------------------------------------------------------------

# The bridge most tests run against: both fixtures, a Python fixture that reports itself
# unhealthy, an app-type service with a custom route, and datasources in two orgs.
SICK = "bridge-pysick-datasource"
SICK_GROUP = "pysick.datasource.grafana.app"
APP_GROUP = "things.app.grafana.app"
APP_ROUTE: Mapping[str, Any] = {"type": "route", "path": "/things/{name}", "method": "GET"}
STANDARD_SERVICES = 4


def standard_config(root: Path, *, delegate: str | None) -> BridgeConfig:
    plugins = root / "plugins"
    python_fixture_as(plugins, SICK)
    write_datasources(
        root / "provisioning",
        datasource(PY, "py"),
        datasource(PY, "py-cookies", json_data={"keepCookies": ["keep"]}),
        datasource(PY, "py-stream"),
        datasource(GO, "go"),
        datasource(SICK, "sick"),
        datasource(PY, "py2", org_id=2),
    )
    write_manifest(
        root / "dataplane",
        "datasources.yaml",
        dataplane_service(PY, PY_GROUP),
        dataplane_service(GO, GO_GROUP),
        dataplane_service(SICK, SICK_GROUP),
    )
    write_manifest(
        root / "dataplane",
        "app.yaml",
        dataplane_service(PY, APP_GROUP, plugin_type="app", services=(APP_ROUTE,)),
    )
    return bridge_config(
        root,
        plugin_dirs=(FIXTURE_PLUGINS, plugins),
        allow_unsigned=(GO, PY, SICK),
        delegate=delegate,
        overrides={"plugins.env": {SICK: {"FIXTURE_BEHAVIOUR": "unhealthy"}}},
    )


@dataclass
class Scene:
    """A running standard bridge and the stand-in Grafana it delegates to."""

    door: FrontDoor
    grafana: StandInGrafana


@asynccontextmanager
async def standard_scene(root: Path) -> AsyncIterator[Scene]:
    async with (
        stand_in_grafana() as (grafana, url),
        front_door(standard_config(root, delegate=url)) as door,
    ):
        yield Scene(door, grafana)


# -- checks ------------------------------------------------------------------------------------


def assert_status(answer: Answer, code: int, reason: str, message: str) -> None:
    """``answer`` is a Kubernetes Status for ``code``/``reason`` whose message has ``message``."""
    assert answer.status == code, answer.text
    assert answer.headers.get("Content-Type", "").startswith("application/json"), answer.headers
    status = answer.json()
    fragment = {k: status.get(k) for k in ("kind", "apiVersion", "status", "code", "reason")}
    assert fragment == {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
    }
    assert message in status["message"], status["message"]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels``, summed; None if none."""
    found: list[float] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                found.append(s.value)
    return sum(found) if found else None


async def eventually(
    check: Callable[[], Awaitable[bool]], *, what: str, timeout: float = WAIT
) -> None:
    """Poll ``check`` until it holds: only for state that offers nothing to await."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


class PluginStates:
    """The states the supervisor reports for one plugin from now on, starting with the current."""

    def __init__(self, bridge: Bridge, plugin_id: str) -> None:
        self._plugin_id = plugin_id
        self.seen: list[PluginStatus] = [bridge.host.registry.status(plugin_id)]
        self._changed = asyncio.Event()
        bridge.host.registry.add_listener(self._listen)

    def _listen(self, status: PluginStatus) -> None:
        if status.plugin_id == self._plugin_id and status.state is not self.seen[-1].state:
            self.seen.append(status)
            self._changed.set()

    async def reach(self, *states: PluginState) -> PluginStatus:
        """Wait until ``states`` have been seen in this order; the status of the last one."""
        async with asyncio.timeout(WAIT):
            while True:
                wanted = list(states)
                for status in self.seen:
                    if status.state is wanted[0]:
                        wanted.pop(0)
                        if not wanted:
                            return status
                self._changed.clear()
                await self._changed.wait()


@dataclass
class PluginLog:
    """A plugin's log records (DEBUG and up) as the bridge's plugin logger emits them."""

    records: list[logging.LogRecord] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait_for(self, message: str, **fields: str) -> logging.LogRecord:
        """The first record whose message starts with ``message`` and that has ``fields``."""

        def wanted(record: logging.LogRecord) -> bool:
            got: Mapping[str, Any] = getattr(record, "plugin_fields", {})
            return record.getMessage().startswith(message) and all(
                got.get(k) == v for k, v in fields.items()
            )

        async with asyncio.timeout(WAIT):
            while True:
                found = next((r for r in self.records if wanted(r)), None)
                if found is not None:
                    return found
                self._changed.clear()
                await self._changed.wait()


class _Collect(logging.Handler):
    def __init__(self, log: PluginLog) -> None:
        super().__init__(logging.DEBUG)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        self._log.add(record)


@contextmanager
def plugin_log(plugin_id: str) -> Iterator[PluginLog]:
    """Collect ``plugin_id``'s log records (its stderr is read on the event loop's thread)."""
    logger = plugin_logger(plugin_id)
    log = PluginLog()
    handler = _Collect(log)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield log
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
