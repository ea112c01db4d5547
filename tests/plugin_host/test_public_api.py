"""The names plugin_host promises to keep; a change here is a change for every user."""

from __future__ import annotations

import plugin_host


def test_public_api_is_pinned() -> None:
    assert sorted(plugin_host.__all__) == [
        "BackendClient",
        "DiscoveryResult",
        "ErrorSource",
        "GrafanaIdentity",
        "HandshakeError",
        "HandshakeInfo",
        "HandshakeTimeout",
        "HostConfig",
        "IncompatibleVersion",
        "KeyRing",
        "LoadError",
        "LoadErrorCode",
        "MalformedHandshake",
        "MessageTooLarge",
        "NotImplementedByPlugin",
        "PluginCallError",
        "PluginError",
        "PluginExitedBeforeHandshake",
        "PluginHost",
        "PluginInternalError",
        "PluginLaunchError",
        "PluginNotFound",
        "PluginRegistry",
        "PluginSignature",
        "PluginSpawnError",
        "PluginSpec",
        "PluginState",
        "PluginStatus",
        "PluginTarget",
        "PluginTimeout",
        "PluginUnavailable",
        "ProcessStats",
        "RestartPolicy",
        "SignatureStatus",
        "SupervisorOptions",
        "UnsupportedProtocol",
        "build_environment",
        "discover",
        "discover_async",
        "map_rpc_error",
        "open_channel",
        "parse_handshake",
    ]
    for name in plugin_host.__all__:
        assert getattr(plugin_host, name) is not None


def test_every_plugin_error_carries_the_plugin_id() -> None:
    errors = [
        plugin_host.PluginNotFound("a"),
        plugin_host.PluginUnavailable("a", "down", retry_after=3),
        plugin_host.PluginTimeout("a", "slow", method="QueryData"),
        plugin_host.PluginInternalError(
            "a",
            "boom",
            method="QueryData",
            grpc_code="UNKNOWN",
            error_source=plugin_host.ErrorSource.DOWNSTREAM,
        ),
        plugin_host.PluginExitedBeforeHandshake("a", exit_code=2, stderr_tail="panic: x"),
        plugin_host.HandshakeTimeout("a", timeout=60),
    ]
    for error in errors:
        assert isinstance(error, plugin_host.PluginError)
        assert error.plugin_id == "a"
        assert str(error).startswith("plugin a: ")
