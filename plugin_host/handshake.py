"""The go-plugin handshake, host side: the plugin's environment and its first stdout line."""

from __future__ import annotations

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

# go-plugin treats a 6th field as a certificate only when it is this long.
_MIN_CERT_LENGTH = 50


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
    server_cert: str | None = None
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
        env.update(
            (key, value)
            for key, value in host_env.items()
            if not key.startswith(_STANDALONE_PREFIX)
        )
    else:
        env.update((key, host_env[key]) for key in PROXY_VARIABLES if key in host_env)
    env.update(extra_env or {})
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    env[MAGIC_COOKIE_KEY] = MAGIC_COOKIE_VALUE
    env["PLUGIN_MIN_PORT"] = "10000"
    env["PLUGIN_MAX_PORT"] = "25000"
    env["PLUGIN_PROTOCOL_VERSIONS"] = ",".join(str(v) for v in APP_PROTOCOL_VERSIONS)
    # AutoMTLS is never used (as in Grafana): a stray certificate would make the plugin demand it.
    env.pop("PLUGIN_CLIENT_CERT", None)
    return env


def parse_handshake(
    line: str,
    *,
    plugin_id: str,
    offered_versions: tuple[int, ...] = APP_PROTOCOL_VERSIONS,
) -> HandshakeInfo:
    """Parse ``CORE|APP|NETWORK|ADDRESS|PROTOCOL[|CERT[|MUX]]`` as go-plugin's client does."""
    text = line.strip()
    parts = text.split("|")
    if len(parts) < 4:
        raise MalformedHandshake(
            plugin_id,
            line=text,
            why="expected CORE|APP|NETWORK|ADDRESS|PROTOCOL "
            "(a go-plugin binary prints this as its first line on stdout)",
        )
    if len(parts) > 7:
        raise MalformedHandshake(
            plugin_id, line=text, why=f"{len(parts)} fields, at most 7 allowed"
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
            f"plugin protocol version {app} is not supported (this host speaks {offered}); "
            "rebuild the plugin with a current grafana-plugin-sdk-go",
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

    protocol = parts[4] if len(parts) > 4 and parts[4] else "netrpc"
    if protocol != "grpc":
        raise UnsupportedProtocol(
            plugin_id,
            f"plugin speaks {protocol!r}; only 'grpc' is supported (as in Grafana). "
            "netrpc plugins predate Grafana's plugin protocol v2",
        )

    cert = parts[5] if len(parts) > 5 and len(parts[5]) > _MIN_CERT_LENGTH else None
    if cert is not None:
        raise UnsupportedProtocol(
            plugin_id,
            "plugin offered an AutoMTLS certificate, which this host (like Grafana) does not use",
        )
    multiplexed = len(parts) > 6 and parts[6] == "true"
    return HandshakeInfo(
        core_version=core,
        app_version=app,
        network=network,
        address=address,
        protocol=protocol,
        server_cert=cert,
        multiplexed=multiplexed,
    )


def _parse_int(field: str, *, plugin_id: str, line: str, what: str) -> int:
    try:
        return int(field)
    except ValueError:
        raise MalformedHandshake(
            plugin_id, line=line, why=f"{what} {field!r} is not a number"
        ) from None


def _looks_like_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)
