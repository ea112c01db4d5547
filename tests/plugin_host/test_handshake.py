"""The go-plugin handshake line and the plugin environment, one row per behaviour."""

from __future__ import annotations

import pytest

from plugin_host.errors import (
    HandshakeError,
    IncompatibleVersion,
    MalformedHandshake,
    UnsupportedProtocol,
)
from plugin_host.handshake import (
    GrafanaIdentity,
    HandshakeInfo,
    Network,
    build_environment,
    confine_environment,
    parse_handshake,
)

GOOD = [
    # Current go-plugin: six fields, the last one empty.
    ("1|2|unix|/tmp/plugin123|grpc|", Network.UNIX, "/tmp/plugin123", "unix:/tmp/plugin123", False),
    # The SDK's standalone locator prints five fields.
    ("1|2|tcp|127.0.0.1:10001|grpc", Network.TCP, "127.0.0.1:10001", "127.0.0.1:10001", False),
    # Seven fields when multiplexing was requested.
    ("1|2|unix|/tmp/p|grpc||true", Network.UNIX, "/tmp/p", "unix:/tmp/p", True),
    # Surrounding whitespace and CRLF are ignored.
    ("  1|2|unix|/tmp/p|grpc|\r\n", Network.UNIX, "/tmp/p", "unix:/tmp/p", False),
    # Like go-plugin, fields after the seventh are ignored.
    ("1|2|unix|/tmp/p|grpc||true|x", Network.UNIX, "/tmp/p", "unix:/tmp/p", True),
]


@pytest.mark.parametrize(("line", "network", "address", "target", "mux"), GOOD)
def test_parse_valid_lines(
    line: str, network: Network, address: str, target: str, mux: bool
) -> None:
    info = parse_handshake(line, plugin_id="p")
    assert info == HandshakeInfo(
        core_version=1,
        app_version=2,
        network=network,
        address=address,
        protocol="grpc",
        multiplexed=mux,
    )
    assert info.grpc_target == target


BAD: list[tuple[str, type[HandshakeError], str]] = [
    ("hello from a broken plugin", MalformedHandshake, "'hello from a broken plugin'"),
    ("", MalformedHandshake, "expected CORE|APP|NETWORK|ADDRESS|PROTOCOL"),
    ("1|2|unix", MalformedHandshake, "expected CORE|APP"),
    ("x|2|unix|/tmp/p|grpc|", MalformedHandshake, "core protocol version 'x' is not a number"),
    ("1|two|unix|/tmp/p|grpc|", MalformedHandshake, "plugin protocol version 'two'"),
    ("2|2|unix|/tmp/p|grpc|", IncompatibleVersion, "core protocol version 2"),
    ("1|1|unix|/tmp/p|grpc|", IncompatibleVersion, "plugin protocol version 1, which is not"),
    ("1|3|unix|/tmp/p|grpc|", IncompatibleVersion, "this host speaks 2"),
    ("1|2|unix|/tmp/p", UnsupportedProtocol, "'netrpc'"),
    ("1|2|unix|/tmp/p|", UnsupportedProtocol, "the protocol field of the handshake is empty"),
    # go-plugin's Atoi reads ASCII digits only; Python's int() would take all of these.
    ("+1|2|unix|/tmp/p|grpc|", MalformedHandshake, "core protocol version '+1' is not a number"),
    ("1|0_2|unix|/tmp/p|grpc|", MalformedHandshake, "'0_2' is not a number"),
    ("1|\uff12|unix|/tmp/p|grpc|", MalformedHandshake, "'\uff12' is not a number"),
    ("1|2|tcp|127.0.0.1:+80|grpc|", MalformedHandshake, "not host:port"),
    ("1|2|unix|/tmp/p|netrpc|", UnsupportedProtocol, "only 'grpc' is supported"),
    ("1|2|pipe|/tmp/p|grpc|", UnsupportedProtocol, "network 'pipe'"),
    ("1|2|unix||grpc|", MalformedHandshake, "address field is empty"),
    ("1|2|tcp|localhost|grpc|", MalformedHandshake, "not host:port"),
    ("1|2|tcp|127.0.0.1:99999|grpc|", MalformedHandshake, "not host:port"),
    ("1|2|unix|/tmp/p|grpc|" + "A" * 80, UnsupportedProtocol, "AutoMTLS"),
]


@pytest.mark.parametrize(("line", "error", "fragment"), BAD)
def test_parse_rejects_with_a_precise_reason(
    line: str, error: type[HandshakeError], fragment: str
) -> None:
    with pytest.raises(error) as info:
        parse_handshake(line, plugin_id="acme-x-datasource")
    assert fragment in str(info.value)
    assert info.value.plugin_id == "acme-x-datasource"
    assert str(info.value).startswith("plugin acme-x-datasource: ")
    assert not str(info.value).startswith("plugin acme-x-datasource: plugin ")


