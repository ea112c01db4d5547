"""What every endpoint handler receives: the request, its match, the caller, and the bridge."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from bridge.identity import Identity
from bridge.limits import PluginConcurrency
from bridge.metrics import BridgeMetrics
from bridge.routing import Match
from plugin_host.client import BackendClient
from protos.pluginv2 import backend_pb2 as pb

if TYPE_CHECKING:
    from bridge.dsproxy import DatasourceProxy
    from bridge.streams import StreamHub


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated request for a DataPlaneService endpoint."""

    request: web.Request
    match: Match
    identity: Identity
    org_id: int
    namespace: str

    @property
    def plugin_id(self) -> str:
        return self.match.service.plugin_id

    @property
    def params(self) -> Mapping[str, str]:
        return self.match.params


class ContextSource(Protocol):
    """Builds PluginContexts the way Grafana fills them (see bridge/context.py)."""

    def for_datasource(self, call: Call, uid: str) -> pb.PluginContext: ...

    def for_app(self, call: Call) -> pb.PluginContext: ...

    def forwarded_headers(
        self, call: Call, context: pb.PluginContext, *, prefixed: bool = True
    ) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class Deps:
    """The parts of the bridge handlers use; built once at start-up."""

    client: Callable[[str], BackendClient]
    contexts: ContextSource
    metrics: BridgeMetrics
    call_timeout: float
    # Grafana Live streams (bridge/streams.py); None: the stream endpoint answers 503.
    streams: StreamHub | None = None
    # Concurrent calls per plugin (limits.max_calls_per_plugin); Bridge.dispatch holds a slot.
    concurrency: PluginConcurrency = field(default_factory=lambda: PluginConcurrency(100))
    # The datasource-proxy service type (bridge/dsproxy); None: that endpoint answers 503.
    datasource_proxy: DatasourceProxy | None = None


Handler = Callable[[Call, Deps], Awaitable[web.StreamResponse]]
