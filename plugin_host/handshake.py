"""The go-plugin handshake, host side: the plugin's environment and its first stdout line."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from plugin_host.errors import (
    IncompatibleVersion,
    MalformedHandshake,
    UnsupportedProtocol,
)
from plugin_host.platform import go_arch, go_os

MAGIC_COOKIE_KEY = "grafana_plugin_type"
MAGIC_COOKIE_VALUE = "datasource"
CORE_PROTOCOL_VERSION = 1
APP_PROTOCOL_VERSIONS: tuple[int, ...] = (2,)

# Variables a host forwards even when it withholds the rest of its environment.
PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")

# A host must never make a plugin believe it runs in the SDK's standalone mode by accident.
_STANDALONE_PREFIX = "GF_PLUGIN_GRPC_ADDRESS_"

# go-plugin variables only the host may set: each changes where the plugin listens or what it
# demands of the host (a certificate, multiplexing, a socket group). A value inherited from the
# host's own environment or slipped in through settings must never reach the plugin.
HOST_ONLY_VARIABLES = (
    "PLUGIN_CLIENT_CERT",
    "PLUGIN_MULTIPLEX_GRPC",
    "PLUGIN_UNIX_SOCKET_DIR",
    "PLUGIN_UNIX_SOCKET_GROUP",
)

# go-plugin treats a 6th field as a certificate only when it is this long.
_MIN_CERT_LENGTH = 50

_DIGITS = re.compile(r"[0-9]+")


class Network(StrEnum):
    UNIX = "unix"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class HandshakeInfo:
    """A parsed handshake line: where the plugin listens and what it speaks."""

    core_version: int
    app_version: int
    network: Network
    address: str
    protocol: str
    multiplexed: bool = False

    @property
    def grpc_target(self) -> str:
        """The address in the form grpcio's channel constructors take."""
        if self.network is Network.UNIX:
            return f"unix:{self.address}"
        return self.address


@dataclass(frozen=True, slots=True)
class GrafanaIdentity:
    """What the host tells plugins about the Grafana it stands in for."""

    version: str = "11.3.0"
    edition: str = "Open Source"
    app_url: str = ""
    feature_toggles: tuple[str, ...] = ()

    @property
    def user_agent(self) -> str:
        return f"Grafana/{self.version} ({go_os()}; {go_arch()})"


def build_environment(
    *,
    host_env: Mapping[str, str],
    grafana: GrafanaIdentity,
    plugin_version: str = "",
    plugin_settings: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    forward_host_env: bool = True,
    tmpdir: str | None = None,
) -> dict[str, str]:
    """Build a plugin's environment in the order Grafana and go-plugin do.

    Later keys win, as Go's exec keeps the last of duplicated variables: Grafana's variables,
    then the host environment (or only the proxy allow-list), then go-plugin's own.
    ``plugin_settings`` become ``GF_PLUGIN_<KEY>`` like a ``[plugin.<id>]`` ini section.
    ``tmpdir``, when given, is the plugin's private directory (see :func:`confine_environment`;
    :class:`~plugin_host.process.PluginProcess` sets it per start anyway).
    """
    env: dict[str, str] = {
        "GF_VERSION": grafana.version,
        "GF_EDITION": grafana.edition,
        "GF_ENTERPRISE_LICENSE_PATH": "",
        "GF_ENTERPRISE_APP_URL": "",
    }
    if grafana.app_url:
        env["GF_APP_URL"] = grafana.app_url
    if grafana.feature_toggles:
        env["GF_INSTANCE_FEATURE_TOGGLES_ENABLE"] = ",".join(grafana.feature_toggles)
    if plugin_version:
        env["GF_PLUGIN_VERSION"] = plugin_version
    for key, value in (plugin_settings or {}).items():
        if key.lower() in ("path", "id"):
            continue
        name = "GF_PLUGIN_" + key.upper()
        # Grafana lets its own environment override an ini value of the same name.
        env[name] = host_env.get(name, value)
    if forward_host_env:
        env.update(host_env)
    else:
        env.update((key, host_env[key]) for key in PROXY_VARIABLES if key in host_env)
    env.update(extra_env or {})
    env = confine_environment(env, private_dir=tmpdir)
    env[MAGIC_COOKIE_KEY] = MAGIC_COOKIE_VALUE
    env["PLUGIN_MIN_PORT"] = "10000"
    env["PLUGIN_MAX_PORT"] = "25000"
    env["PLUGIN_PROTOCOL_VERSIONS"] = ",".join(str(v) for v in APP_PROTOCOL_VERSIONS)
    return env


