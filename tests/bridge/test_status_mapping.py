"""The one mapping from the plugin host's errors to HTTP codes (bridge/status.py).

The live cases (a crash-looping plugin, one killed under a call, a hung one) are asserted
against real processes in test_front_door_failures.py and test_availability_live.py; this
table also covers what a real plugin cannot be made to do on demand, such as gRPC reporting a
channel closed under a call as CANCELLED.
"""

from __future__ import annotations

import pytest

from bridge.status import from_plugin_error
from plugin_host.errors import (
    MessageTooLarge,
    NotImplementedByPlugin,
    PluginError,
    PluginExitedBeforeHandshake,
    PluginInternalError,
    PluginNotFound,
    PluginTimeout,
    PluginUnavailable,
)

P = "bridge-x-datasource"

CASES = [
    pytest.param(PluginNotFound(P), 404, None, id="unknown-plugin-id-in-a-url"),
    pytest.param(
        PluginUnavailable(P, "crash-looping", retry_after=42.5), 503, 42.5, id="crash-looping"
    ),
    pytest.param(PluginUnavailable(P, "QueryData: unreachable"), 503, 1.0, id="unreachable"),
    pytest.param(
        PluginExitedBeforeHandshake(P, exit_code=3, stderr_tail=""), 503, 1.0, id="launch-failed"
    ),
    pytest.param(
        PluginInternalError(P, "Locally cancelled", method="QueryData", grpc_code="CANCELLED"),
        503,
        1.0,
        id="channel-closed-under-the-call",
    ),
    pytest.param(PluginTimeout(P, "late", method="QueryData"), 504, None, id="timeout"),
    pytest.param(NotImplementedByPlugin(P, "no", method="QueryData"), 501, None, id="unimpl"),
    pytest.param(
        PluginInternalError(P, "on fire", method="QueryData", grpc_code="UNKNOWN"),
        502,
        None,
        id="plugin-answered-an-error",
    ),
    pytest.param(MessageTooLarge(P, "too big", method="QueryData"), 502, None, id="too-large"),
]


@pytest.mark.parametrize(("error", "code", "retry_after"), CASES)
def test_plugin_errors_map_to_codes(
    error: PluginError, code: int, retry_after: float | None
) -> None:
    status = from_plugin_error(error)
    assert (status.code, status.retry_after) == (code, retry_after)
    assert P in status.message


def test_a_broken_channel_does_not_echo_grpc_internals() -> None:
    error = PluginInternalError(
        P, "Locally cancelled by application!", method="CallResource", grpc_code="CANCELLED"
    )
    status = from_plugin_error(error)
    assert status.message == (
        f"plugin {P}: CallResource: the call was cancelled before the plugin answered "
        "(its connection closed or broke)"
    )
