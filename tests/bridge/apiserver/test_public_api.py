"""The names the bridge wires up; changing them is a change for bridge/server.py and cli.py."""

from __future__ import annotations

import bridge.apiserver


def test_public_names() -> None:
    assert sorted(bridge.apiserver.__all__) == [
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
    for name in bridge.apiserver.__all__:
        assert getattr(bridge.apiserver, name) is not None
