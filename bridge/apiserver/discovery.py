"""Discovery: the APIGroup and APIResourceList of aggregation.grafana.app, and ``/version``.

This is the legacy (unaggregated) discovery kube-apiserver served before 1.26. kubectl asks
for aggregated discovery first (``Accept: application/json;g=apidiscovery.k8s.io;v=v2;
as=APIGroupDiscoveryList, …, application/json``); we answer the plain ``application/json``
form, and the ``Content-Type`` tells kubectl to fall back, as it does against any server
without aggregated discovery. A client that accepts only the aggregated form gets 406.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from aiohttp import web

from bridge.apis import API_VERSION, GROUP, KIND, RESOURCE, VERSION
from bridge.apiserver.negotiation import encode, negotiate

SINGULAR = "dataplaneservice"
CATEGORIES = ("dataplane",)
VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
STATUS_VERBS = ("get", "patch", "update")

# The Kubernetes version this API behaves as (kubectl only shows it, in `kubectl version`).
KUBERNETES_MAJOR = "1"
KUBERNETES_MINOR = "37"


def _storage_version_hash() -> str:
    # As kube: the first 8 bytes of sha256("<group>/<version>/<kind>"), base64.
    digest = hashlib.sha256(f"{API_VERSION}/{KIND}".encode()).digest()
    return base64.b64encode(digest[:8]).decode()


def api_group() -> dict[str, Any]:
    """Our entry of the ``/apis`` APIGroupList (what ``Bridge.own_api_groups`` returns)."""
    version = {"groupVersion": API_VERSION, "version": VERSION}
    return {"name": GROUP, "versions": [version], "preferredVersion": version}


def api_group_document() -> dict[str, Any]:
    return {"kind": "APIGroup", "apiVersion": "v1", **api_group()}


def api_group_list(*groups: dict[str, Any]) -> dict[str, Any]:
    """A whole ``/apis`` document: ours, then ``groups`` (for servers with no delegate)."""
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group(), *groups]}


def api_resource_list() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": API_VERSION,
        "resources": [
            {
                "name": RESOURCE,
                "singularName": SINGULAR,
                "namespaced": False,
                "kind": KIND,
                "verbs": list(VERBS),
                "categories": list(CATEGORIES),
                "storageVersionHash": _storage_version_hash(),
            },
            {
                "name": f"{RESOURCE}/status",
                "singularName": "",
                "namespaced": False,
                "kind": KIND,
                "verbs": list(STATUS_VERBS),
            },
        ],
    }


def version_info(bridge_version: str) -> dict[str, str]:
    """The ``/version`` document: a kube version.Info naming the bridge in gitVersion."""
    return {
        "major": KUBERNETES_MAJOR,
        "minor": KUBERNETES_MINOR,
        "gitVersion": f"v{KUBERNETES_MAJOR}.{KUBERNETES_MINOR}.0+grafana-bridge-{bridge_version}",
        "gitCommit": "",
        "gitTreeState": "",
        "buildDate": "",
        "goVersion": "",
        "compiler": "cpython",
        "platform": "",
    }


async def group_handler(request: web.Request) -> web.Response:
    return encode(api_group_document(), negotiate(request))


async def group_version_handler(request: web.Request) -> web.Response:
    return encode(api_resource_list(), negotiate(request))