def test_long_garbage_is_quoted_but_shortened() -> None:
    with pytest.raises(MalformedHandshake) as info:
        parse_handshake("z" * 5000, plugin_id="p")
    assert len(str(info.value)) < 400
    assert info.value.line == "z" * 5000


def test_environment_order_and_go_plugin_variables() -> None:
    host = {
        "PATH": "/usr/bin",
        "GF_VERSION": "from-host",  # the host environment overrides Grafana's list, as in Go
        "GF_PLUGIN_GRPC_ADDRESS_ACME": "127.0.0.1:1",  # would switch the SDK to standalone
        "PLUGIN_CLIENT_CERT": "stray",
        "grafana_plugin_type": "wrong",
        "GF_PLUGIN_TIMEOUT": "from-env",
    }
    env = build_environment(
        host_env=host,
        grafana=GrafanaIdentity(version="11.3.0", feature_toggles=("a", "b")),
        plugin_version="1.2.3",
        plugin_settings={"timeout": "ini", "api_key": "k", "path": "/x", "id": "y"},
        extra_env={"EXTRA": "1"},
        tmpdir="/tmp/private",
    )
    assert env["grafana_plugin_type"] == "datasource"
    assert env["PLUGIN_PROTOCOL_VERSIONS"] == "2"
    assert env["PLUGIN_MIN_PORT"] == "10000"
    assert env["PLUGIN_MAX_PORT"] == "25000"
    assert "PLUGIN_CLIENT_CERT" not in env
    assert "GF_PLUGIN_GRPC_ADDRESS_ACME" not in env
    assert env["GF_VERSION"] == "from-host"
    assert env["GF_EDITION"] == "Open Source"
    assert env["GF_PLUGIN_VERSION"] == "1.2.3"
    assert env["GF_INSTANCE_FEATURE_TOGGLES_ENABLE"] == "a,b"
    assert env["GF_PLUGIN_TIMEOUT"] == "from-env"
    assert env["GF_PLUGIN_API_KEY"] == "k"
    assert "GF_PLUGIN_PATH" not in env and "GF_PLUGIN_ID" not in env
    assert env["PATH"] == "/usr/bin"
    assert env["EXTRA"] == "1"
    assert env["TMPDIR"] == "/tmp/private"


# Every way a variable only the host may set could come in: from the host's environment,
# from `[plugin.<id>]` settings, or as extra variables.
HOST_ONLY = [
    ("host_env", "PLUGIN_UNIX_SOCKET_DIR", "/somewhere/else"),
    ("host_env", "PLUGIN_MULTIPLEX_GRPC", "true"),
    ("host_env", "PLUGIN_UNIX_SOCKET_GROUP", "staff"),
    ("host_env", "PLUGIN_CLIENT_CERT", "stray"),
    ("host_env", "GF_PLUGIN_GRPC_ADDRESS_ACME", "127.0.0.1:1"),
    ("settings", "grpc_address_acme", "127.0.0.1:1"),
    ("extra_env", "GF_PLUGIN_GRPC_ADDRESS_ACME_X", "127.0.0.1:1"),
    ("extra_env", "PLUGIN_MULTIPLEX_GRPC", "true"),
    ("extra_env", "PLUGIN_UNIX_SOCKET_DIR", "/somewhere/else"),
    ("extra_env", "PLUGIN_CLIENT_CERT", "stray"),
]


@pytest.mark.parametrize(("source", "name", "value"), HOST_ONLY)
def test_host_only_variables_are_dropped(source: str, name: str, value: str) -> None:
    env = build_environment(
        host_env={name: value} if source == "host_env" else {},
        grafana=GrafanaIdentity(),
        plugin_settings={name: value} if source == "settings" else None,
        extra_env={name: value} if source == "extra_env" else None,
    )
    assert value not in env.values()
    assert "PLUGIN_UNIX_SOCKET_DIR" not in env  # set per start, to the private directory


def test_private_directory_is_both_tmpdir_and_socket_dir() -> None:
    env = build_environment(
        host_env={"TMPDIR": "/var/tmp", "PLUGIN_UNIX_SOCKET_DIR": "/elsewhere"},
        grafana=GrafanaIdentity(),
        tmpdir="/tmp/private",
    )
    assert env["TMPDIR"] == env["PLUGIN_UNIX_SOCKET_DIR"] == "/tmp/private"
    assert confine_environment({"A": "1"}, private_dir=None) == {"A": "1"}


def test_environment_without_host_env_keeps_only_proxies() -> None:
    env = build_environment(
        host_env={"PATH": "/usr/bin", "HTTPS_PROXY": "http://proxy:3128", "SECRET": "s"},
        grafana=GrafanaIdentity(),
        forward_host_env=False,
    )
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert "PATH" not in env and "SECRET" not in env
    assert env["grafana_plugin_type"] == "datasource"


def test_user_agent_names_go_platform() -> None:
    ua = GrafanaIdentity(version="11.2.0").user_agent
    assert ua.startswith("Grafana/11.2.0 (")
    assert ua.endswith(")") and "; " in ua