def confine_environment(env: Mapping[str, str], *, private_dir: str | None) -> dict[str, str]:
    """The final say over a plugin's environment, applied after every other source.

    Drops what only the host may decide (:data:`HOST_ONLY_VARIABLES` and the SDK's standalone
    switch ``GF_PLUGIN_GRPC_ADDRESS_<ID>``, whichever way it came in), then points both
    ``TMPDIR`` (read by go-plugin < 1.5 and the Go runtime) and ``PLUGIN_UNIX_SOCKET_DIR``
    (read by go-plugin >= 1.5) at the plugin's private directory, so its socket lands there.
    """
    confined = {
        key: value
        for key, value in env.items()
        if key not in HOST_ONLY_VARIABLES and not key.startswith(_STANDALONE_PREFIX)
    }
    if private_dir is not None:
        confined["TMPDIR"] = private_dir
        confined["PLUGIN_UNIX_SOCKET_DIR"] = private_dir
    return confined


def parse_handshake(
    line: str,
    *,
    plugin_id: str,
    offered_versions: tuple[int, ...] = APP_PROTOCOL_VERSIONS,
) -> HandshakeInfo:
    """Parse ``CORE|APP|NETWORK|ADDRESS|PROTOCOL[|CERT[|MUX]]`` as go-plugin's client does.

    Like go-plugin, fields after the seventh are ignored.
    """
    text = line.strip()
    parts = text.split("|")
    if len(parts) < 4:
        raise MalformedHandshake(
            plugin_id,
            line=text,
            why="expected CORE|APP|NETWORK|ADDRESS|PROTOCOL "
            "(a go-plugin binary prints this as its first line on stdout)",
        )

    core = _parse_int(parts[0], plugin_id=plugin_id, line=text, what="core protocol version")
    if core != CORE_PROTOCOL_VERSION:
        raise IncompatibleVersion(
            plugin_id,
            f"go-plugin core protocol version {core} is not supported "
            f"(this host speaks {CORE_PROTOCOL_VERSION}); the plugin was built with an "
            "incompatible go-plugin library",
        )
    app = _parse_int(parts[1], plugin_id=plugin_id, line=text, what="plugin protocol version")
    if app not in offered_versions:
        offered = ", ".join(str(v) for v in offered_versions)
        raise IncompatibleVersion(
            plugin_id,
            f"speaks plugin protocol version {app}, which is not supported (this host speaks "
            f"{offered}); rebuild the plugin with a current grafana-plugin-sdk-go",
        )

    try:
        network = Network(parts[2])
    except ValueError:
        raise UnsupportedProtocol(
            plugin_id, f"network {parts[2]!r} is not supported (expected unix or tcp)"
        ) from None
    address = parts[3]
    if not address:
        raise MalformedHandshake(plugin_id, line=text, why="the address field is empty")
    if network is Network.TCP and not _looks_like_host_port(address):
        raise MalformedHandshake(
            plugin_id, line=text, why=f"tcp address {address!r} is not host:port"
        )

    # go-plugin: no 5th field means the plugin predates gRPC support and speaks netrpc.
    protocol = parts[4] if len(parts) > 4 else "netrpc"
    if not protocol:
        raise UnsupportedProtocol(
            plugin_id, "the protocol field of the handshake is empty; only 'grpc' is supported"
        )
    if protocol != "grpc":
        raise UnsupportedProtocol(
            plugin_id,
            f"speaks {protocol!r}; only 'grpc' is supported (as in Grafana). "
            "netrpc plugins predate Grafana's plugin protocol v2",
        )

    if len(parts) > 5 and len(parts[5]) > _MIN_CERT_LENGTH:
        raise UnsupportedProtocol(
            plugin_id,
            "offered an AutoMTLS certificate, which this host (like Grafana) does not use",
        )
    multiplexed = len(parts) > 6 and parts[6] == "true"
    return HandshakeInfo(
        core_version=core,
        app_version=app,
        network=network,
        address=address,
        protocol=protocol,
        multiplexed=multiplexed,
    )


def _parse_int(field: str, *, plugin_id: str, line: str, what: str) -> int:
    # int() would also take "+2", "0_2" and non-ASCII digits; go-plugin's Atoi does not.
    if not _DIGITS.fullmatch(field):
        raise MalformedHandshake(plugin_id, line=line, why=f"{what} {field!r} is not a number")
    return int(field)


def _looks_like_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and _DIGITS.fullmatch(port) and 0 < int(port) < 65536)
