"""PluginContexts for handler calls: provisioning settings + caller + Grafana identity."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bridge.auth import ORG_HEADER, forwardable_headers, query_headers
from bridge.handlers.base import Call
from bridge.plugin_context import build_plugin_context
from bridge.provisioning import AppSettings, ProvisioningStore
from bridge.status import StatusError
from plugin_host.handshake import GrafanaIdentity
from protos.pluginv2 import backend_pb2 as pb


class Contexts:
    """The bridge's :class:`~bridge.handlers.base.ContextSource`."""

    def __init__(
        self,
        *,
        provisioning: ProvisioningStore,
        plugin_version: Callable[[str], str],
        grafana: GrafanaIdentity,
        grafana_config: Mapping[str, str],
    ) -> None:
        self._provisioning = provisioning
        self._plugin_version = plugin_version
        self._grafana = grafana
        self._grafana_config = dict(grafana_config)

    def for_datasource(self, call: Call, uid: str) -> pb.PluginContext:
        datasource = self._provisioning.datasource(call.org_id, uid, plugin_id=call.plugin_id)
        return self._build(call, datasource=datasource)

    def for_app(self, call: Call) -> pb.PluginContext:
        app = self._provisioning.lookup_app(call.org_id, call.plugin_id)
        if app is None:
            app = AppSettings.unprovisioned(call.org_id, call.plugin_id)
        if not app.enabled:
            raise StatusError(
                404, f"app plugin {call.plugin_id!r} is disabled in org {call.org_id}"
            )
        return self._build(call, app=app)

    def forwarded_headers(
        self, call: Call, context: pb.PluginContext, *, prefixed: bool = True
    ) -> dict[str, str]:
        """Headers the plugin may see; ``prefixed`` gives QueryData's ``http_<Name>`` keys."""
        json_data: Mapping[str, Any] | None = None
        uid = context.dataSourceInstanceSettings.uid
        if uid:
            # The settings the context was built from, not a re-parse of its jsonData bytes.
            datasource = self._provisioning.lookup_datasource(context.orgId, uid)
            json_data = datasource.json_data if datasource is not None else None
        forwarded = forwardable_headers(
            call.request.headers, identity=call.identity, json_data=json_data
        )
        if ORG_HEADER in forwarded:
            # Grafana forwards the header only once it has made it the request's org; token
            # mode never reads it, so the caller's value could name an org the request is not in.
            forwarded[ORG_HEADER] = str(call.org_id)
        return query_headers(forwarded) if prefixed else forwarded

    def _build(self, call: Call, **settings: Any) -> pb.PluginContext:
        return build_plugin_context(
            identity=call.identity,
            org_id=call.org_id,
            namespace=call.namespace,
            plugin_id=call.plugin_id,
            plugin_version=self._plugin_version(call.plugin_id),
            grafana=self._grafana,
            grafana_config=self._grafana_config,
            **settings,
        )
