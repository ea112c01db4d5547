"""The DataPlaneService resource as a Kubernetes-style REST API that kubectl can drive.

Mount it with :func:`register_routes`; list our group in ``/apis`` with :func:`api_group`.
docs/dataplaneservice-api.md describes the endpoints and their semantics.
"""

from bridge.apiserver.discovery import api_group, api_group_list, api_resource_list, version_info
from bridge.apiserver.handlers import Authenticate, DataPlaneServiceAPI, may_write
from bridge.apiserver.kubeconfig import render_kubeconfig, write_kubeconfig
from bridge.apiserver.openapi import v3_paths
from bridge.apiserver.routes import register_routes

__all__ = [
    "Authenticate",
    "DataPlaneServiceAPI",
    "api_group",
    "api_group_list",
    "api_resource_list",
    "may_write",
    "register_routes",
    "render_kubeconfig",
    "v3_paths",
    "version_info",
    "write_kubeconfig",
]
