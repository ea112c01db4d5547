"""Find, verify, launch and supervise Grafana backend plugins; talk to them over pluginv2."""

# First, before anything imports grpc: without setpriv, process turns gRPC's fork support off,
# which only counts if it happens before gRPC is imported (see plugin_host/process.py).
from plugin_host import process as process
from plugin_host.client import BackendClient, map_rpc_error, open_channel
from plugin_host.discovery import (
    DiscoveryResult,
    LoadError,
    LoadErrorCode,
    PluginSpec,
    discover,
    discover_async,
)
from plugin_host.errors import (
    ErrorSource,
    HandshakeError,
    HandshakeTimeout,
    IncompatibleVersion,
    MalformedHandshake,
    MessageTooLarge,
    NotImplementedByPlugin,
    PluginCallError,
    PluginError,
    PluginExitedBeforeHandshake,
    PluginInternalError,
    PluginLaunchError,
    PluginNotFound,
    PluginSpawnError,
    PluginTimeout,
    PluginUnavailable,
    UnsupportedProtocol,
)
from plugin_host.handshake import GrafanaIdentity, HandshakeInfo, build_environment, parse_handshake
from plugin_host.host import HostConfig, PluginHost
from plugin_host.keyring import KeyRing
from plugin_host.registry import PluginRegistry
from plugin_host.signature import PluginSignature, SignatureStatus
from plugin_host.supervisor import (
    PluginState,
    PluginStatus,
    PluginTarget,
    ProcessStats,
    RestartPolicy,
    SupervisorOptions,
)

__all__ = [
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
