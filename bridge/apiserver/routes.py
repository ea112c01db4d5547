"""Where the DataPlaneService API is mounted: one aiohttp route per path and method.

Every path also gets a catch-all route answering 405 with ``Allow``, so an unsupported
method gets a Kubernetes Status here instead of falling through to the front door.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from bridge.apis import GROUP, RESOURCE, VERSION
from bridge.apiserver import discovery, errors, openapi
from bridge.apiserver.handlers import DataPlaneServiceAPI

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

GROUP_PATH = f"/apis/{GROUP}"
VERSION_PATH = f"{GROUP_PATH}/{VERSION}"
COLLECTION_PATH = f"{VERSION_PATH}/{RESOURCE}"
ITEM_PATH = f"{COLLECTION_PATH}/{{name}}"
STATUS_PATH = f"{ITEM_PATH}/status"


def _add(router: web.UrlDispatcher, path: str, methods: Sequence[tuple[str, Handler]]) -> None:
    allowed = sorted(
        {method for method, _ in methods}
        | ({"HEAD"} if any(m == "GET" for m, _ in methods) else set())
    )

    async def refuse(request: web.Request) -> web.StreamResponse:
        raise errors.method_not_allowed(request.method, request.path, allowed)

    for method, handler in methods:
        if method == "GET":
            router.add_get(path, handler)
        else:
            router.add_route(method, path, handler)
    router.add_route("*", path, refuse)


def bridge_version() -> str:
    try:
        return importlib.metadata.version("grafana-plugin-bridge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def version(request: web.Request) -> web.Response:
    info = discovery.version_info(bridge_version())
    info["platform"] = f"{sys.platform}/{platform.machine().lower()}"
    return web.json_response(info)


def register_routes(
    router: web.UrlDispatcher,
    api: DataPlaneServiceAPI,
    *,
    include_version: bool = True,
    include_openapi: bool = True,
) -> None:
    """Mount the API on ``router``; call it before any catch-all route is added.

    Registers the group and version discovery documents, the resource and its ``status``
    subresource, and unless turned off ``/version``, ``/openapi/v2`` and ``/openapi/v3``
    (whose root lists only this group; a server that merges several groups' OpenAPI mounts
    its own root and adds :func:`bridge.apiserver.openapi.v3_paths`).
    """
    # Discovery and OpenAPI need a signed-in caller, as Kubernetes' system:discovery role is
    # bound to system:authenticated; only /version is public (system:public-info-viewer).
    signed_in = api.signed_in
    _add(router, GROUP_PATH, [("GET", signed_in(discovery.group_handler))])
    _add(router, VERSION_PATH, [("GET", signed_in(discovery.group_version_handler))])
    _add(
        router,
        COLLECTION_PATH,
        [("GET", api.list_or_watch), ("POST", api.create), ("DELETE", api.delete_collection)],
    )
    _add(
        router,
        ITEM_PATH,
        [("GET", api.get), ("PUT", api.update), ("PATCH", api.patch), ("DELETE", api.delete)],
    )
    _add(router, STATUS_PATH, [("GET", api.get), ("PUT", api.update), ("PATCH", api.patch)])
    if include_version:
        _add(router, "/version", [("GET", version)])
    if include_openapi:
        _add(router, "/openapi/v2", [("GET", signed_in(openapi.openapi_v2))])
        _add(router, "/openapi/v3", [("GET", signed_in(openapi.openapi_v3_root))])
        _add(
            router,
            f"/openapi/v3/{openapi.V3_PATH}",
            [("GET", signed_in(openapi.openapi_v3_group_version))],
        )
