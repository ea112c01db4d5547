"""Set-up for the DataPlaneService API tests: the routes on a real aiohttp server.

The app is what the bridge mounts: :func:`register_routes` plus ``errors_middleware`` from
bridge/app.py, with ``/apis`` answered from :func:`api_group_list` (the bridge merges it with
its delegate's). Callers are told apart by bearer token (``TOKENS``).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.apis import API_VERSION, KIND
from bridge.apiserver import DataPlaneServiceAPI, api_group_list, register_routes
from bridge.app import errors_middleware
from bridge.identity import Identity, OrgRole
from bridge.status import StatusError
from tests.bridge.apiserver.store import ObservedStore
from tests.helpers import free_port

BASE = "/apis/aggregation.grafana.app/v0alpha1/dataplaneservices"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"

TOKENS: Mapping[str, Identity] = {
    "admin-token": Identity("admin", "Admin", "", org_id=1, role=OrgRole.ADMIN),
    "editor-token": Identity("editor", "Editor", "", org_id=1, role=OrgRole.EDITOR),
    "viewer-token": Identity("viewer", "Viewer", "", org_id=1, role=OrgRole.VIEWER),
    "tenant-admin-token": Identity("tenant", "Tenant", "", org_id=2, role=OrgRole.ADMIN),
    "root-token": Identity("root", "Root", "", org_id=3, role=OrgRole.NONE, is_server_admin=True),
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


ADMIN = bearer("admin-token")
VIEWER = bearer("viewer-token")


async def authenticate(request: web.Request) -> Identity:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise StatusError(401, "authentication required: send a bearer token")
    identity = TOKENS.get(token.strip())
    if identity is None:
        raise StatusError(401, "invalid bearer token")
    return identity


async def _apis(request: web.Request) -> web.Response:
    return web.json_response(api_group_list())


def build_app(store: ObservedStore, **options: Any) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    api = DataPlaneServiceAPI(store, authenticate, **options)
    app.router.add_get("/apis", _apis)
    register_routes(app.router, api)
    return app


def sample(
    group: str = "prometheus.grafana.app",
    *,
    version: str = "v0alpha1",
    plugin_id: str = "prometheus",
    labels: Mapping[str, str] | None = None,
    services: tuple[str, ...] = ("query",),
) -> dict[str, Any]:
    """A valid DataPlaneService named ``<version>.<group>``."""
    metadata: dict[str, Any] = {"name": f"{version}.{group}"}
    if labels:
        metadata["labels"] = dict(labels)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "pluginID": plugin_id,
            "pluginType": "datasource",
            "group": group,
            "version": version,
            "services": [{"type": s} for s in services],
        },
    }


def condition(status: str, reason: str = "") -> dict[str, Any]:
    found: dict[str, Any] = {"type": "Available", "status": status}
    if reason:
        found["reason"] = reason
    return found


def with_status(obj: Mapping[str, Any], *conditions: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(dict(obj))
    result["status"] = {"conditions": list(conditions)}
    return result


@pytest_asyncio.fixture
async def store() -> ObservedStore:
    return ObservedStore()


@pytest_asyncio.fixture
async def client(store: ObservedStore) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(build_app(store), host="127.0.0.1")) as running:
        yield running


@asynccontextmanager
async def serving(
    app: web.Application,
    *,
    handler_cancellation: bool = True,
) -> AsyncIterator[str]:
    """``app`` on a loopback port, as ``grafana-bridge serve`` runs it; yields its URL."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
